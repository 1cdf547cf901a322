"""Pretraining, a stage on the training core: the next-token loss on packed token shards (the paper's recipe).

    train(PretrainConfig(model="nano", steps=400))   # what `dsv2 train` runs with no arguments

The run folder holds everything: `tokenizer.json`, `data/` (packed token shards), `metrics.jsonl` (one line per
step, with validation lines), `checkpoints/step_*` (resumable) and, at the end, `model/` (a Hugging Face layout
folder with the tokenizer: `dsv2 generate RUN/model`). Under `torchrun` rank 0 prepares the data and the others
wait for it; everything else is `core.run`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv2.atomic import atomic_path
from dsv2.config import ModelConfig
from dsv2.data.corpus import iter_documents
from dsv2.data.shards import Batches, TokenShards, build_shards
from dsv2.tokenizer import TOKENIZER_FILE, Tokenizer, train_bpe
from dsv2.train import core
from dsv2.train.distributed import Distributed

SPECIAL_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]  # ids 0 and 1, as the presets expect


@dataclass
class PretrainConfig(core.TrainConfig):
    data: str | None = None  # text folder or JSONL; None = the running Python's standard library
    max_documents: int | None = 3000  # documents of the corpus to tokenise (None = all)
    tokenizer_documents: int = 1000


class PackedText:
    """A `core.DataSource` over one split of packed shards: windows of seq_len + 1 tokens in a seeded order."""

    def __init__(self, shards: TokenShards, seq_len: int, seed: int = 0, shuffle: bool = True):
        self.batches = Batches(shards, 1, seq_len, seed=seed, shuffle=shuffle)

    def next_batch(self, batch_size: int) -> core.Batch:
        self.batches.batch_size = batch_size
        inputs, targets = next(self.batches)
        return core.Batch(inputs, targets)

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)


def prepare_data(cfg: PretrainConfig, config: ModelConfig) -> tuple[Tokenizer, TokenShards, TokenShards]:
    """Train the byte-level BPE and build the shards once per run folder; reuse them afterwards."""
    out = Path(cfg.out)
    tok_path, data_dir = out / TOKENIZER_FILE, out / "data"
    if not tok_path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        docs = (d.text for d in itertools.islice(iter_documents(cfg.data), cfg.tokenizer_documents))
        hf = train_bpe(docs, vocab_size=config.vocab_size, special_tokens=SPECIAL_TOKENS)
        with atomic_path(tok_path) as tmp:
            hf.save(str(tmp))
    tokenizer = Tokenizer.from_folder(out, config)
    if not (data_dir / "manifest.json").is_file():
        docs = itertools.islice(iter_documents(cfg.data), cfg.max_documents)
        build_shards(docs, tokenizer, data_dir, progress=cfg.progress, source=str(cfg.data or "python stdlib"))
    train = TokenShards(data_dir, "train", vocab_size=config.vocab_size)
    val = TokenShards(data_dir, "val", vocab_size=config.vocab_size)
    return tokenizer, train, val


def stage(cfg: PretrainConfig, dist: Distributed) -> core.Stage:
    """Validate, prepare the data (rank 0; the others wait and read it), and describe the stage."""
    cfg.validate(dist.world)
    config = core.model_config(cfg)
    if not dist.is_main:
        dist.barrier()
    tokenizer, train_shards, val_shards = prepare_data(cfg, config)
    if dist.is_main:
        dist.barrier()

    def validation() -> Iterator[core.Batch]:  # the same fixed batches at every evaluation
        source = PackedText(val_shards, cfg.seq_len, shuffle=False)
        return (source.next_batch(cfg.batch_size) for _ in itertools.count())

    return core.Stage("pretrain", cfg, PackedText(train_shards, cfg.seq_len, seed=cfg.seed), core.next_token_loss,
                      validation, tokenizer)


def train(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) pretraining; under torchrun, on every rank."""
    dist = Distributed.from_env()
    try:
        return core.run(stage(cfg, dist), dist)
    finally:
        dist.close()

