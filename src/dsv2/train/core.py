"""The one training core every stage runs on: `train_step` (one optimizer step) and `run` (the loop around it).

A stage is a `TrainConfig`, a `DataSource` (batches, and a position a checkpoint can save) and an objective
(logits and batch -> a loss per target token). Pretraining (`train/pretrain.py`) is the next-token loss on packed
shards; supervised fine-tuning is the same loss masked to the assistant's tokens; a policy-gradient loss weighs
each token by its advantage; the long-context stage is pretraining started from a model folder with
`config_overrides` (rope_scaling, max_position_embeddings). None of them has its own optimizer, checkpoint or
resume code: that is all here.

    train_step: global batch -> micro-batches (gradient accumulation) -> this rank's part of each -> forward
                (routing comes back as values) -> objective + balance losses -> `backward` -> clip -> AdamW at
                the step's learning rate from the schedule
    run:        validate -> model (preset, config or model folder, with overrides; or the latest checkpoint) ->
                parallelize (expert parallel + FSDP2 under torchrun) -> token dropping -> steps, metrics.jsonl,
                evaluation, atomic checkpoints -> RUN/model

The loss of a step is the mean over every weighted target token of the global batch, whatever the number of
micro-batches and processes: each part contributes Σ loss·weight / (the global batch's Σ weight), times the
number of ranks because FSDP averages gradients over them. A run resumed from a checkpoint (any step, even after
SIGKILL) logs the same per-step losses as one never interrupted.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dsv2.atomic import write_text_atomic
from dsv2.config import ConfigError, ModelConfig, resolve_config
from dsv2.model import Transformer
from dsv2.tokenizer import Tokenizer
from dsv2.train import balance, checkpoint, optim, parallel
from dsv2.train.distributed import Distributed
from dsv2.weights import load_model, random_model, save_model

METRICS_FILE = "metrics.jsonl"


# ------------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """A global batch of B sequences of S tokens (every rank holds all of it, and trains on its part)."""

    inputs: torch.Tensor  # [B,S] token ids
    targets: torch.Tensor  # [B,S] the token each position predicts
    weights: torch.Tensor | None = None  # [B,S] float: how much each target counts in the loss (None: all 1)
    token_mask: torch.Tensor | None = None  # [B,S] bool: real tokens (None: no padding); balance losses and
    #                                         token dropping ignore the others
    columns: dict[str, torch.Tensor] = field(default_factory=dict)  # [B,...] more per-row data for the
    #                                         objective (GRPO: advantages, the rollout's log-probabilities)
    replay: torch.Tensor | None = None  # [B,S,L,K] experts to route each token to (`Transformer.forward`)
    denominator: float | None = None  # what the global batch's Σ loss·weight is divided by (None: Σ weight)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def loss_weights(self) -> torch.Tensor:
        return torch.ones(self.targets.shape) if self.weights is None else self.weights.float()

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        def opt(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return Batch(fn(self.inputs), fn(self.targets), opt(self.weights), opt(self.token_mask),
                     {k: fn(v) for k, v in self.columns.items()}, opt(self.replay), self.denominator)

    def select(self, rows: slice) -> Batch:
        return self._map(lambda t: t[rows])

    def part(self, dist: Distributed) -> Batch:
        """This rank's contiguous part, on its device."""
        n = len(self)
        return self.select(slice(dist.rank * n // dist.world, (dist.rank + 1) * n // dist.world)).to(dist.device)

    def split(self, parts: int) -> list[Batch]:
        """`parts` micro-batches of equal size (len divisible by parts, checked by `TrainConfig.validate`)."""
        size = len(self) // parts
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(parts)]

    def to(self, device: torch.device) -> Batch:
        return self._map(lambda t: t.to(device))

class DataSource(Protocol):
    """Where a stage's training batches come from; its state is its position, saved in every checkpoint."""

    def next_batch(self, batch_size: int) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


Objective = Callable[[torch.Tensor, Batch], torch.Tensor]  # (logits [B,S,V] fp32, batch) -> loss per token [B,S]


def next_token_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy of each target token [B,S]: pretraining's objective, and SFT's with weights on the replies."""
    return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none").view(batch.targets.shape)


# -------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """What every stage shares. `batch_size` sequences of `seq_len` tokens per optimizer step, split into
    `grad_accum` micro-batches and, under torchrun, over the processes."""

    model: str = "nano"  # preset name, config.json, or model folder to start from
    config_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields to change first
    out: str = "runs/nano"
    steps: int = 400
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_ramp_start: int | None = None  # ramp the batch size from this to batch_size over batch_ramp_steps
    batch_ramp_steps: int = 0
    bf16: bool = False  # bf16 autocast (weights, optimizer and router stay fp32)
    activation_checkpointing: bool = False
    # balance losses (paper §2.2.3): None = balance.default_alphas
    alpha_expert: float | None = None
    alpha_device: float | None = None
    alpha_comm: float | None = None
    capacity_factor: float | None = None  # device-level token dropping (1.0 = the paper's), None = off
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 2
    seed: int = 0
    resume: bool = False
    progress: bool = True

    def schedule(self) -> optim.Schedule:
        return optim.Schedule(self.steps, self.lr, self.warmup_steps, self.batch_size, self.seq_len,
                              self.batch_ramp_start, self.batch_ramp_steps)

    def validate(self, world: int = 1) -> None:
        """Raise, naming the field, before any work: every batch of the run must split into `grad_accum`
        micro-batches and those over the `world` processes."""
        def fail(name: str, msg: str) -> None:
            raise ValueError(f"{name}: {msg}")

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "save_every",
                     "keep_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, f"must be an integer >= 1, got {value!r}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                fail(name, f"must be positive, got {getattr(self, name)!r}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            fail("warmup_steps" if self.warmup_steps < 0 else "weight_decay", "must be >= 0")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            fail("capacity_factor", f"must be positive, got {self.capacity_factor!r}")
        if self.batch_ramp_start is not None and not 1 <= self.batch_ramp_start <= self.batch_size:
            fail("batch_ramp_start", f"must be in [1, batch_size={self.batch_size}], got {self.batch_ramp_start}")
        schedule = self.schedule()
        for size in sorted(schedule.batch_sizes()):
            if size % (self.grad_accum * world):
                fail("batch_size", f"{size} sequences (batch_size={self.batch_size}, batch_ramp_start="
                     f"{self.batch_ramp_start}) do not split into grad_accum={self.grad_accum} micro-batches "
                     f"over {world} process(es)")


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The config the run trains: the model's, with `config_overrides` applied (and validated)."""
    config = resolve_config(cfg.model)
    if not cfg.config_overrides:
        return config
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra", "absent_keys"}
    unknown = sorted(set(cfg.config_overrides) - known)
    if unknown:
        raise ConfigError(f"config_overrides: {unknown[0]!r} is not a ModelConfig field")
    return ModelConfig.from_dict({**config.to_dict(), **cfg.config_overrides})


def initial_model(cfg: TrainConfig, config: ModelConfig, device: torch.device) -> Transformer:
    """A model folder's weights (under the overridden config), or random weights for a preset or config."""
    if not Path(cfg.model).is_dir():
        return random_model(config, seed=cfg.seed, device=device).train()
    loaded = load_model(cfg.model, device=device, progress=False)
    if loaded.config == config:
        return loaded.train()
    model = random_model(config, device=device)  # the overrides change derived constants (RoPE, softmax scale)
    try:
        model.load_state_dict(loaded.state_dict())
    except RuntimeError as e:
        raise ConfigError(f"config_overrides {sorted(cfg.config_overrides)} change the shape of {cfg.model}'s "
                          f"weights: {e}") from None
    return model.train()


# --------------------------------------------------------------------------------------------- step
@dataclass
class StepContext:
    """What `train_step` needs besides the model and batch, fixed for a run."""

    objective: Objective
    alphas: tuple[float, float, float]
    n_devices: int  # D and M of the device / comm losses (the EP ranks, or the Gate's groups on one process)
    topk_devices: int
    grad_accum: int = 1
    grad_clip: float = 1.0
    bf16: bool = False
    dropping: balance.TokenDropping | None = None
    dist: Distributed = field(default_factory=Distributed)


def backward(model: Transformer, batch: Batch, ctx: StepContext) -> dict[str, Any]:
    """Forward and backward of a global batch, gradients accumulated over its micro-batches; returns its
    losses (means over the whole global batch) and rank 0's per-layer statistics of the last micro-batch."""
    dist = ctx.dist
    total_weight = batch.loss_weights().sum().clamp(min=1e-12) if batch.denominator is None else batch.denominator
    loss_sum, aux_sum, sums, layers = 0.0, 0.0, {}, []
    for micro in batch.split(ctx.grad_accum):
        if ctx.dropping is not None:  # protected sequences are drawn per forward, on the global micro-batch
            ctx.dropping.new_batch(len(micro), micro.token_mask)
        part = micro.part(dist)
        with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
            logits, routings = model(part.inputs, return_routing=True, replay=part.replay)
        token_loss = ctx.objective(logits.float(), part)
        loss = (token_loss * part.loss_weights().to(token_loss.device)).sum() * (dist.world / total_weight)
        aux, sums, layers = balance.routing_losses(routings, ctx.alphas, ctx.n_devices, ctx.topk_devices,
                                                   mask=part.token_mask)
        (loss + aux / ctx.grad_accum).backward()
        loss_sum += loss.item() / dist.world
        aux_sum += float(aux.detach()) / ctx.grad_accum
    # every rank's part of the loss adds up to the global mean; the balance losses are means over sequences
    loss_sum, aux_sum, *balance_sums = dist.mean(loss_sum, aux_sum, *sums.values())
    return {"loss": loss_sum * dist.world, "balance_loss": aux_sum,
            "balance": dict(zip(sums, balance_sums, strict=True)), "layers": layers}


def train_step(model: Transformer, batch: Batch, optimizer: torch.optim.Optimizer, lr: float,
               ctx: StepContext) -> dict[str, Any]:
    """One optimizer step on a global batch: `backward`, clip the global gradient norm, AdamW at `lr`."""
    result = backward(model, batch, ctx)
    result["grad_norm"] = parallel.clip_grad_norm_(model, ctx.grad_clip, ctx.dist)
    optim.set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result


@torch.no_grad()
def evaluate(model: Transformer, batches: Iterable[Batch], objective: Objective = next_token_loss,
             dist: Distributed | None = None) -> float:
    """Weighted mean loss over fixed batches, in eval mode (no token dropping)."""
    dist = dist or Distributed()
    was_training = model.training
    model.eval()
    total = weight = 0.0
    for batch in batches:
        part = batch.part(dist)
        w = part.loss_weights().to(dist.device)
        total += (objective(model(part.inputs, replay=part.replay).float(), part) * w).sum().item()
        weight += w.sum().item()
    model.train(was_training)
    total, weight = dist.mean(total, weight)
    return total / max(weight, 1e-12)


# --------------------------------------------------------------------------------------------- loop
class Adapter(Protocol):
    """Trainable parameters added to a frozen model (LoRA: `dsv2.align.lora.Lora`)."""

    def apply(self, model: Transformer) -> None: ...  # in place: freeze the base, add the adapter

    def merged(self, model: Transformer) -> Transformer: ...  # a new plain model with the adapter folded in

    def save(self, model: Transformer, folder: Path, base_model_name_or_path: str = "") -> None: ...

    def load(self, model: Transformer, folder: Path) -> None: ...


@dataclass
class Stage:
    """One training stage: its config, its data, its objective; validation batches, a tokenizer, an adapter
    and the stage's own hooks optional."""

    name: str
    config: TrainConfig
    data: DataSource
    objective: Objective = next_token_loss
    validation: Callable[[], Iterable[Batch]] | None = None  # a fresh iterable of the fixed validation batches
    tokenizer: Tokenizer | None = None  # saved beside RUN/model
    adapter: Adapter | None = None  # train only this on the frozen start model (one process)
    on_model: Callable[[Transformer], None] | None = None  # given the model before the first step: a stage
    #                                                        whose data comes from the model (GRPO) takes it here
    metrics: Callable[[], dict[str, Any]] | None = None  # the stage's own figures of the step just taken

def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of steps after `step` (a resumed run redoes them)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_text_atomic(path, "".join(line + "\n" for line in keep))


def run(stage: Stage, dist: Distributed | None = None) -> dict[str, Any]:
    """Train (or resume) a stage; under torchrun, on every rank. Returns the last step's metrics ({} when a
    resumed run had already reached `steps`)."""
    dist = dist or Distributed()
    cfg = stage.config
    cfg.validate(dist.world)
    out = Path(cfg.out)
    config = model_config(cfg)
    parallel.check_placement(config, dist.world)
    schedule = cfg.schedule()
    alphas = balance.default_alphas(config, cfg.alpha_expert, cfg.alpha_device, cfg.alpha_comm)
    n_devices, topk_devices = parallel.device_groups(config, dist.world)
    latest = checkpoint.latest_checkpoint(out) if cfg.resume else None
    torch.manual_seed(cfg.seed)

    def make_optimizer(model: Transformer) -> torch.optim.Optimizer:
        return optim.build_optimizer(model, cfg.lr, cfg.weight_decay)

    def prepare(model: Transformer) -> Transformer:
        return parallel.parallelize(model, dist, activation_checkpointing=cfg.activation_checkpointing)

    adapter = stage.adapter
    if adapter is not None and (dist.world > 1 or cfg.activation_checkpointing):
        raise ValueError(f"{stage.name}: an adapter (LoRA) trains on one process without activation checkpointing")
    if latest is not None:
        base = None
        if adapter is not None:  # the frozen weights are the start model's; the checkpoint holds the adapter
            base = initial_model(cfg, config, dist.device)
            adapter.apply(base)
            adapter.load(base, latest / checkpoint.ADAPTER_DIR)
        model, optimizer, state = checkpoint.load_checkpoint(latest, make_optimizer, dist.device, prepare, dist,
                                                             model=base)
        start = state["step"]
        stage.data.load_state_dict(state["data"])
        if dist.is_main:
            _truncate_metrics(out / METRICS_FILE, start)
    else:
        if cfg.resume and dist.is_main:
            print(f"no checkpoint in {out}: starting from scratch")
        model = initial_model(cfg, config, dist.device)
        if adapter is not None:
            adapter.apply(model)
        model = prepare(model)
        optimizer, start = make_optimizer(model), 0
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / METRICS_FILE).unlink(missing_ok=True)
            write_text_atomic(out / "train_config.json",
                              json.dumps({"stage": stage.name, **dataclasses.asdict(cfg)}, indent=1))
    if stage.on_model is not None:
        stage.on_model(model)
    dropping = None
    if cfg.capacity_factor is not None and n_devices > 1:  # with one device there is nothing to balance
        dropping = balance.install_token_dropping(model, cfg.capacity_factor, n_devices, dist)
    ctx = StepContext(stage.objective, alphas, n_devices, topk_devices, cfg.grad_accum, cfg.grad_clip, cfg.bf16,
                      dropping, dist)

    metrics = open(out / METRICS_FILE, "a") if dist.is_main else None  # noqa: SIM115 - open for the whole run
    bar = tqdm(total=cfg.steps, initial=start, desc=stage.name, unit="step",
               disable=not (cfg.progress and dist.is_main))
    last: dict[str, Any] = {}
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr, size = schedule.lr_at(step), schedule.batch_size_at(step)
            result = train_step(model, stage.data.next_batch(size), optimizer, lr, ctx)
            if not math.isfinite(result["loss"]):
                raise FloatingPointError(f"step {step + 1}: loss is {result['loss']}; lower the learning rate "
                                         f"({cfg.lr})")
            last = {"step": step + 1, "lr": lr, "batch_size": size, "tokens": schedule.tokens_before(step + 1),
                    "tokens_per_s": size * cfg.seq_len / (time.perf_counter() - t0), **result}
            if stage.validation is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                batches = itertools.islice(stage.validation(), cfg.eval_batches)
                last["val_loss"] = evaluate(model, batches, stage.objective, dist)
            if stage.metrics is not None:
                last.update(stage.metrics())
            if metrics is not None:
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
            bar.set_postfix(loss=f"{result['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
            bar.update()
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                checkpoint.save_checkpoint(out, step + 1, model, optimizer, {"data": stage.data.state_dict()},
                                           keep_last=cfg.keep_last, dist=dist, adapter=adapter)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    full = parallel.full_model(model)  # collective: full weights on rank 0
    if dist.is_main:
        if adapter is not None:
            adapter.save(full, out / checkpoint.ADAPTER_DIR, base_model_name_or_path=str(cfg.model))
            full = adapter.merged(full)
        save_model(full, out / "model", progress=False)
        if stage.tokenizer is not None:
            stage.tokenizer.save(out / "model")
    return last
