"""Long-context extension, a stage on the training core: YaRN on a model pretrained with plain RoPE (paper §3.1.4).

    train(ExtendConfig(model="runs/nano/model", seq_len=1024, factor=16, steps=60, out="runs/long"))

DeepSeek-V2 pretrains at L0 = 4K, then sets YaRN with scale s = 40 (α = 1, β = 32, target s·L0 = 160K)
and trains 1000 steps at 32K, balance losses on. This stage does that for any model folder: it writes V2's
YaRN settings (`config.yarn_v2`: factor s, original_max_position_embeddings L0, beta_fast 32, beta_slow 1,
mscale = mscale_all_dim = 0.707, so the softmax scale gains (0.0707 ln s + 1)²) with max_position_embeddings
s·L0, and continues next-token training at `seq_len` on the pretraining pipeline's data (`pretrain.prepare_data`,
the model's own tokenizer).

The data is long documents only: every training and validation window of seq_len + 1 tokens lies inside
one document (`shards.document_windows`), because windows that run across several short documents have no
dependence longer than a document to learn. With `retrieval` > 0 that share of each batch is synthetic
pass-key documents (`data.longctx.passkey_document`: a window of the same long documents with a random
5-digit key hidden at a random depth and asked for at the end), which teach retrieval over the whole window.

L0 is what `dsv2 train` recorded (`original_max_position_embeddings`), or `original_length` for a model from
elsewhere; a model that already has YaRN is re-extended from its own L0.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dsv2.config import ConfigError, resolve_config, yarn_v2
from dsv2.data import longctx
from dsv2.tokenizer import Tokenizer
from dsv2.train import core
from dsv2.train.distributed import Distributed
from dsv2.train.pretrain import PackedText, PretrainConfig, prepare_data


@dataclass
class ExtendConfig(PretrainConfig):
    seq_len: int = 1024
    steps: int = 60
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 5
    eval_every: int = 20
    eval_batches: int = 4
    save_every: int = 20
    factor: float | None = None  # YaRN's scale s (None: seq_len / L0)
    original_length: int | None = None  # L0 when the model folder does not record it
    retrieval: float = 0.0  # share of each batch that is synthetic pass-key documents


def original_length(cfg: ExtendConfig) -> int:
    """L0: the model's YaRN original length, else its recorded pretraining length, else `original_length`;
    `original_length` given and different from what the model records is refused."""
    config = resolve_config(cfg.model)
    recorded = ((config.rope_scaling or {}).get("original_max_position_embeddings")
                or config.original_max_position_embeddings)
    if cfg.original_length is not None:
        if isinstance(cfg.original_length, bool) or not isinstance(cfg.original_length, int) or cfg.original_length < 1:
            raise ValueError(f"original_length: must be an integer >= 1, got {cfg.original_length!r}")
        if recorded is not None and recorded != cfg.original_length:
            raise ConfigError(f"original_length: {cfg.model} was pretrained at {recorded} tokens "
                              f"(original_max_position_embeddings), not {cfg.original_length}")
        return cfg.original_length
    if recorded is None:
        raise ConfigError(f"{cfg.model}: its config records no pretraining length (original_max_position_embeddings"
                          f"); pass original_length (--original-length L0)")
    return int(recorded)


def extension_overrides(cfg: ExtendConfig) -> dict[str, Any]:
    """The config fields the extension sets: V2's YaRN at factor s from L0, and s·L0 positions."""
    l0 = original_length(cfg)
    factor = cfg.factor if cfg.factor is not None else cfg.seq_len / l0
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(f"factor: must be a number > 1 (an extension), got {factor!r}")
    context = math.floor(factor * l0)
    if cfg.seq_len > context:
        raise ValueError(f"seq_len: {cfg.seq_len} is past the extended context factor x L0 = {factor} x {l0} = "
                         f"{context}; raise --factor")
    return {"rope_scaling": yarn_v2(float(factor), l0), "max_position_embeddings": context,
            "original_max_position_embeddings": l0}


class WithRetrieval:
    """A `core.DataSource`: batches of long-document windows, the first round(retrieval · B) rows of each
    replaced by pass-key documents built from the next windows (seeded by the step, so a resumed run
    draws the same ones)."""

    def __init__(self, text: PackedText, tokenizer: Tokenizer, retrieval: float, seed: int):
        self.text, self.tokenizer, self.retrieval, self.seed = text, tokenizer, retrieval, seed
        self.drawn = 0  # batches drawn, the only state beyond the text's

    def next_batch(self, batch_size: int) -> core.Batch:
        batch = self.text.next_batch(batch_size)
        rng = np.random.default_rng([self.seed, self.drawn])
        self.drawn += 1
        seq_len = batch.inputs.shape[1]
        for row in range(round(self.retrieval * batch_size)):
            haystack = torch.cat([batch.inputs[row], batch.targets[row, -1:]]).tolist()
            ids = longctx.passkey_document(self.tokenizer, haystack, seq_len + 1, rng)
            batch.inputs[row], batch.targets[row] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"text": self.text.state_dict(), "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.text.load_state_dict(state["text"])
        self.drawn = int(state["drawn"])


def stage(cfg: ExtendConfig, dist: Distributed) -> core.Stage:
    """Validate, set the YaRN overrides, prepare the data (the model's tokenizer kept), describe the stage."""
    cfg.validate(dist.world)
    if not 0 <= cfg.retrieval <= 1:
        raise ValueError(f"retrieval: must be a share of the batch in [0, 1], got {cfg.retrieval!r}")
    cfg = dataclasses.replace(cfg, config_overrides={**cfg.config_overrides, **extension_overrides(cfg)})
    tokenizer, train_shards, val_shards = prepare_data(cfg, dist)
    data: core.DataSource = PackedText(train_shards, cfg.seq_len, seed=cfg.seed, within_documents=True)
    if cfg.retrieval:
        data = WithRetrieval(data, tokenizer, cfg.retrieval, cfg.seed)

    def validation() -> Iterator[core.Batch]:  # the same long-document windows at every evaluation
        source = PackedText(val_shards, cfg.seq_len, shuffle=False, within_documents=True)
        return (source.next_batch(cfg.batch_size) for _ in itertools.count())

    return core.Stage("extend", cfg, data, core.next_token_loss, validation, tokenizer)


def train(cfg: ExtendConfig) -> dict[str, Any]:
    """Run (or resume) the extension; under torchrun, on every rank."""
    with Distributed.from_env() as dist:
        return core.run(stage(cfg, dist), dist)
