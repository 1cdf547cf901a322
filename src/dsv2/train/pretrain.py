"""Pretraining, a stage on the training core: the next-token loss on packed token shards (the paper's recipe).

    train(PretrainConfig(model="nano", steps=400))   # what `dsv2 train` runs with no arguments

The run folder holds everything: `tokenizer.json`, `data/` (packed token shards), `metrics.jsonl` (one line per
step, with validation lines), `checkpoints/step_*` (resumable) and, at the end, `model/` (a Hugging Face layout
folder with the tokenizer: `dsv2 generate RUN/model`). The data is prepared by `data.prepare.prepare_run_data`
(checked before anything is written, deduplicated; a model folder's own tokenizer is kept); under `torchrun`
rank 0 prepares it and the others wait. Everything else is `core.run`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv2.data.dedup import DEFAULT_THRESHOLD
from dsv2.data.prepare import DEFAULT_MAX_DOCUMENTS, DEFAULT_TOKENIZER_DOCUMENTS, prepare_run_data
from dsv2.data.shards import Batches, TokenShards, document_windows
from dsv2.tokenizer import TOKENIZER_FILE, Tokenizer
from dsv2.train import core
from dsv2.train.distributed import Distributed


@dataclass
class PretrainConfig(core.TrainConfig):
    data: str | None = None  # text folder or JSONL; None = the running Python's standard library
    max_documents: int | None = DEFAULT_MAX_DOCUMENTS  # documents of the corpus to tokenise (None = all)
    tokenizer_documents: int = DEFAULT_TOKENIZER_DOCUMENTS
    dedup: bool = True  # drop exact and near-duplicate documents (data/dedup.py)
    near_duplicate_threshold: float = DEFAULT_THRESHOLD


class PackedText:
    """A `core.DataSource` over one split of packed shards: windows of seq_len + 1 tokens in a seeded order;
    with `within_documents`, only windows inside one document (`shards.document_windows`)."""

    def __init__(self, shards: TokenShards, seq_len: int, seed: int = 0, shuffle: bool = True,
                 within_documents: bool = False):
        windows = document_windows(shards, seq_len) if within_documents else None
        self.batches = Batches(shards, 1, seq_len, seed=seed, shuffle=shuffle, windows=windows)

    def next_batch(self, batch_size: int) -> core.Batch:
        self.batches.batch_size = batch_size
        inputs, targets = next(self.batches)
        return core.Batch(inputs, targets)

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)


def recording_length(cfg: PretrainConfig) -> PretrainConfig:
    """`cfg` with the model's pretraining length set to its seq_len when it has plain RoPE (L0 of a later
    `dsv2 extend`, paper §3.1.4: V2 pretrains at 4K), unless the overrides already say it."""
    config = core.model_config(cfg)
    if config.rope_scaling is not None or "original_max_position_embeddings" in cfg.config_overrides:
        return cfg
    return dataclasses.replace(cfg, config_overrides={**cfg.config_overrides,
                                                      "original_max_position_embeddings": cfg.seq_len})


def prepare_data(cfg: PretrainConfig, dist: Distributed) -> tuple[Tokenizer, TokenShards, TokenShards]:
    """The run's tokenizer and train / validation shards: built by rank 0 (the others wait and read them);
    a model folder's own tokenizer is kept."""
    config = core.model_config(cfg)
    if not dist.is_main:
        dist.barrier()
    tokenizer, train_shards, val_shards = prepare_run_data(
        cfg.out, cfg.data, config, max_documents=cfg.max_documents, tokenizer_documents=cfg.tokenizer_documents,
        dedup=cfg.dedup, near_duplicate_threshold=cfg.near_duplicate_threshold, progress=cfg.progress and dist.is_main,
        tokenizer_from=cfg.model if (Path(cfg.model) / TOKENIZER_FILE).is_file() else None,
    )
    if dist.is_main:
        dist.barrier()
    return tokenizer, train_shards, val_shards


def stage(cfg: PretrainConfig, dist: Distributed,
          prepared: tuple[Tokenizer, TokenShards, TokenShards] | None = None) -> core.Stage:
    """Validate, record the pretraining length, prepare the data (unless `prepared` gives it: the runs of an
    ablation study share one tokenizer and one set of shards), and describe the stage."""
    cfg.validate(dist.world)
    cfg = recording_length(cfg)
    tokenizer, train_shards, val_shards = prepared or prepare_data(cfg, dist)

    def validation() -> Iterator[core.Batch]:  # the same fixed batches at every evaluation
        source = PackedText(val_shards, cfg.seq_len, shuffle=False)
        return (source.next_batch(cfg.batch_size) for _ in itertools.count())

    return core.Stage("pretrain", cfg, PackedText(train_shards, cfg.seq_len, seed=cfg.seed), core.next_token_loss,
                      validation, tokenizer)


def train(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) pretraining; under torchrun, on every rank."""
    with Distributed.from_env() as dist:
        return core.run(stage(cfg, dist), dist)

