"""DeepSeekMoE (paper §2.2, Eqs. 20-22): shared experts plus top-K routed experts with a softmax gate.

Shapes: N tokens (batch × sequence flattened), d hidden, E routed experts, K experts per token,
I expert inner width, G expert groups (devices), M groups kept per token.

    s_{t,i} = softmax_i(u_t · e_i)                     router scores, fp32              Eq. 22
    g_{t,i} = s_{t,i} if i in TopK(s_t) else 0         greedy, or restricted to the M groups
                                                       with the highest max-score (device-limited, §2.2.2)
    h_t     = Σ_shared FFN(u_t) + Σ_i g_{t,i} FFN_i(u_t)                                 Eq. 20

Routed experts are stored stacked ([E, I, d] / [E, d, I]) so that one layer is three tensors; the
grouped path sorts token slots by expert and runs each chosen expert once on its tokens, so the work is
proportional to N·K and experts nobody chose are never read. `loop_experts` is its slow twin.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model import cpu_kernels
from dsv2.model.layers import MLP, differentiating, linear


@dataclass
class Routing:
    """What one MoE layer's router decided for a batch [B,S]: returned by the forward as a value, for the
    balance losses (`dsv2.train.balance`) and the training metrics."""

    scores: torch.Tensor  # [B,S,E] fp32 softmax over all experts (carries the router's gradient)
    indices: torch.Tensor  # [B,S,K] chosen experts, before any token dropping
    kept: torch.Tensor | None = None  # [B,S,K] bool: slots that reached their expert (None: all of them)


class Gate(nn.Module):
    """Router: fp32 softmax scores, greedy or group-limited top-k, then DeepSeek's weight rule."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.method = config.routing_method
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.prepared_weight: torch.Tensor | None = None  # fp32 copy by `prepare_for_inference`; not state

    @torch.no_grad()
    def prepare_for_inference(self) -> None:
        """Make the fp32 copy of the weight once (see `Transformer.prepare_for_inference`)."""
        self.prepared_weight = self.weight.detach().float()  # detached: a Parameter would be registered as one

    def candidates(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores top-k picks from: all of them (greedy), or those in the M best groups (device-limited)."""
        if self.method != "group_limited_greedy":
            return scores
        # a group's score is the best expert score in it; keep the M best groups (Eq. 23's device limit)
        per_group = scores.unflatten(-1, (self.n_group, -1))  # [N,G,E/G]
        top_groups = per_group.amax(dim=-1).topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(per_group[..., 0], dtype=torch.bool).scatter_(1, top_groups, True)
        return per_group.masked_fill(~keep.unsqueeze(-1), 0.0).flatten(1)

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N,d] -> weights [N,K] fp32, expert ids [N,K], scores [N,E] fp32.

        replay: expert ids [N,K] chosen elsewhere (the inference engine that sampled these tokens) to use
        instead of this top-k: Rollout Routing Replay (R3, arXiv 2510.11370). The weights are still this
        router's scores of those experts, under the same weight rule, so the router keeps its gradient."""
        # fp32 router like the reference; a prepared model made the fp32 copy of a bf16 weight once. Autocast
        # is switched off here, or bf16 autocast would run this GEMM in bf16: routing decisions are made on
        # differences between scores, which bf16's 8 bits of mantissa blur into ties (the reference routes in fp32)
        prepared = self.prepared_weight is not None and not differentiating(self.weight)
        weight = self.prepared_weight if prepared else self.weight.float()
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), weight).softmax(dim=-1)
        if replay is not None:
            indices = replay.to(device=scores.device, dtype=torch.long)
            weights = scores.gather(1, indices)
        else:
            weights, indices = self.candidates(scores).topk(self.top_k, dim=-1, sorted=False)
        # DeepSeek-V2's rule is either/or: renormalised weights are not also scaled (reference-spec §11.2)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * self.scale
        return weights, indices, scores


class RoutedExperts(nn.Module):
    """E SwiGLU experts as stacked weights; w1/w2/w3 = gate/down/up projections.

    `per_expert` and `expert` are the two places that know how the weights are stored: a subclass with
    another storage (`dsv2.model.quant.QuantizedRoutedExperts`) overrides them and keeps the routing
    arithmetic of `forward` and `loop_experts`."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))

    def per_expert(self) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[torch.Tensor]]:
        """Indexable per-expert weights. When gradients flow, one `unbind` per tensor: indexing the stacked
        parameter once per expert would make autograd allocate and zero a gradient the size of all E
        experts for every expert used (22 GB of memory traffic per step for `small`)."""
        if differentiating(self.w1):
            return self.w1.unbind(0), self.w2.unbind(0), self.w3.unbind(0)
        return self.w1, self.w2, self.w3

    def prepare_for_inference(self) -> None:
        """Nothing to prepare: the stacked weights are what every path reads (`Transformer.prepare_for_inference`;
        quantized experts stack theirs here)."""

    @staticmethod
    def expert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
        return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)

    ROW_BUCKET = 16
    GROUPED_MAX_ELEMENTS = 1 << 20  # experts with fewer weights per projection run grouped on the CPU

    def expert_on(self, slab: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
        """One expert on its slab of rows. On the CPU in half precision, a slab of more than ROW_BUCKET rows
        runs padded with zero rows to a multiple of it: oneDNN builds (JIT-compiles) a kernel for every new
        GEMM shape, 0.3-1.6 ms each against ~0.1 ms for the GEMM itself, and the rows an expert gets change
        every step, so exact shapes would keep compiling; bucketed, a few dozen shapes cover every slab."""
        rows, bucket = len(slab), self.ROW_BUCKET
        if slab.device.type != "cpu" or slab.dtype == torch.float32 or rows <= bucket or rows % bucket == 0:
            return self.expert(slab, w1, w2, w3)
        return self.expert(F.pad(slab, (0, 0, 0, -rows % bucket)), w1, w2, w3)[:rows]

    # what one expert run by `dispatch` costs besides its weights' bytes (three kernel launches of ~20-45 us and its
    # share of the host sync), as the bytes the CPU reads in that time (2-core AMX Xeon: ~100 us at ~20 GB/s)
    DISPATCH_COST_BYTES = 2 << 20
    MAX_GATHER_ROWS = 1024  # where `gather_max_rows` stops looking: tiny experts would gather for thousands of rows
    # all E experts' weights at most this many: a compiled graph runs every expert on every token (`every_expert`)
    EVERY_EXPERT_MAX_ELEMENTS = 1 << 20

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Grouped: x [N,d], weights/indices [N,K] -> Σ_k w·FFN_idx(x) [N,d]. A slot whose expert id is -1
        (dropped by token dropping) is computed by no expert and contributes nothing.

        Each (token, k) slot is sorted by expert id, each chosen expert runs once on its contiguous slab,
        then the slots go back in place and are summed over k in fp32 (the reference's reduction order).
        Inside a `torch.compile` graph (`dsv2.infer.compiled`) nothing may read a count back to the host, so
        the graph picks a sync-free twin by what it reads: in bf16 on a CPU with AVX-512 BF16, for 2 to
        KERNEL_MAX_ROWS rows, dsv2's own kernel (`dsv2.model.cpu_kernels`), each chosen expert read once (one
        row's slots are distinct experts, which `gathered` reads once too); else `gathered` (each slot's expert)
        while the rows are few (`gather_max_rows`); `every_expert` when all E experts are small; otherwise the
        opaque op `dsv2::routed_experts`, which the graph calls as it is and which runs `eager`, with its host
        syncs and kernels. Outside a graph, `eager`: dsv2's kernel on a CPU without AMX while the slots per expert
        are few (`kernel_runs`), else `dispatch`.
        """
        if torch.compiler.is_compiling():
            if self.takes_kernel(x):
                return cpu_kernels.routed_experts(x, weights, indices, self.w1, self.w2, self.w3)
            if self.stacked(x.dtype) and len(x) <= self.gather_max_rows(indices.shape[1]):
                return self.gathered(x, weights, indices)
            if self.runs_every_expert(x.dtype):
                return self.every_expert(x, weights, indices)
            return routed_experts_op(x, weights, indices, self.op_key)
        return self.eager(x, weights, indices)

    def eager(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`forward` outside a compiled graph (and inside `dsv2::routed_experts`): dsv2's CPU kernel where
        `kernel_runs` says it is the faster, else `dispatch`, its twin."""
        if self.kernel_runs(x, indices.numel()):
            return cpu_kernels.routed_experts(x, weights, indices, self.w1, self.w2, self.w3)
        return self.dispatch(x, weights, indices)

    # slots per expert (N·K / E, balanced routing) up to which the kernel runs eager experts on a CPU without AMX:
    # it reads each chosen expert once for all of its tokens (a matrix too large for L2 in tiles of 4 rows x 6
    # tokens, one that fits in passes of 8 tokens) with AVX-512 BF16 dot products, where `dispatch` pays oneDNN's
    # calls per expert and re-lays each weight out for its GEMMs. 2-core Zen 4, one layer, kernel / dispatch
    # (`benchmarks/cpu_kernels.py --experts`; docs/benchmarks.md, twentieth session): V2-Lite's experts (64 of
    # 1408 x 2048) 0.69 at 1.5 slots an expert, 0.75 at 6, 0.83 at 12, 0.77 at 24, 0.88 at 48, 1.05 at 96;
    # `small`'s (32 of 256 x 1024) 0.24 at 2, 0.65 at 16, 0.90 at 32, 1.04 at 64, 1.37 at 128. With AMX tiles
    # `dispatch`'s GEMMs run on them, and the kernel is left to the compiled decode graphs (`takes_kernel`)
    KERNEL_MAX_SLOTS = 64

    def kernel_runs(self, x: torch.Tensor, n_slots: int) -> bool:
        """Whether `eager` runs these experts on x (n_slots token slots) through `cpu_kernels.routed_experts`: the
        bf16 kernels loaded on a CPU without AMX, bf16 x on the CPU, stacked bf16 weights, no gradient to record
        (the kernel has no backward), and up to KERNEL_MAX_SLOTS slots per expert."""
        return (cpu_kernels.loaded_bf16() and not cpu_kernels.loaded_amx() and x.device.type == "cpu"
                and x.dtype == torch.bfloat16 and self.stacked(x.dtype) and not differentiating(self.w1)
                and n_slots <= self.KERNEL_MAX_SLOTS * self.n_experts)

    # rows up to which `cpu_kernels` runs a compiled graph's experts: past 16, V2-Lite's experts cost it as much as
    # `dispatch` (16 rows: 113 ms against 111 for one layer; 64 rows: 211 against 160), as its dot products
    # re-read each expert once per 8 tokens; at 8 rows 41 ms against 69 (dispatch) and 72 (gathered); `small`'s
    # 8-row decode step 55 ms against 67 with `gathered` (2-core AMX Xeon, a third of its time stolen by the host)
    KERNEL_MAX_ROWS = 16

    def takes_kernel(self, x: torch.Tensor) -> bool:
        """Whether a compiled graph runs these experts on x through `cpu_kernels`: loaded (a CPU with AVX-512
        BF16, built), bf16 x of 2 to KERNEL_MAX_ROWS rows on the CPU, and stacked bf16 weights."""
        return (cpu_kernels.loaded_bf16() and x.device.type == "cpu" and x.dtype == torch.bfloat16
                and 2 <= len(x) <= self.KERNEL_MAX_ROWS and self.stacked(x.dtype))

    def stacked(self, dtype: torch.dtype) -> bool:
        """Whether the weights are the stacked tensors of this class in `dtype` (not a quantized or FP8 storage),
        which the compiled twins index and multiply as they are."""
        return all(isinstance(w, torch.Tensor) and w.dtype == dtype for w in (self.w1, self.w2, self.w3))

    def gather_max_rows(self, top_k: int) -> int:
        """The most rows (tokens of `top_k` slots) for which a compiled graph runs `gathered` rather than reading
        each chosen expert once: while the bytes it reads twice (slots beyond the distinct experts the rows
        choose, N·K - E·(1 - (1 - K/E)^N) for balanced routing) cost no more than the launches `dispatch` spends
        on those distinct experts (DISPATCH_COST_BYTES each). Decode on the 2-core AMX Xeon: `small` (32 experts
        of 1.5 MB) gathers up to 16 rows, 32.7 ms a batch-8 step against 49.3 through the op; V2-Lite (64 of
        17 MB) up to 3, as 8 rows gathered read 48 experts for ~34 distinct: 173 ms against 148."""
        n_experts, top_k = self.n_experts, min(top_k, self.n_experts)
        expert_bytes = sum(w[0].numel() * w.element_size() for w in (self.w1, self.w2, self.w3))
        rows = 0
        while rows < self.MAX_GATHER_ROWS:
            distinct = n_experts * (1 - (1 - top_k / n_experts) ** (rows + 1))
            if ((rows + 1) * top_k - distinct) * expert_bytes > distinct * self.DISPATCH_COST_BYTES:
                break
            rows += 1
        return rows

    def runs_every_expert(self, dtype: torch.dtype) -> bool:
        """Whether a compiled graph computes every expert on every token (activations of `dtype`): stacked
        weights, at most EVERY_EXPERT_MAX_ELEMENTS in all (nano's 8: 196K)."""
        return (self.stacked(dtype)
                and sum(w.numel() for w in (self.w1, self.w2, self.w3)) <= self.EVERY_EXPERT_MAX_ELEMENTS)

    def gathered(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sync-free twin of `forward` for a compiled graph and a few slots: each slot's expert, its weights
        indexed by the slot's expert id, as products summed over the input dimension, which inductor fuses with
        the indexing into one reduction per projection, reading the chosen rows in place (no copy of the
        gathered weights, no GEMM or host read per expert). Decode at batch 1 on the 2-core AMX Xeon: `small`'s
        4 of 32 experts 0.41 ms a layer against `dispatch`'s 1.1 ms; V2-Lite's 6 of 64, 7.0 against 7.3.
        Each projection rounds to x's dtype, and the gates sum the experts' outputs in fp32, as in `forward`;
        a dropped slot (id -1) reads expert 0 with a gate of 0."""
        live = indices >= 0
        slot = torch.where(live, indices, 0)
        gates = torch.where(live, weights, 0.0)
        x32 = x.float()[:, None, None, :]  # [N,1,1,d] against the gathered [N,K,I,d]
        gate = (self.w1[slot].float() * x32).sum(-1).to(x.dtype)  # [N,K,I]
        up = (self.w3[slot].float() * x32).sum(-1).to(x.dtype)
        inner = F.silu(gate) * up
        out = (self.w2[slot].float() * inner.float()[:, :, None, :]).sum(-1).to(x.dtype)  # [N,K,d]
        return (gates[:, :, None] * out.float()).sum(1).to(x.dtype)

    def every_expert(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sync-free twin of `forward` for a compiled graph: every expert on every token, each output weighted by
        its gate, which is 0 for an expert the token did not choose (and for a dropped slot, id -1). N·E expert
        FFNs instead of N·K, but no sort, count or split to end the graph with a host sync; for experts this
        small that costs less than the graph break (nano, decode: 1.0 ms a step compiled against 3.4 eager).
        Each expert's output rounds to x's dtype and the gates sum them in fp32, as in `forward`."""
        n_experts = self.n_experts
        slots = torch.where(indices >= 0, indices, n_experts)  # a dropped slot's weight goes to a column cut off
        gates = weights.new_zeros(len(x), n_experts + 1).scatter_add(1, slots, weights)[:, :n_experts]  # [N,E]
        inner = F.silu(torch.einsum("nd,eid->nei", x, self.w1)) * torch.einsum("nd,eid->nei", x, self.w3)
        out = torch.einsum("nei,edi->ned", inner, self.w2)  # [N,E,d]
        return torch.bmm(gates.unsqueeze(1), out.float()).squeeze(1).to(x.dtype)

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`forward` by the chosen experts only, grouped by expert."""
        n_tokens, top_k = indices.shape
        n_experts = self.n_experts
        if n_tokens == 0:
            return torch.zeros_like(x)
        live = indices.flatten() >= 0
        slot_expert = torch.where(live, indices.flatten(), n_experts)  # dropped slots sort last, bucket E
        order = slot_expert.argsort(stable=True)
        counts = torch.bincount(slot_expert, minlength=n_experts + 1)
        x_sorted = x[order // top_k]
        if self.uses_grouped_mm(x, n_tokens * top_k):
            out_sorted = self._grouped_mm(x_sorted, counts)
        else:
            w1, w2, w3 = self.per_expert()
            slabs = x_sorted.split(counts.tolist())
            outs = [self.expert_on(slab, w1[e], w2[e], w3[e]) for e, slab in enumerate(slabs[:n_experts]) if len(slab)]
            out_sorted = torch.cat([*outs, x_sorted.new_zeros(len(slabs[n_experts]), x.shape[-1])])
        out = torch.empty_like(out_sorted).index_copy(0, order, out_sorted)  # back to slot order
        # Σ_k w_k·out_k as one batched [1,K]x[K,d] product per token: the same fp32 sum over k in slot order,
        # without the [N,K,d] fp32 product a broadcast multiply materialises (2x faster on the CPU)
        combined = torch.bmm(weights.unsqueeze(1), out.view(n_tokens, top_k, -1).float()).squeeze(1)
        return combined.to(x.dtype)

    def uses_grouped_mm(self, x: torch.Tensor, n_slots: int) -> bool:
        """Whether `forward` runs the experts as grouped GEMMs rather than one expert at a time: on the GPU in
        bf16. On the CPU in half precision outside training, for experts of fewer than GROUPED_MAX_ELEMENTS
        weights each once they get >= ROW_BUCKET / 2 rows each on average (a prefill chunk): one call per
        projection instead of three per expert saves 15-20% of the expert time there (small, 128 tokens: 11.1 ->
        9.0 ms a layer). Not at decode's one or two rows per expert, where padding to ROW_BUCKET rows would cost
        more than the calls, nor for larger experts: the grouped GEMM has each weight re-laid out for AMX on
        every call, which `layers.linear` avoids (V2-Lite's, 128 tokens: 71 ms a layer grouped, 65 one by one)."""
        if not hasattr(F, "grouped_mm"):
            return False
        if x.is_cuda:
            return x.dtype == torch.bfloat16
        return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not differentiating(self.w1)
                and self.w1[0].numel() < self.GROUPED_MAX_ELEMENTS and 2 * n_slots >= self.ROW_BUCKET * self.n_experts)

    def _grouped_mm(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The per-expert FFNs as one grouped GEMM per projection. x_sorted: the slots' rows sorted by expert,
        counts [E+1]: rows per expert, then the dropped slots' rows (sorted last), which no expert computes."""
        if x_sorted.device.type == "cpu":
            return self._grouped_mm_in_buckets(x_sorted, counts)
        # GPU, without a host sync: groups with no rows are skipped by the kernel, so unchosen experts are still
        # never read; the rows of dropped slots, after every group, are left to no group and zeroed
        offsets = counts[: self.n_experts].cumsum(0).to(torch.int32)
        out = self._grouped_ffn(x_sorted, offsets)
        unassigned = torch.arange(len(x_sorted), device=x_sorted.device) >= offsets[-1]
        return out.masked_fill(unassigned.unsqueeze(-1), 0.0)

    def _grouped_mm_in_buckets(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """CPU: each expert's rows padded with zero rows to a multiple of ROW_BUCKET (why: `expert_on`), so the
        grouped GEMMs see a few dozen shapes, not a new one every step."""
        per_expert, bucket = counts[: self.n_experts], self.ROW_BUCKET
        padded = (per_expert + bucket - 1) // bucket * bucket
        ends = padded.cumsum(0)
        live = int(per_expert.sum())
        expert_of_row = torch.repeat_interleave(torch.arange(self.n_experts), per_expert)  # [live]
        rank = torch.arange(live) - (per_expert.cumsum(0) - per_expert)[expert_of_row]
        dest = (ends - padded)[expert_of_row] + rank  # where each live row sits among the padded groups
        x_padded = x_sorted.new_zeros(int(ends[-1]), x_sorted.shape[-1])
        x_padded[dest] = x_sorted[:live]
        out = self._grouped_ffn(x_padded, ends.to(torch.int32))[dest]
        return torch.cat([out, out.new_zeros(len(x_sorted) - live, out.shape[-1])])

    def _grouped_ffn(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """w2(silu(w1 x) * w3 x) with group g (rows offsets[g-1]..offsets[g]) through expert g's weights."""
        gate = F.grouped_mm(x, self.w1.transpose(1, 2), offs=offsets)
        up = F.grouped_mm(x, self.w3.transpose(1, 2), offs=offsets)
        return F.grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs=offsets)

    def loop_experts(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Slow twin of `forward`: visit every expert, gather its tokens, accumulate in fp32."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        w1, w2, w3 = self.per_expert()
        for e in range(self.n_experts):
            token, slot = (indices == e).nonzero(as_tuple=True)
            if token.numel():
                expert_out = self.expert(x[token], w1[e], w2[e], w3[e])
                out.index_add_(0, token, expert_out.float() * weights[token, slot, None])
        return out.to(x.dtype)


# Experts by key, for `dsv2::routed_experts` (a custom op takes tensors and numbers, not modules). Keys come from a
# counter, never reused, and the map holds its modules weakly, so a freed module leaves it.
_EXPERTS: weakref.WeakValueDictionary[int, RoutedExperts] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def register_for_compile(experts: RoutedExperts) -> None:
    """Give `experts` a fresh key (`op_key`) for `dsv2::routed_experts`, as `dsv2.infer.compiled` does for every
    expert layer of a model it compiles: a fresh one each time, so a deep copy, which copies the attribute, is
    never dispatched as its original."""
    experts.op_key = next(_KEYS)
    _EXPERTS[experts.op_key] = experts


@torch.library.custom_op("dsv2::routed_experts", mutates_args=())
def routed_experts_op(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, key: int) -> torch.Tensor:
    """`RoutedExperts.eager` of the experts registered as `key`, opaque to torch.compile: a compiled graph
    (`dsv2.infer.compiled`) calls it as one op, and inside, the split by expert reads its counts on the host
    and each expert runs on `layers.linear`'s kernels (or all on dsv2's kernel), as in an eager forward. The op
    reads the module's weights as they are, so it never holds a copy that could go stale."""
    return _EXPERTS[key].eager(x, weights, indices)


@routed_experts_op.register_fake
def _(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, key: int) -> torch.Tensor:
    return torch.empty_like(x)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Gate(config)
        self.experts = RoutedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        # N_s shared experts are one MLP N_s times as wide (identical math, one GEMM instead of N_s)
        n_shared = config.n_shared_experts or 0
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * n_shared) if n_shared else None
        )
        self.capacity: nn.Module | None = None

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """x [B,S,d] -> (output [B,S,d], this layer's routing); `replay` [B,S,K]: experts to route to (`Gate`).

        `capacity`, None in the model, is where training plumbing installs device-level token dropping
        (`dsv2.train.balance.install_token_dropping`): given the chosen slots' affinities and experts [B,S,K],
        it returns which slots to keep, and the dropped ones are removed before any expert runs."""
        flat = x.flatten(0, -2)
        weights, indices, scores = self.gate(flat, None if replay is None else replay.flatten(0, -2))
        per_token = (*x.shape[:-1], -1)
        routing = Routing(scores.view(per_token), indices.view(per_token))
        if self.capacity is not None:
            affinity = scores.detach().gather(1, indices)  # the paper ranks by s_{i,t}, not the scaled weight
            routing.kept = self.capacity(affinity.view(per_token), routing.indices)
            indices = indices.masked_fill(~routing.kept.view_as(indices), -1)
        y = self.experts(flat, weights, indices).view_as(x)
        return (y if self.shared_experts is None else y + self.shared_experts(x)), routing
