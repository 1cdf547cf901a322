"""GRPO (DeepSeekMath §4.1; DeepSeek-V2 §4): reinforcement learning with group-relative advantages, no critic.

Symbols (one rollout batch of B = P·G sequences: P prompts q, G sampled completions o_i each):

    r_i                         reward of completion i (a task's, or the user's `reward(prompts, completions, **cols)`)
    A_i = (r_i − mean_g r) / (std_g r + 1e-4)     group-relative advantage, the same for every token of o_i
    ρ_t = π_θ(o_t | q, o_<t) / π_old(o_t | ...)  per-token ratio; π_old = the policy that sampled the batch
    L_t = −min(ρ_t A_i, clip(ρ_t, 1 − ε, 1 + ε) A_i) + β·KL_t
    KL_t = π_ref/π_θ − log(π_ref/π_θ) − 1         k3 estimator of KL(π_θ ‖ π_ref), per token, in the loss

    loss_type "grpo":    (1/B) Σ_i (1/|o_i|) Σ_t L_t     (the paper's: mean over each answer, then over answers)
              "dr_grpo": (1/(B·T_max)) Σ_i Σ_t L_t     (Dr. GRPO: no length bias; T_max = max completion tokens)
              "dapo":    Σ_i Σ_t L_t / Σ_i |o_i|          (TRL's default: mean over the batch's tokens)

A step of the training core (`train/core.py`) is one optimizer step; a rollout batch serves μ =
`inner_iterations` of them (π_old stays the policy that sampled it, so ρ ≠ 1 from the second on). The
normalisations are the core's weighted mean: per-token weights 1/|o_i| (grpo) or 1, over a denominator of B,
B·T_max or the token count. The MoE balance losses stay on, over every real token of the batch.

Rollouts come from dsv2's own engine (continuous batching, latent cache, absorbed decode), on a copy of the
policy's weights made at every rollout, in `rollout_dtype`. The engine records each sampled token's log p,
and `logprob_diff` (logged every step) is the mean |log π_engine − log π_trainer| over the same tokens: the
train/inference mismatch. The engine also records the experts every token was routed to, and
`routing_mismatch` is the share of (token, MoE layer) pairs where the trainer's router would choose other
experts. With `routing_replay` (R3, arXiv 2510.11370) the trainer's forwards (π_old, π_θ, π_ref) route to
exactly the engine's, so the mismatch left is numerical only.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dsv2.data import tasks
from dsv2.infer.engine import LLMEngine, RequestOutput
from dsv2.infer.sampling import SamplingParams
from dsv2.model import Transformer
from dsv2.model.moe import MoE
from dsv2.tokenizer import Tokenizer
from dsv2.train import core
from dsv2.train.distributed import Distributed
from dsv2.weights import load_model

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
ADVANTAGE_EPS = 1e-4  # TRL's: a group whose rewards differ by less than this gets damped, not exploded


@dataclass
class GRPOConfig(core.TrainConfig):
    """`batch_size` completions per step: batch_size / group_size prompts, group_size samples each."""

    model: str = ""  # the model folder to start from (an SFT run's RUN/model); the reference policy too
    out: str = "runs/grpo"
    task: str | None = None  # a built-in task (`data/tasks.py`), or:
    reward: str | None = None  # MODULE:FUNCTION or file.py:FUNCTION with TRL's signature, and
    prompts: str | None = None  # a JSONL prompt file ({"prompt"} or {"messages"} rows plus reward columns)
    prompt_rows: int = 4096  # prompts drawn from a task
    steps: int = 60
    batch_size: int = 128  # 16 prompts × 8: fewer prompts per step made nano's updates too noisy to help
    group_size: int = 8  # G
    max_completion_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0
    epsilon: float = 0.2  # ε of the clipped ratio
    beta: float = 0.04  # β of the KL penalty (DeepSeekMath's); 0: no reference model
    loss_type: str = "grpo"
    scale_rewards: bool = True  # divide by the group's std (False: Dr. GRPO's r − mean)
    inner_iterations: int = 1  # μ optimizer steps per rollout batch
    routing_replay: bool = False
    rollout_dtype: str = "float32"
    lora_rank: int | None = None
    lora_alpha: float = 16.0
    lr: float = 1e-4
    warmup_steps: int = 10  # Adam's first steps move every weight by ~lr whatever the (noisy) gradient
    weight_decay: float = 0.0
    eval_every: int = 20
    save_every: int = 20

    def validate(self, world: int = 1) -> None:
        super().validate(world)

        def fail(name: str, msg: str) -> None:
            raise ValueError(f"{name}: {msg}")

        if world != 1:
            fail("world", "GRPO runs on one process (its rollouts use the engine on the policy's weights)")
        if not self.model:
            fail("model", "give the model folder to start from (e.g. an SFT run's RUN/model)")
        if (self.task is None) == (self.reward is None and self.prompts is None):
            fail("task", "give either a built-in task or a reward (MODULE:FUNCTION) with a prompts file")
        if self.task is None and (self.reward is None or self.prompts is None):
            fail("reward" if self.reward is None else "prompts", "a user reward needs both --reward and --prompts")
        if self.group_size < 2 or self.batch_size % self.group_size:
            fail("group_size", f"must be >= 2 and divide batch_size={self.batch_size}, got {self.group_size}")
        for name in ("max_completion_tokens", "inner_iterations", "prompt_rows"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}")
        if self.save_every % self.inner_iterations or self.steps % self.inner_iterations:
            fail("save_every", f"save_every={self.save_every} and steps={self.steps} must be multiples of "
                 f"inner_iterations={self.inner_iterations}, so a checkpoint never falls inside a rollout batch")
        if not self.epsilon > 0 or self.beta < 0 or not self.temperature > 0:
            fail("epsilon" if not self.epsilon > 0 else "beta" if self.beta < 0 else "temperature",
                 "epsilon and temperature must be positive, beta >= 0")
        if self.loss_type not in LOSS_TYPES:
            fail("loss_type", f"must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.rollout_dtype not in ("float32", "bfloat16"):
            fail("rollout_dtype", f"must be float32 or bfloat16, got {self.rollout_dtype!r}")
        if self.capacity_factor is not None:
            fail("capacity_factor", "token dropping is off in GRPO: π_old and π_θ must see the same experts")


# ------------------------------------------------------------------------------------------------ loss
def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """[P·G] rewards, groups contiguous -> A_i = (r_i − mean) / (std + eps), or r_i − mean unscaled."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    return centred.flatten()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log π(target) at every position: [B,S,V] fp32, [B,S] -> [B,S]."""
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def grpo_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    epsilon: float, beta: float = 0.0, ref_logprobs: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: (L_t, KL_t, whether the clip is active) for [B,S] log-probs and [B] advantages."""
    adv = advantages.unsqueeze(-1)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped_ratio = ratio.clamp(1 - epsilon, 1 + epsilon)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    # the clip is what the min picks where it differs: above 1+ε with A > 0, below 1−ε with A < 0
    clipped = ((ratio > 1 + epsilon) & (adv > 0)) | ((ratio < 1 - epsilon) & (adv < 0))
    kl = torch.zeros_like(loss)
    if ref_logprobs is not None:
        log_ref_ratio = ref_logprobs - logprobs
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        loss = loss + beta * kl
    return loss, kl, clipped


def loss_weights(completion_mask: torch.Tensor, loss_type: str, max_completion_tokens: int,
                 ) -> tuple[torch.Tensor, float | None]:
    """The core's per-token weights and denominator that make its weighted mean `loss_type`'s normalisation."""
    mask = completion_mask.float()
    if loss_type == "grpo":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1), float(len(mask))
    if loss_type == "dr_grpo":
        return mask, float(len(mask) * max_completion_tokens)
    return mask, None  # dapo: Σ weights = the batch's completion tokens


class GRPOObjective:
    """The core's objective for GRPO batches; keeps the step's KL and clip figures for `metrics`."""

    def __init__(self, epsilon: float, beta: float):
        self.epsilon, self.beta = epsilon, beta
        self._sums = torch.zeros(3, dtype=torch.float64)  # Σ KL, Σ clipped, Σ completion tokens

    def __call__(self, logits: torch.Tensor, batch: core.Batch) -> torch.Tensor:
        c = batch.columns
        logprobs = token_logprobs(logits, batch.targets)
        loss, kl, clipped = grpo_token_loss(logprobs, c["old_logprobs"], c["advantages"], self.epsilon,
                                            self.beta, c.get("ref_logprobs"))
        mask = c["completion_mask"]
        self._sums += torch.tensor([kl.detach()[mask].sum().item(), clipped[mask].sum().item(), mask.sum().item()],
                                   dtype=torch.float64)
        return loss

    def metrics(self) -> dict[str, float]:
        kl, clipped, n = self._sums.tolist()
        self._sums.zero_()
        return {"kl": kl / max(n, 1), "clip_fraction": clipped / max(n, 1)}


# -------------------------------------------------------------------------------------------- rollouts
class Rollouts:
    """The GRPO stage's data source: a rollout batch from the engine every `inner_iterations` steps.

    Its position is the number of rollouts made: prompts and sampling seeds are functions of it and the run's
    seed, and checkpoints fall between rollout batches, so a resumed run samples what it would have."""

    def __init__(self, cfg: GRPOConfig, rows: list[dict[str, Any]], reward: Callable[..., list[float]],
                 tokenizer: Tokenizer, adapter: core.Adapter | None = None, reference: Transformer | None = None):
        self.cfg, self.rows, self.reward, self.tokenizer = cfg, rows, reward, tokenizer
        self.adapter, self.reference = adapter, reference
        self.prompt_ids = [tokenizer.apply_chat_template(row["messages"]) for row in rows]
        self.columns = tasks.reward_columns(rows)
        self.rollouts = 0
        self.pending: core.Batch | None = None
        self.uses = 0
        self.policy: Transformer | None = None
        self.engine: LLMEngine | None = None
        self.figures: dict[str, float] = {}
        self.mismatch = 0.0

    def bind(self, policy: Transformer) -> None:
        """The model being trained (`Stage.on_model`); the engine runs on a copy of its weights."""
        self.policy = policy
        plain = self.adapter.merged(policy) if self.adapter is not None else copy.deepcopy(policy)
        copy_ = plain.to(getattr(torch, self.cfg.rollout_dtype)).eval().requires_grad_(False)
        blocks = self.cfg.batch_size * -(-self.cfg.seq_len // 16)
        self.engine = LLMEngine(copy_, self.tokenizer, max_running=self.cfg.batch_size, num_blocks=blocks,
                                block_size=16, prefill_chunk=self.cfg.seq_len, max_prefill_tokens=4096)

    def state_dict(self) -> dict[str, Any]:
        return {"rollouts": self.rollouts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollouts, self.pending = state["rollouts"], None

    def next_batch(self, batch_size: int) -> core.Batch:
        if self.pending is None or self.uses == self.cfg.inner_iterations:
            self.pending, self.uses = self._rollout(batch_size), 0
            self.rollouts += 1
        self.uses += 1
        return self.pending

    # ---------------------------------------------------------------------------------------- sampling
    def _sample(self, picks: list[int]) -> list[RequestOutput]:
        cfg, engine = self.cfg, self.engine
        with torch.no_grad():  # the engine's copy takes the policy's current weights
            policy = self.adapter.merged(self.policy) if self.adapter is not None else self.policy
            engine.model.load_state_dict(policy.state_dict())
        engine.model.prepare_for_inference()
        requests = []
        for i, row in enumerate(picks):
            for g in range(cfg.group_size):
                seed = hash((cfg.seed, self.rollouts, i, g)) % 2**62
                params = SamplingParams(max_tokens=cfg.max_completion_tokens, temperature=cfg.temperature,
                                        top_k=cfg.top_k, seed=seed, logprobs=0)
                requests.append(engine.make_request(self.prompt_ids[row], params, record_routing=True))
        for r in requests:
            engine.add_request(r)
        while engine.has_unfinished():
            engine.step()
        return [r.out for r in requests]

    def _rollout(self, batch_size: int) -> core.Batch:
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}/{self.rollouts}")
        picks = [rng.randrange(len(self.rows)) for _ in range(batch_size // cfg.group_size)]
        outs = self._sample(picks)
        rows = [row for row in picks for _ in range(cfg.group_size)]
        completions = [self.tokenizer.decode(o.token_ids) for o in outs]
        prompts = [self.rows[r]["messages"][-1]["content"] for r in rows]
        columns = {k: [v[r] for r in rows] for k, v in self.columns.items()}
        rewards = torch.tensor(tasks.check_rewards(self.reward(prompts, completions, **columns), len(outs),
                                                   where="reward"))
        batch = self._batch(outs, group_advantages(rewards, cfg.group_size, cfg.scale_rewards))
        mask = batch.columns["completion_mask"]
        engine_lp = batch.columns.pop("engine_logprobs")
        std = rewards.view(-1, cfg.group_size).std(dim=1).mean()
        self.figures = {
            "reward": rewards.mean().item(), "reward_std": std.item(),
            "completion_length": mask.sum(1).float().mean().item(),
            "logprob_diff": (engine_lp - batch.columns["old_logprobs"]).abs()[mask].mean().item(),
            "routing_mismatch": self.mismatch,
        }
        return batch

    def _batch(self, outs: Sequence[RequestOutput], advantages: torch.Tensor) -> core.Batch:
        """Sequences prompt + completion, padded on the right; targets are the next tokens, and the loss is on
        the completion's. π_old (and π_ref) log-probs come from the trainer, with the engine's experts under
        routing replay."""
        cfg = self.cfg
        seqs = [o.prompt_token_ids + o.token_ids for o in outs]
        B, S = len(seqs), max(len(s) for s in seqs) - 1
        inputs = torch.zeros(B, S, dtype=torch.long)
        targets = torch.zeros(B, S, dtype=torch.long)
        token_mask = torch.zeros(B, S, dtype=torch.bool)
        completion = torch.zeros(B, S, dtype=torch.bool)
        engine_lp = torch.zeros(B, S)
        k = self.policy.config.num_experts_per_tok
        n_moe = sum(isinstance(b.ffn, MoE) for b in self.policy.layers)
        engine_routing = torch.arange(k).expand(B, S, n_moe, k).clone()
        for i, (o, seq) in enumerate(zip(outs, seqs, strict=True)):
            n, p = len(seq) - 1, len(o.prompt_token_ids)
            inputs[i, :n], targets[i, :n] = torch.tensor(seq[:-1]), torch.tensor(seq[1:])
            token_mask[i, :n] = True
            completion[i, p - 1 : n] = True
            engine_lp[i, p - 1 : n] = torch.tensor(o.logprobs)
            engine_routing[i, :n] = o.routing
        weights, denominator = loss_weights(completion, cfg.loss_type, cfg.max_completion_tokens)
        batch = core.Batch(inputs, targets, weights, token_mask, denominator=denominator,
                           replay=engine_routing if cfg.routing_replay else None,
                           columns={"advantages": advantages, "completion_mask": completion,
                                    "engine_logprobs": engine_lp})
        batch.columns["old_logprobs"], self.mismatch = self._logprobs(self.policy, batch, engine_routing)
        if self.reference is not None:
            batch.columns["ref_logprobs"], _ = self._logprobs(self.reference, batch, engine_routing)
        return batch

    @torch.no_grad()
    def _logprobs(self, model: Transformer, batch: core.Batch, engine_routing: torch.Tensor,
                  ) -> tuple[torch.Tensor, float]:
        """log π(target) [B,S] by the trainer, and the share of (real token, MoE layer) pairs whose experts its
        own router would choose differently from the engine's (with replay it routes to the engine's anyway)."""
        rows = max(1, len(batch) // self.cfg.grad_accum)  # the training step's micro-batch size
        gates = [b.ffn.gate for b in model.layers if isinstance(b.ffn, MoE)]
        device = model.embed.weight.device
        out, differ = [], 0
        for part, engine in zip(batch.split(len(batch) // rows), engine_routing.split(rows), strict=True):
            part, engine = part.to(device), engine.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                logits, routings = model(part.inputs, replay=part.replay, return_routing=True)
            out.append(token_logprobs(logits.float(), part.targets).cpu())
            for layer, (gate, routing) in enumerate(zip(gates, routings, strict=True)):
                scores = routing.scores.flatten(0, 1)  # [B·S, E]
                own = gate.candidates(scores).topk(gate.top_k, dim=-1).indices.sort(-1).values
                same = (own.view_as(engine[:, :, layer]) == engine[:, :, layer].sort(-1).values).all(-1)
                differ += (~same)[part.token_mask].sum().item()
        real = batch.token_mask.sum().item() * max(1, len(gates))
        return torch.cat(out), differ / real

    def metrics(self) -> dict[str, float]:
        return dict(self.figures)


# ----------------------------------------------------------------------------------------------- stage
def _prompts_and_reward(cfg: GRPOConfig) -> tuple[list[dict[str, Any]], Callable[..., list[float]]]:
    if cfg.task is not None:
        task = tasks.get_task(cfg.task)
        return tasks.prompt_rows(task, cfg.prompt_rows, seed=cfg.seed), task.reward
    return tasks.read_prompts(cfg.prompts), tasks.load_reward(cfg.reward)


def stage(cfg: GRPOConfig, dist: Distributed | None = None) -> core.Stage:
    """The GRPO stage: validated (config, prompts, reward, tokenizer) before any model work."""
    dist = dist or Distributed()
    cfg.validate(dist.world)
    folder = Path(cfg.model)
    if not folder.is_dir():
        raise ValueError(f"model: {cfg.model} is not a model folder (GRPO starts from a trained model)")
    config = core.model_config(cfg)
    tokenizer = Tokenizer.from_folder(folder, config)
    rows, reward = _prompts_and_reward(cfg)
    longest = max(len(tokenizer.apply_chat_template(r["messages"])) for r in rows)
    cfg = dataclasses.replace(cfg, seq_len=longest + cfg.max_completion_tokens)
    if cfg.seq_len > config.max_position_embeddings:
        raise ValueError(f"prompts: the longest prompt ({longest} tokens) plus max_completion_tokens="
                         f"{cfg.max_completion_tokens} exceeds the model's context ({config.max_position_embeddings})")
    adapter = None
    if cfg.lora_rank is not None:
        from dsv2.align.lora import Lora, LoraConfig

        adapter = Lora(LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha))
    reference = None
    if cfg.beta > 0:  # the frozen start model
        reference = load_model(folder, device=dist.device, progress=False).train().requires_grad_(False)
    source = Rollouts(cfg, rows, reward, tokenizer, adapter, reference)
    objective = GRPOObjective(cfg.epsilon, cfg.beta)
    return core.Stage("grpo", cfg, source, objective, tokenizer=tokenizer, adapter=adapter, on_model=source.bind,
                      metrics=lambda: {**source.metrics(), **objective.metrics()})


def train(cfg: GRPOConfig) -> dict[str, Any]:
    with Distributed.from_env() as dist:
        return core.run(stage(cfg, dist), dist)
