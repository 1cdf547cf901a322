"""Plumbing applied to a built model from outside its math (ARCHITECTURE principle 5): expert parallelism,
FSDP2 and activation checkpointing, and the pieces that undo them (full weights, gradient norm, optimizer state).

`parallelize(model, dist)` on W ranks (one `DeviceMesh` over all of them):
  * expert parallel: each MoE layer's `experts` (stacked [E, ...] weights) becomes an `ExpertParallel` holding
    experts [r·E/W, (r+1)·E/W) on rank r as a DTensor sharded on dim 0; tokens reach them by all-to-all;
  * FSDP2 (`fully_shard`) for every other parameter: one unit per decoder block, one for the embedding, final
    norm and head;
  * activation checkpointing per block, if asked (before FSDP, as FSDP2 expects).
Every parameter is then a DTensor sharded over the same mesh, so one fused AdamW steps them all and the ranks
hold disjoint pieces of every gradient. The model's code and the training step's call
`model(tokens, return_routing=True)` are unchanged.

Device-limited routing (paper §2.2.2) needs the Gate's D = n_group groups to *be* the EP ranks: group g is
experts [g·E/D, (g+1)·E/D), the experts rank g holds when W = D, so a token's M = topk_group groups are the M
ranks its hidden state is sent to. `check_placement` refuses any other layout before work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from dsv2.config import ModelConfig
from dsv2.model import Transformer
from dsv2.model.moe import MoE, RoutedExperts
from dsv2.train.distributed import Distributed


# ------------------------------------------------------------------------------------- placement
def device_limited(config: ModelConfig) -> bool:
    return config.routing_method == "group_limited_greedy" and (config.n_group or 1) > 1


def check_placement(config: ModelConfig, world: int) -> None:
    """Raise, naming the field, if `world` ranks cannot hold this model's experts with expert parallelism."""
    if world == 1:
        return
    if config.n_routed_experts is None or config.n_routed_experts % world:
        raise ValueError(f"n_routed_experts={config.n_routed_experts} is not divisible by the expert-parallel "
                         f"size {world} (the number of processes)")
    if device_limited(config) and config.n_group != world:
        raise ValueError(f"device-limited routing (topk_method=group_limited_greedy, n_group={config.n_group}) "
                         f"needs one process per expert group: run {config.n_group} processes, not {world}, or "
                         f"set n_group to {world}")


def device_groups(config: ModelConfig, world: int = 1) -> tuple[int, int]:
    """(D, M) for the balance losses and token dropping: the devices one layer's routed experts are split over
    and how many of them one token may reach. On one process the Gate's groups stand in for devices when routing
    is device-limited, else there is one device; on W ranks the devices are the EP ranks."""
    if world == 1:
        return (config.n_group, config.topk_group) if device_limited(config) else (1, 1)
    return world, (config.topk_group if device_limited(config) else min(world, config.num_experts_per_tok))


# ---------------------------------------------------------------------------------- all-to-all
@dataclass
class Traffic:
    """What one expert-parallel layer's all-to-alls moved on this rank, summed until reset."""

    tokens: int = 0  # tokens routed from this rank
    dispatched: int = 0  # hidden states sent, one per (token, destination rank), this rank included
    expert_rows: int = 0  # (received row, slot) pairs this rank's experts computed
    bytes_sent: int = 0  # bytes sent to other ranks by every all-to-all, forward and backward


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group, traffic: Traffic) -> torch.Tensor:
    """Rows [sum(send), ...] -> rows [sum(recv), ...]: send[j] rows to rank j, recv[j] rows from it."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    torch_dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    rank = torch_dist.get_rank(group)
    traffic.bytes_sent += (sum(send) - send[rank]) * math.prod(x.shape[1:]) * x.element_size()
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with a gradient: the gradient of a scatter along (send, recv) is the reverse scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group, traffic: Traffic) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group, ctx.traffic = send, recv, group, traffic
        return _exchange(x, send, recv, group, traffic)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.recv, ctx.send, ctx.group, ctx.traffic), None, None, None, None


# ----------------------------------------------------------------------------- expert parallel
class ExpertParallel(nn.Module):
    """One MoE layer's routed experts split over the ranks of `mesh`: rank r holds experts [r·E/W, (r+1)·E/W).

    Called like `RoutedExperts` (x [N,d], weights [N,K], indices [N,K] -> Σ_k w·FFN(x) [N,d]) on each rank's
    own tokens:
      1. dispatch: a token's hidden state goes once to each rank holding one of its chosen experts (at most M
         ranks under device-limited routing), with the weight and local expert id of each of its K slots that
         lives there (id -1 for the others); a slot dropped by token dropping (id -1 already) goes nowhere;
      2. each rank runs its experts on what it received, with RoutedExperts' own code on the local weights, and
         sums each received row's slots, weighted, in fp32;
      3. combine: those partial sums go back along the reverse route and are added up per token.
    Both directions move at most M hidden states per token. The gradient of the experts on rank r sums the
    contributions of every rank's tokens, each rank's loss being a mean over its own part of the batch, so a
    hook divides it by W: the result is the gradient of the global mean, as FSDP's averaging gives the rest.
    """

    def __init__(self, experts: RoutedExperts, mesh: DeviceMesh):
        super().__init__()
        self.group = mesh.get_group()
        self.world, self.rank = mesh.size(), mesh.get_local_rank()
        n_experts, inter, dim = experts.w1.shape
        self.per_rank = n_experts // self.world
        self.traffic = Traffic()
        mine = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        for name in ("w1", "w2", "w3"):
            local = getattr(experts, name).detach()[mine].clone()  # every rank built the same full weights
            param = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False))
            param.register_hook(lambda grad: grad / self.world)
            setattr(self, name, param)
        with torch.device("meta"):
            compute = RoutedExperts(self.per_rank, dim, inter)
        # kept out of the module tree (no parameters of its own to save or step): it lends RoutedExperts' grouped
        # computation to the local weights through functional_call
        self.__dict__["compute"] = compute

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        n_tokens, top_k = indices.shape
        # [N,K] the rank holding each slot's expert; dropped slots (-1) to column W, which is never sent
        dest = torch.where(indices >= 0, indices // self.per_rank, self.world)
        goes_to = torch.zeros(n_tokens, self.world + 1, dtype=torch.bool, device=x.device).scatter_(1, dest, True)
        goes_to = goes_to[:, : self.world]
        rank_of_row, token_of_row = goes_to.t().nonzero(as_tuple=True)  # rows grouped by destination rank
        here = dest[token_of_row] == rank_of_row.unsqueeze(1)  # [R,K] the row's slots held by its destination
        local_id = torch.where(here, indices[token_of_row] % self.per_rank, -1)
        slots = torch.cat([weights[token_of_row] * here, local_id.to(weights.dtype)], dim=1)  # [R, 2K] fp32

        send_counts = goes_to.sum(dim=0)
        recv_counts = torch.empty_like(send_counts)
        torch_dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        self.traffic.tokens += n_tokens
        self.traffic.dispatched += len(token_of_row)

        x_recv = _AllToAll.apply(x[token_of_row], send, recv, self.group, self.traffic)
        slots_recv = _AllToAll.apply(slots, send, recv, self.group, self.traffic)
        w_recv, id_recv = slots_recv[:, :top_k], slots_recv[:, top_k:].long()
        row, slot = (id_recv >= 0).nonzero(as_tuple=True)
        self.traffic.expert_rows += len(row)
        if len(row):
            local = {name: getattr(self, name).to_local() for name in ("w1", "w2", "w3")}
            ones = torch.ones(len(row), 1, device=x.device)
            expert_out = torch.func.functional_call(self.compute, local, (x_recv[row], ones, id_recv[row, slot, None]))
        else:
            # nothing reached this rank; still derive the (empty) output from x_recv, so that backward passes
            # through the dispatch all-to-all here too: every rank must join every collective, or they deadlock
            expert_out = x_recv[row]
        partial = torch.zeros(len(x_recv), x.shape[-1], device=x.device).index_add_(
            0, row, expert_out.float() * w_recv[row, slot, None]
        )
        back = _AllToAll.apply(partial.to(x.dtype), recv, send, self.group, self.traffic)
        out = torch.zeros(n_tokens, x.shape[-1], device=x.device).index_add_(0, token_of_row, back.float())
        return out.to(x.dtype)


def expert_layers(model: Transformer) -> list[ExpertParallel]:
    return [m for m in model.modules() if isinstance(m, ExpertParallel)]


# ------------------------------------------------------------------------------------ apply
def parallelize(model: Transformer, dist: Distributed, activation_checkpointing: bool = False) -> Transformer:
    """Expert parallel + FSDP2 over `dist.mesh` (when there are several ranks), activation checkpointing if asked.
    Every rank must pass the same full weights (same seed, or the same checkpoint)."""
    experts: set[nn.Parameter] = set()
    if dist.world > 1:
        check_placement(model.config, dist.world)
        for block in model.layers:
            if isinstance(block.ffn, MoE):
                block.ffn.experts = ExpertParallel(block.ffn.experts, dist.mesh)
                experts |= set(block.ffn.experts.parameters())
    blocks = list(model.layers)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if dist.world > 1:
        for block in blocks:  # one FSDP unit (one all-gather, one reduce-scatter) per block
            fully_shard(_tensor_modules(block), mesh=dist.mesh, ignored_params=experts)
        fully_shard(model, mesh=dist.mesh, ignored_params=experts)  # the root: embedding, final norm, head
    return model


def _tensor_modules(block: nn.Module) -> list[nn.Module]:
    """The block's submodules holding its dense parameters, whose outputs are plain tensors. Block and MoE
    return a `Routing` dataclass, which FSDP2's output hooks do not look into: the router scores in it reach
    the backward (through the balance losses) without passing a hook that would gather the Gate's weight
    first. So the Gate, whose outputs are tensors, is in a unit of its own instead of the whole block."""
    modules = []
    for child in block.children():
        if isinstance(child, MoE):
            modules += [m for m in child.children() if not isinstance(m, ExpertParallel)]
        else:
            modules.append(child)
    return modules


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in backward instead of storing them (memory for compute).

    Recomputation replays the block exactly, token dropping included (its protected sequences are fixed for
    the step, so the same slots are dropped); the routing the replay returns is discarded.
    """
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block)


# ----------------------------------------------------------------------------------- undo
def clip_grad_norm_(model: nn.Module, max_norm: float, dist: Distributed) -> float:
    """Scale the gradients so their global L2 norm is at most `max_norm`; returns the norm before clipping."""
    params = list(model.parameters())
    if dist.world == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    for p in params:
        if p.grad is None:  # experts on a rank no token reached: zero, as the stacked tensor's is on one process
            p.grad = torch.zeros_like(p)
    # every parameter is sharded, so the ranks hold disjoint pieces of the gradient: norm² = Σ_ranks local norm²
    local = [p.grad.to_local() for p in params]
    squares = torch.stack([g.float().pow(2).sum() for g in local]).sum()
    torch_dist.all_reduce(squares)
    total = squares.sqrt()
    torch._foreach_mul_(local, (max_norm / (total + 1e-6)).clamp(max=1.0))  # torch's rule, on the local pieces
    return total.item()


def full_model(model: Transformer) -> Transformer | None:
    """The model as a plain Transformer with full tensors, for `weights.save_model`: the model itself on one
    process (unless activation checkpointing renamed its parameters), else gathered onto rank 0 (None on the
    other ranks). Collective: every rank must call it."""
    named = list(model.named_parameters())
    if not any(isinstance(p, DTensor) or _CHECKPOINT_PREFIX in name for name, p in named):
        return model
    main = not torch_dist.is_initialized() or torch_dist.get_rank() == 0
    plain = None
    if main:
        with torch.device("meta"):
            plain = Transformer(model.config)
        plain = plain.to(dtype=named[0][1].dtype).to_empty(device="cpu")
    with torch.no_grad():
        for name, p in named:  # the same order on every rank: each full_tensor() is a collective
            full = p.full_tensor() if isinstance(p, DTensor) else p
            if main:
                plain.get_parameter(name.replace(_CHECKPOINT_PREFIX, "")).copy_(full.cpu())
    return plain.eval() if main else None


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with each DTensor replaced by this rank's shard: plain tensors, so the file loads
    with weights_only=True, and only on the same number of ranks."""
    state = optimizer.state_dict()
    state["state"] = {
        i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in s.items()} for i, s in state["state"].items()
    }
    return state


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `local_optimizer_state`: each per-parameter moment goes back into a DTensor laid out like its
    parameter (the step counters are plain tensors either way)."""
    optimizer.load_state_dict(state)
    for p, s in optimizer.state.items():
        if isinstance(p, DTensor):
            for k, v in s.items():
                if not isinstance(v, DTensor) and v.shape == p.to_local().shape:
                    s[k] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                              stride=p.stride())
