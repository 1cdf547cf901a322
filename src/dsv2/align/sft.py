"""Supervised fine-tuning (paper §4: 1.5M conversations): the next-token loss on the assistant's replies only.

    conversations (a JSONL file, or a built-in task's worked examples) -> `Tokenizer.encode_chat` (the template
    inference uses; targets = each reply and its EOS) -> padded batches (`data/sft.py`) -> the training core, on
    every weight or, with `lora_rank`, on LoRA factors of a frozen model (`align/lora.py`)

RUN/model is a model folder with the tokenizer, which `dsv2 chat`, `serve` and `generate` load; a LoRA run also
writes RUN/adapter, the adapter alone in PEFT's layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv2.atomic import write_text_atomic
from dsv2.config import PRESETS
from dsv2.data import sft, tasks
from dsv2.tokenizer import Tokenizer
from dsv2.train import core
from dsv2.train.distributed import Distributed

DATA_REPORT = "sft_data.json"  # the counts of what the data became (kept, truncated, dropped, target tokens)


@dataclass
class SFTConfig(core.TrainConfig):
    model: str = ""  # the model folder to fine-tune (with its tokenizer.json), or a preset (byte tokenizer)
    out: str = "runs/sft"
    data: str | None = None  # a JSONL file of conversations, or:
    task: str | None = None  # a built-in task, whose worked examples are the conversations
    task_examples: int = 4000
    overflow: str = "drop"  # a conversation longer than seq_len + 1 tokens: "drop" it or "truncate" it
    validation_fraction: float = 0.05
    lora_rank: int | None = None  # train LoRA factors of rank r instead of every weight
    lora_alpha: float = 16.0
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 512  # the longest conversation trained on (batches are padded to their own longest)
    lr: float = 1e-3
    warmup_steps: int = 10
    eval_every: int = 50
    save_every: int = 100

    def validate(self, world: int = 1) -> None:
        super().validate(world)
        if not self.model:
            raise ValueError("model: give the model folder (or preset) to fine-tune")
        if (self.data is None) == (self.task is None):
            raise ValueError("data: give either a conversations file (--data) or a built-in task (--task)")
        if self.overflow not in sft.OVERFLOW:
            raise ValueError(f"overflow: must be one of {', '.join(sft.OVERFLOW)}, got {self.overflow!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction: must be in [0, 1), got {self.validation_fraction}")
        if self.task_examples < 1:
            raise ValueError(f"task_examples: must be >= 1, got {self.task_examples}")


def tokenizer_of(cfg: core.TrainConfig) -> Tokenizer:
    """The start model's tokenizer; a preset (random weights) gets the byte-level one."""
    config = core.model_config(cfg)
    if str(cfg.model) in PRESETS and not Path(cfg.model).exists():
        return Tokenizer.byte_level(config)
    return Tokenizer.from_folder(cfg.model, config)


def stage(cfg: SFTConfig, dist: Distributed | None = None) -> tuple[core.Stage, dict[str, int]]:
    """The SFT stage and the counts of its data; everything is read and checked before any model work."""
    dist = dist or Distributed()
    cfg.validate(dist.world)
    tokenizer = tokenizer_of(cfg)
    if cfg.data is not None:
        conversations = sft.read_conversations(cfg.data)
    else:
        conversations = [row["messages"] for row in tasks.sft_rows(tasks.get_task(cfg.task), cfg.task_examples,
                                                                      seed=cfg.seed)]
    examples, counts = sft.encode_conversations(conversations, tokenizer, cfg.seq_len, cfg.overflow)
    train, val = sft.split_validation(examples, cfg.validation_fraction, seed=cfg.seed) if cfg.validation_fraction \
        else (examples, [])
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    counts = {**counts, "train": len(train), "validation": len(val)}

    def validation():  # the same batches at every evaluation
        source = sft.ChatBatches(val, cfg.seq_len, pad, shuffle=False)
        return (source.next_batch(min(cfg.batch_size, len(val))) for _ in range(-(-len(val) // cfg.batch_size)))

    adapter = None
    if cfg.lora_rank is not None:
        from dsv2.align.lora import Lora, LoraConfig

        adapter = Lora(LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha))
    data = sft.ChatBatches(train, cfg.seq_len, pad, seed=cfg.seed)
    return core.Stage("sft", cfg, data, core.next_token_loss, validation if val else None, tokenizer,
                      adapter=adapter), counts


def train(cfg: SFTConfig) -> tuple[dict[str, Any], dict[str, int]]:
    """Fine-tune (or resume); returns the last step's metrics and the data counts (also in RUN/sft_data.json)."""
    with Distributed.from_env() as dist:
        sft_stage, counts = stage(cfg, dist)
        last = core.run(sft_stage, dist)
        if dist.is_main:
            write_text_atomic(Path(cfg.out) / DATA_REPORT, json.dumps(counts, indent=1))
        return last, counts
