"""DeepSeek-V2's auxiliary balance losses (paper §2.2.3, Eqs. 23-31) and device-level token dropping (§2.2.4).

Notation as in the paper: T tokens in one sequence, N_r routed experts (E here), K_r experts per token (K),
D devices, M devices a token may be sent to, s_{i,t} the router's softmax probability of expert i for token t
(over all E experts, not only the selected ones). Device d holds the contiguous group
E_d = {d·E/D, ..., (d+1)·E/D - 1}, the same grouping the Gate's device-limited routing uses.

    expert  f_i   = N_r/(K_r·T) Σ_t 1(t selects i)  P_i   = (1/T) Σ_t s_{i,t}  L_ExpBal  = α1 Σ_i f_i P_i     Eq. 23-25
    device  f'_d  = (1/|E_d|) Σ_{i∈E_d} f_i         P'_d  = Σ_{i∈E_d} P_i      L_DevBal  = α2 Σ_d f'_d P'_d   Eq. 26-28
    comm    f''_d = D/(M·T) Σ_t 1(t is sent to d)   P''_d = Σ_{i∈E_d} P_i      L_CommBal = α3 Σ_d f''_d P''_d Eq. 29-31

The f terms count discrete choices, so gradient reaches the router only through P (the softmax), as in the
paper. Each f is normalised so that perfectly balanced routing (for the comm loss: every token sent to exactly
M devices, each receiving M·T/D) gives Σ f·P = 1, i.e. each loss equals its α.
The losses and the dropping rule are pure functions; `TokenDropping` applies the rule to a model as plumbing
(removing dropped slots before the experts run). The only randomness is the draw of protected sequences, from
the generator passed in (torch's global CPU generator if none).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dsv2.config import ModelConfig
from dsv2.model import Transformer
from dsv2.model.moe import MoE, Routing
from dsv2.train.distributed import Distributed
from dsv2.train.parallel import device_limited

# V2's coefficients (paper §3.1.2); V2-Lite uses only the expert-level loss with α1 = 0.001 (appendix B.1)
ALPHA_EXPERT, ALPHA_DEVICE, ALPHA_COMM = 0.003, 0.05, 0.02


def _token_mask(mask: Tensor | None, shape: tuple[int, int], device: torch.device) -> Tensor:
    """Bool [B,S], True where a token is real; None means every token is."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {shape}")
    return mask.to(device=device, dtype=torch.bool)


def _experts_per_device(n_experts: int, n_devices: int) -> int:
    if n_devices < 1 or n_experts % n_devices:
        raise ValueError(f"{n_experts} experts cannot be split evenly over {n_devices} devices")
    return n_experts // n_devices


def balance_losses(
    scores: Tensor,
    indices: Tensor,
    *,
    n_devices: int = 1,
    topk_devices: int = 1,
    alpha_expert: float = ALPHA_EXPERT,
    alpha_device: float = ALPHA_DEVICE,
    alpha_comm: float = ALPHA_COMM,
    mask: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The three balance losses of one MoE layer, each computed per sequence and averaged over sequences.

    scores:  [B,S,E] softmax probabilities (differentiable; computed in fp32).
    indices: [B,S,K] the experts each token selected, *before* any token dropping: the losses balance the
             router's choices, and a slot dropped for overload is exactly the choice they should push against.
    mask:    optional [B,S], True for real tokens. Padding is excluded everywhere, so T is the number of real
             tokens of each sequence; a sequence with none is left out of the batch mean.

    Returns (losses, stats):
      losses: "expert", "device", "comm" (Eqs. 23, 26, 29, already × α) and their sum "total"; fp32 scalars.
              With one device the device and comm losses are the constant α2, α3 (f' = P' = 1) with no
              gradient, so they are returned as 0 instead (V2-Lite trains without them).
      stats (no gradient), over all real tokens of the batch:
              "expert_load" [E] fraction of routed slots per expert (sums to 1), "device_load" [D] the same
              per device, "load_max_over_min" (inf when an expert got no slot, nan with no real token),
              "load_max_over_mean".
    """
    if scores.dim() != 3 or indices.dim() != 3 or indices.shape[:2] != scores.shape[:2]:
        raise ValueError(f"expected scores [B,S,E] and indices [B,S,K], got {tuple(scores.shape)}, "
                         f"{tuple(indices.shape)}")
    batch, seq, n_experts = scores.shape
    top_k = indices.shape[-1]
    per_device = _experts_per_device(n_experts, n_devices)
    if not 1 <= topk_devices <= n_devices:
        raise ValueError(f"topk_devices must be in [1, {n_devices}], got {topk_devices}")

    scores = scores.float()
    indices = indices.long()
    real = _token_mask(mask, (batch, seq), scores.device).float()  # [B,S]
    n_tokens = real.sum(dim=1)  # T of each sequence
    inv_t = 1.0 / n_tokens.clamp(min=1).unsqueeze(-1)  # [B,1]; empty sequences are zeroed below anyway

    # Σ_t 1(token t selects expert i): each real token adds one to each of its K (distinct) experts
    slot_weight = real.unsqueeze(-1).expand(batch, seq, top_k).flatten(1)
    counts = scores.new_zeros(batch, n_experts).scatter_add_(1, indices.flatten(1), slot_weight)  # [B,E]
    f = counts * (n_experts / top_k) * inv_t  # Eq. 24
    p = (scores * real.unsqueeze(-1)).sum(dim=1) * inv_t  # Eq. 25: the only term carrying gradient
    per_sequence = {"expert": (f * p).sum(dim=-1)}  # Eq. 23 / α1

    if n_devices > 1:
        p_device = p.unflatten(-1, (n_devices, per_device)).sum(dim=-1)  # Eq. 28, and P'' of Eq. 31
        f_device = f.unflatten(-1, (n_devices, per_device)).mean(dim=-1)  # Eq. 27
        per_sequence["device"] = (f_device * p_device).sum(dim=-1)  # Eq. 26 / α2
        # a token is sent to a device once, however many of its experts live there (Eq. 30)
        sent = torch.zeros(batch, seq, n_devices, dtype=torch.bool, device=scores.device)
        sent.scatter_(2, indices // per_device, True)
        received = (sent.float() * real.unsqueeze(-1)).sum(dim=1)  # [B,D] tokens each device receives
        f_comm = received * (n_devices / topk_devices) * inv_t  # Eq. 30
        per_sequence["comm"] = (f_comm * p_device).sum(dim=-1)  # Eq. 29 / α3
    else:
        per_sequence["device"] = per_sequence["comm"] = scores.new_zeros(batch)

    # "T is the number of tokens in a sequence": the paper's losses are per sequence; average them
    has_tokens = (n_tokens > 0).float()
    n_sequences = has_tokens.sum().clamp(min=1)
    alphas = {"expert": alpha_expert, "device": alpha_device, "comm": alpha_comm}
    losses = {name: alphas[name] * (value * has_tokens).sum() / n_sequences for name, value in per_sequence.items()}
    losses["total"] = losses["expert"] + losses["device"] + losses["comm"]

    load = counts.sum(dim=0)
    load = load / load.sum().clamp(min=1)
    stats = {
        "expert_load": load,
        "device_load": load.unflatten(-1, (n_devices, per_device)).sum(dim=-1),
        "load_max_over_min": load.max() / load.min(),
        "load_max_over_mean": load.max() * n_experts,
    }
    return losses, stats


def protected_sequences(batch_size: int, fraction: float = 0.1, generator: torch.Generator | None = None) -> Tensor:
    """[B] bool on the generator's device: each sequence is protected from dropping with probability `fraction`.

    The paper protects "approximately 10% of the training sequences" without saying how they are chosen; an
    independent draw per sequence gives that fraction in expectation at any batch size (rounding 10% of a small
    batch would protect none). Draw once per step and pass the same mask to every layer, so a protected sequence
    keeps all its tokens everywhere; seed the generator from (seed, step) to make it reproducible.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(batch_size, generator=generator, device=device) < fraction


def drop_tokens(
    affinity: Tensor,
    indices: Tensor,
    *,
    n_experts: int,
    n_devices: int,
    capacity_factor: float | None = 1.0,
    training: bool = True,
    protected: Tensor | None = None,
    protect_fraction: float = 0.1,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Device-level token dropping (§2.2.4): keep-mask [B,S,K] bool and the dropped fraction (fp32 scalar).

    affinity: [B,S,K] the routing score of each selected slot; the paper ranks by the affinity s_{i,t}, so pass
              the raw scores gathered at `indices`, as MoE does (with norm_topk_prob the weights are renormalised
              per token, which changes the order across tokens).
    indices:  [B,S,K] selected experts; expert i lives on device i // (n_experts / n_devices).
    capacity_factor: each device's budget is ceil(factor · real slots / D) slots, i.e. 1.0 = its average load
              (the paper's setting). None, or training=False, drops nothing ("not drop any tokens for evaluation").
    protected: [B] bool sequences whose slots are never dropped; None draws them with `protected_sequences`
              (`protect_fraction`, `generator`). Protected slots are admitted first and use up their device's
              budget, so the budget stays a bound on compute; unprotected slots fill what is left, highest
              affinity first. A device whose protected slots alone exceed its budget keeps just those.
    mask:     optional [B,S], True for real tokens. Padding slots take no budget and are dropped in training
              (their output is never used); they are not counted in the dropped fraction.

    Dropped slots are then computed by no expert (`TokenDropping`). Ties in affinity go to the earlier slot
    (b, s, k order).
    The dropped fraction is dropped real slots / real slots, protected ones included in the denominator.
    """
    if affinity.shape != indices.shape or indices.dim() != 3:
        raise ValueError(f"expected affinity and indices [B,S,K], got {tuple(affinity.shape)}, {tuple(indices.shape)}")
    if not training or capacity_factor is None:
        return torch.ones_like(indices, dtype=torch.bool), affinity.new_zeros((), dtype=torch.float32)
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
    batch, seq, _ = indices.shape
    per_device = _experts_per_device(n_experts, n_devices)
    dev = indices.device

    if protected is None:
        protected = protected_sequences(batch, protect_fraction, generator)
    if tuple(protected.shape) != (batch,):
        raise ValueError(f"protected has shape {tuple(protected.shape)}, expected ({batch},)")
    real = _token_mask(mask, (batch, seq), dev).unsqueeze(-1).expand_as(indices).flatten()
    safe = real & protected.to(device=dev, dtype=torch.bool).repeat_interleave(seq * indices.shape[-1])
    candidate = real & ~safe
    device_of = (indices.long() // per_device).flatten()

    # the budget is the average load per device (§2.2.4 "average computational budget"), times the factor;
    # all on-device tensor math so a GPU step never waits on the host. The epsilon stops 1.1·40/4 = 11.000000002
    # from rounding up to 12.
    n_real = real.sum()
    capacity = torch.ceil(n_real.double() * capacity_factor / n_devices - 1e-9).long()
    protected_load = torch.zeros(n_devices, dtype=torch.long, device=dev).scatter_add_(0, device_of, safe.long())
    allowance = (capacity - protected_load).clamp(min=0)

    # Rank every candidate among the candidates on its device, highest affinity first: sort by affinity, then
    # stably by device. Non-candidates (protected, padding) go to an extra bucket D with no allowance.
    bucket = torch.where(candidate, device_of, n_devices)
    order = affinity.flatten().argsort(descending=True, stable=True)
    order = order[bucket[order].argsort(stable=True)]
    bucket_size = torch.zeros(n_devices + 1, dtype=torch.long, device=dev).scatter_add_(
        0, bucket, torch.ones_like(bucket)
    )
    bucket_start = bucket_size.cumsum(0) - bucket_size
    rank_sorted = torch.arange(bucket.numel(), device=dev) - bucket_start[bucket[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    allowance = torch.cat([allowance, allowance.new_zeros(1)])

    keep = safe | (candidate & (rank < allowance[bucket]))
    dropped = (real & ~keep).sum().float() / n_real.clamp(min=1).float()
    return keep.view_as(indices), dropped


# ------------------------------------------------------------------------------ applied to a model
def default_alphas(config: ModelConfig, expert: float | None = None, device: float | None = None,
                   comm: float | None = None) -> tuple[float, float, float]:
    """(α1, α2, α3): the paper's V2 values when routing is device-limited, else only the expert-level loss with
    the config's `aux_loss_alpha` (DeepSeek-V2-Lite's recipe); a given value replaces its default."""
    limited = device_limited(config)
    defaults = (ALPHA_EXPERT, ALPHA_DEVICE, ALPHA_COMM) if limited else (config.aux_loss_alpha, 0.0, 0.0)
    return tuple(d if c is None else c for c, d in zip((expert, device, comm), defaults, strict=True))


def routing_losses(
    routings: list[Routing], alphas: tuple[float, float, float], n_devices: int, topk_devices: int,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, float], list[dict[str, Any]]]:
    """The balance losses summed over MoE layers (what backward sees), their per-level sums as numbers, and
    per-layer statistics for the metrics: losses, expert load, max/min load ratio, dropped fraction."""
    total = torch.zeros((), device=routings[0].scores.device) if routings else torch.zeros(())
    sums = {"expert": 0.0, "device": 0.0, "comm": 0.0}
    layers = []
    for routing in routings:
        losses, stats = balance_losses(
            routing.scores, routing.indices, n_devices=n_devices, topk_devices=topk_devices,
            alpha_expert=alphas[0], alpha_device=alphas[1], alpha_comm=alphas[2], mask=mask,
        )
        layer: dict[str, Any] = {"losses": {}, "max_over_min": float(stats["load_max_over_min"]),
                                 "load": stats["expert_load"].tolist()}
        for name, alpha in zip(("expert", "device", "comm"), alphas, strict=True):
            if alpha > 0 and not losses[name].requires_grad:
                raise RuntimeError(
                    f"alpha_{name}={alpha} is set but the {name}-level balance loss cannot reach the router's "
                    f"gradient in this model ({n_devices} device group(s)): unset it"
                )
            layer["losses"][name] = float(losses[name].detach())
            sums[name] += layer["losses"][name]
        if routing.kept is not None:
            layer["dropped"] = float(1 - routing.kept.float().mean())
        total = total + losses["total"]
        layers.append(layer)
    return total, sums, layers


class TokenDropping(nn.Module):
    """Device-level token dropping (§2.2.4) as plumbing: one instance is installed as every MoE layer's
    `capacity` (`install_token_dropping`), and the layer removes the slots it does not keep before its
    experts run, so the budget bounds expert compute and, with expert parallelism, what is dispatched.

    `new_batch(global_batch)` draws one forward's protected sequences once (the same for every layer, from torch's
    RNG, which checkpoints restore). With W expert-parallel ranks a device's budget and ranking cover every slot
    sent to it from any rank, so each layer gathers the global batch's choices (a few bytes per slot), decides
    as one process would, and keeps its own part. Evaluation (`model.eval()`) drops nothing.
    """

    def __init__(self, n_experts: int, n_devices: int, capacity_factor: float, dist: Distributed):
        super().__init__()
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
        self.n_experts, self.n_devices, self.capacity_factor, self.dist = n_experts, n_devices, capacity_factor, dist
        self.protected: Tensor | None = None
        self.token_mask: Tensor | None = None

    def new_batch(self, global_batch: int, token_mask: Tensor | None = None) -> None:
        self.protected = protected_sequences(global_batch)
        self.token_mask = token_mask

    def forward(self, affinity: Tensor, indices: Tensor) -> Tensor:
        """[B,S,K] affinities and experts of this rank's part of the batch -> keep-mask [B,S,K] bool."""
        if not self.training:
            return torch.ones_like(indices, dtype=torch.bool)
        if self.protected is None:
            raise RuntimeError("TokenDropping.new_batch(global_batch) must be called before each training forward")
        dist = self.dist
        mask = None if self.token_mask is None else self.token_mask.to(indices.device)
        keep, _ = drop_tokens(
            dist.gather(affinity), dist.gather(indices), n_experts=self.n_experts, n_devices=self.n_devices,
            capacity_factor=self.capacity_factor, protected=self.protected, mask=mask,
        )
        return dist.shard(keep)


def install_token_dropping(model: Transformer, capacity_factor: float, n_devices: int,
                           dist: Distributed | None = None) -> TokenDropping:
    """Make every MoE layer of `model` drop over-capacity slots in training; returns the one instance, whose
    `new_batch` the training step calls before each forward."""
    dropping = TokenDropping(model.config.n_routed_experts, n_devices, capacity_factor, dist or Distributed())
    for module in model.modules():
        if isinstance(module, MoE):
            module.capacity = dropping
    return dropping
