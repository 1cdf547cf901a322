"""Pretraining: one step (forward, LM + balance losses, backward, clip, AdamW) and the loop around it.

    train(TrainConfig(model="nano", steps=400))   # what `dsv2 train` runs with no arguments

The run folder holds everything: `tokenizer.json`, `data/` (packed token shards), `metrics.jsonl` (one
line per step, plus validation lines), `checkpoints/step_*` (resumable) and, at the end, `model/` (an HF
layout folder with the tokenizer: `dsv2 generate RUN/model`). A run resumed with `resume=True` continues
from its latest checkpoint and produces the same per-step losses as one that was never interrupted.

Under `torchrun --nproc-per-node N` the same code runs on N processes (`distributed.Distributed.from_env`):
the model is parallelized by `parallel.parallelize` (expert parallel + FSDP2), each rank takes its 1/N of every
global batch of `batch_size` sequences, the logged losses are means over ranks, and rank 0 alone writes the
metrics, progress bar and final model. Checkpoints are collective (`checkpoint.save_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dsv2.config import ModelConfig, resolve_config
from dsv2.data.corpus import iter_documents
from dsv2.data.shards import Batches, TokenShards, build_shards
from dsv2.model import Transformer
from dsv2.model.moe import RoutingRecord
from dsv2.tokenizer import TOKENIZER_FILE, Tokenizer, train_bpe
from dsv2.train import balance, checkpoint, optim, parallel
from dsv2.train.distributed import Distributed
from dsv2.weights import load_model, random_model, save_model

SPECIAL_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]  # ids 0 and 1, as the presets expect


@dataclass
class TrainConfig:
    model: str = "nano"  # preset name, config.json, or checkpoint folder to continue from
    data: str | None = None  # text folder or JSONL; None = the running Python's standard library
    out: str = "runs/nano"
    steps: int = 400
    batch_size: int = 16  # sequences per optimizer step (after accumulation)
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_ramp_start: int | None = None  # ramp the batch size from this over `batch_ramp_steps`
    batch_ramp_steps: int = 0
    bf16: bool = False  # bf16 autocast (weights and optimizer stay fp32)
    activation_checkpointing: bool = False
    # balance losses (paper §2.2.3): None = the paper's values when routing is device-limited, else
    # only the expert-level loss with the config's aux_loss_alpha (DeepSeek-V2-Lite's recipe)
    alpha_expert: float | None = None
    alpha_device: float | None = None
    alpha_comm: float | None = None
    capacity_factor: float | None = None  # device-level token dropping (1.0 = the paper's), None = off
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 2
    seed: int = 0
    max_documents: int | None = 3000  # documents of the corpus to tokenise (None = all)
    tokenizer_documents: int = 1000
    resume: bool = False
    progress: bool = True

    def alphas(self, config: ModelConfig) -> tuple[float, float, float]:
        limited = config.routing_method == "group_limited_greedy" and (config.n_group or 1) > 1
        defaults = (balance.ALPHA_EXPERT, balance.ALPHA_DEVICE, balance.ALPHA_COMM) if limited else (
            config.aux_loss_alpha, 0.0, 0.0)
        chosen = (self.alpha_expert, self.alpha_device, self.alpha_comm)
        return tuple(d if c is None else c for c, d in zip(chosen, defaults, strict=True))


# ------------------------------------------------------------------------------------------- data
def prepare_data(cfg: TrainConfig, config: ModelConfig) -> tuple[Tokenizer, TokenShards, TokenShards]:
    """Train the byte-level BPE and build the shards once per run folder; reuse them afterwards."""
    out = Path(cfg.out)
    tok_path, data_dir = out / TOKENIZER_FILE, out / "data"
    if not tok_path.is_file():
        docs = (d.text for d in itertools.islice(iter_documents(cfg.data), cfg.tokenizer_documents))
        hf = train_bpe(docs, vocab_size=config.vocab_size, special_tokens=SPECIAL_TOKENS)
        tmp = tok_path.with_name(f".{tok_path.name}.tmp")
        hf.save(str(tmp))
        os.replace(tmp, tok_path)
    tokenizer = Tokenizer.from_folder(out, config)
    if not (data_dir / "manifest.json").is_file():
        docs = itertools.islice(iter_documents(cfg.data), cfg.max_documents)
        build_shards(docs, tokenizer, data_dir, progress=cfg.progress, source=str(cfg.data or "python stdlib"))
    train = TokenShards(data_dir, "train", vocab_size=config.vocab_size)
    val = TokenShards(data_dir, "val", vocab_size=config.vocab_size)
    return tokenizer, train, val


# ------------------------------------------------------------------------------------------- step
def routing_losses(
    record: RoutingRecord, config: ModelConfig, alphas: tuple[float, float, float], world: int = 1,
) -> tuple[torch.Tensor, dict[str, float], list[dict[str, Any]]]:
    """Sum of the balance losses over the MoE layers, their values, and per-layer statistics. With `world`
    expert-parallel ranks the devices of the device and comm losses are those ranks."""
    a1, a2, a3 = alphas
    n_devices, topk_devices = parallel.device_groups(config, world)
    total = torch.zeros((), device=record.scores[0].device) if record.scores else torch.zeros(())
    sums = {"expert": 0.0, "device": 0.0, "comm": 0.0}
    layers = []
    for i, (scores, indices) in enumerate(zip(record.scores, record.indices, strict=True)):
        losses, stats = balance.balance_losses(
            scores, indices, n_devices=n_devices, topk_devices=topk_devices,
            alpha_expert=a1, alpha_device=a2, alpha_comm=a3,
        )
        layer = {"losses": {}, "max_over_min": float(stats["load_max_over_min"]), "load": stats["expert_load"].tolist()}
        for name, alpha in zip(("expert", "device", "comm"), alphas, strict=True):
            if alpha > 0 and not losses[name].requires_grad:
                raise RuntimeError(
                    f"alpha_{name}={alpha} is set but the {name}-level balance loss cannot reach the router's "
                    f"gradient in this model (n_group={config.n_group}): unset it"
                )
            layer["losses"][name] = float(losses[name].detach())
            sums[name] += layer["losses"][name]
        total = total + losses["total"]
        if record.kept:
            layer["dropped"] = float(1 - record.kept[i].float().mean())
        layers.append(layer)
    return total, sums, layers


def _dropper(cfg: TrainConfig, config: ModelConfig, batch: int, dist: Distributed):
    """Token dropping for one global batch of `batch` sequences, or None when off."""
    if cfg.capacity_factor is None or (config.routing_method != "group_limited_greedy" and dist.world == 1):
        return None
    n_devices, _ = parallel.device_groups(config, dist.world)
    protected = balance.protected_sequences(batch)  # drawn once per step (the same on every rank), for every layer

    def drop(affinity: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # a device's budget and ranking cover every slot sent to it, from all ranks: decide on the global batch
        # (a few bytes per slot to gather), then keep this rank's part
        keep, _ = balance.drop_tokens(
            dist.gather(affinity), dist.gather(indices), n_experts=config.n_routed_experts, n_devices=n_devices,
            capacity_factor=cfg.capacity_factor, protected=protected,
        )
        return dist.shard(keep)

    return drop


def forward_losses(
    model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig, config: ModelConfig,
    alphas: tuple[float, float, float], dist: Distributed,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], list[dict[str, Any]]]:
    """LM loss and balance losses of one global batch [B,S] (this rank's part of it: its mean), their values and
    per-layer statistics."""
    record = RoutingRecord(drop=_dropper(cfg, config, inputs.shape[0], dist))
    inputs, targets = dist.shard(inputs).to(dist.device), dist.shard(targets).to(dist.device)
    with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        logits = model(inputs, routing=record)
    lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    aux, sums, layer_stats = routing_losses(record, config, alphas, dist.world)
    return lm_loss, aux, sums, layer_stats


def evaluate(model: Transformer, shards: TokenShards, cfg: TrainConfig, dist: Distributed | None = None) -> float:
    """Mean next-token loss over the first `eval_batches` fixed validation batches (no dropping)."""
    dist = dist or Distributed()
    if dist.world > 1:
        _forget_derived(model)
    model.eval()
    batches = Batches(shards, cfg.batch_size, cfg.seq_len, shuffle=False)
    total = 0.0
    with torch.no_grad():
        for inputs, targets in itertools.islice(batches, cfg.eval_batches):
            logits = model(dist.shard(inputs).to(dist.device))
            total += F.cross_entropy(logits.flatten(0, 1).float(), dist.shard(targets).to(dist.device).flatten()).item()
    model.train()
    return dist.mean(total / cfg.eval_batches)[0]


def _forget_derived(model: Transformer) -> None:
    """Drop the cached inference layouts of parameters (`layers.derived`, e.g. the fp32 router): FSDP2 gathers
    each parameter into a fresh buffer per forward, which may reuse the address of an older one, so a cache
    keyed by storage could outlive an optimizer step."""
    for module in model.modules():
        module.__dict__.pop("_derived", None)


# ------------------------------------------------------------------------------------------- loop
def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _check_batch_sizes(cfg: TrainConfig, world: int) -> None:
    """Every global batch (the ramp's too) must split evenly over the ranks."""
    sizes = {optim.batch_size_at(s, cfg.batch_size, cfg.batch_ramp_start, cfg.batch_ramp_steps)
             for s in range(min(cfg.steps, max(cfg.batch_ramp_steps, 1)))} | {cfg.batch_size}
    uneven = sorted(b for b in sizes if b % world)
    if uneven:
        raise ValueError(f"batch_size {uneven[0]} (batch_size={cfg.batch_size}, batch_ramp_start="
                         f"{cfg.batch_ramp_start}) is not divisible by the {world} processes")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; under torchrun, on every rank."""
    dist = Distributed.from_env()
    try:
        return _train(cfg, dist)
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: Distributed) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    config = resolve_config(cfg.model)
    # what would fail after minutes of data preparation fails now
    parallel.check_placement(config, dist.world)
    _check_batch_sizes(cfg, dist.world)
    latest = checkpoint.latest_checkpoint(out) if cfg.resume else None
    if latest is not None:
        checkpoint.check_world_size(latest, dist.world)
    if not dist.is_main:
        dist.barrier()  # rank 0 trains the tokenizer and builds the shards; the others then read them
    tokenizer, train_shards, val_shards = prepare_data(cfg, config)
    if dist.is_main:
        dist.barrier()
    alphas = cfg.alphas(config)

    def make_optimizer(model: Transformer) -> torch.optim.Optimizer:
        return optim.build_optimizer(model, cfg.lr, cfg.weight_decay)

    def prepare(model: Transformer) -> Transformer:
        return parallel.parallelize(model, dist, activation_checkpointing=cfg.activation_checkpointing)

    if latest is not None:
        model, optimizer, state = checkpoint.load_checkpoint(latest, make_optimizer, dist.device, prepare, dist)
        start = state["step"]
        loader = Batches(train_shards, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        loader.load_state_dict(state["loader"])
        if dist.is_main:
            _truncate_metrics(out / "metrics.jsonl", start)  # steps after the checkpoint are redone
    else:
        if cfg.resume and dist.is_main:
            print(f"no checkpoint in {out}: starting from scratch")
        model = (load_model(cfg.model, device=dist.device) if Path(cfg.model).is_dir()
                 else random_model(config, seed=cfg.seed, device=dist.device)).train()
        model = prepare(model)
        optimizer, start = make_optimizer(model), 0
        loader = Batches(train_shards, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        if dist.is_main:
            (out / "metrics.jsonl").unlink(missing_ok=True)
            (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    metrics = open(out / "metrics.jsonl", "a") if dist.is_main else None  # noqa: SIM115 - open for the whole run
    show = cfg.progress and dist.is_main
    bar = tqdm(total=cfg.steps, initial=start, desc="training", unit="step", disable=not show)
    last: dict[str, Any] = {}
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = optim.lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        optim.set_lr(optimizer, lr)
        loader.batch_size = optim.batch_size_at(step, cfg.batch_size, cfg.batch_ramp_start, cfg.batch_ramp_steps)
        lm_total, aux_total, layer_stats, sums = 0.0, 0.0, [], {}
        for _ in range(cfg.grad_accum):
            inputs, targets = next(loader)  # the global batch; each rank trains on its part
            lm_loss, aux, sums, layer_stats = forward_losses(model, inputs, targets, cfg, config, alphas, dist)
            ((lm_loss + aux) / cfg.grad_accum).backward()
            lm_total += lm_loss.item() / cfg.grad_accum
            aux_total += float(aux.detach()) / cfg.grad_accum
        grad_norm = parallel.clip_grad_norm_(model, cfg.grad_clip, dist)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # what is logged is the global batch's: means over ranks (per-layer statistics stay rank 0's part)
        lm_total, aux_total, *balance_sums = dist.mean(lm_total, aux_total, *sums.values())
        sums = dict(zip(sums, balance_sums, strict=True))
        if not math.isfinite(lm_total):
            raise FloatingPointError(f"step {step}: loss is {lm_total}; lower the learning rate ({cfg.lr})")
        dt = time.perf_counter() - t0
        last = {
            "step": step + 1, "loss": lm_total, "balance_loss": aux_total, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": loader.batch_size * cfg.seq_len * cfg.grad_accum / dt,
            "balance": sums, "layers": layer_stats,
        }
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            last["val_loss"] = evaluate(model, val_shards, cfg, dist)
        if metrics is not None:
            metrics.write(json.dumps(last) + "\n")
            metrics.flush()
        bar.set_postfix(loss=f"{lm_total:.3f}", lr=f"{lr:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
        bar.update()
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            checkpoint.save_checkpoint(out, step + 1, model, optimizer, {"loader": loader.state_dict()},
                                       keep_last=cfg.keep_last, dist=dist)
    bar.close()
    full = parallel.full_model(model)  # collective: full weights on rank 0
    if dist.is_main:
        metrics.close()
        final = out / "model"
        save_model(full, final, progress=False)
        tokenizer.save(final)
    return last
