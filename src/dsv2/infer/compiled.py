"""The decode step as one compiled graph: `torch.compile` of `Transformer.forward` for one new token per row; and
prefill chunks the same way (`CompiledPrefill`).

An eager decode step of a small model is mostly the cost of its operators, not of its weights: nano's makes
~1,500 ATen calls (1-3 us each) and ~40 GEMMs through oneDNN (~20 us each, whatever the size), 3.4 ms in all
for 0.07 ms of weight reads (2-core AMX Xeon, torch 2.13). Compiled, the elementwise work fuses into a few C++
kernels and inductor's own GEMMs run on weights it packed once: 1.0 ms. Three things make the forward one
graph:

- no host reads: every row attends over the whole width of its block table (`Transformer.forward(span=...)`),
  its own positions picked out by a mask, instead of the span read back from the device;
- routing without a graph break, by one of `RoutedExperts`' sync-free twins: in bf16 on a CPU with AVX-512 BF16,
  for 2 to `KERNEL_MAX_ROWS` rows, dsv2's own kernel (`dsv2.model.cpu_kernels`: one opaque call per layer that
  reads each chosen expert once, for all of its tokens); elsewhere, while the batch's rows are few
  enough that reading an expert per slot costs less than dispatching (`gather_max_rows`: `small` up to 16 rows,
  V2-Lite up to 3), `gathered`, each slot's expert indexed in place inside the reduction inductor generates for it
  (`small`'s step at batch 1: 10.4 ms against 17.2 with the op below); past that, `every_expert` (every expert on
  every token, weighted by the gates) when all experts are small, else one opaque custom op per layer
  (`dsv2::routed_experts`), inside which the eager dispatch reads its counts on the host and runs each chosen expert
  once on the eager kernels (`F.grouped_mm`, the sync-free alternative, calls a GEMM for every expert, chosen or not,
  on the CPU). The choice is a guard on the batch size: the batch graph compiles again the first time a batch crosses
  it;
- shapes that do not recompile: batch size and table width are symbolic (`dynamic=True`), so one graph serves
  every batch of two or more rows on each side of the experts' guard, and every context length; one row is its
  own graph (a dimension of 1 is always specialised), and tables are padded to two blocks at least for the same
  reason.

A prefill chunk is the same forward with S >= 2 new tokens per row (S symbolic too), the last position's logits
returned: for a small model it is operators as much as a decode step is (nano, 128 tokens: 7.7 ms compiled against
19.4 eager). Its graphs are separate from the decode step's, and one more guard splits each: MLA's choice of
naive or absorbed attention (`MLA.absorbed_is_cheaper`), which compares the chunk with the span it attends
over, so a short chunk over a long cache compiles a second graph. The engine compiles a prefill only when its
chunks are all one length (one prompt, or equal prompts in lock-step), MAX_TOKENS in all at most, and no prompt
logprobs are asked for; uneven or larger chunks run eagerly, packed.

The eager forward is the readable twin; `tests/test_compiled.py` holds the two equal. Compiling takes tens of
seconds per graph, once per process (inductor keeps its kernels on disk, so a second process is faster).

Weights: float ones, and for a decode step also int8 ones in w8a8 (`Int8Linear.traces`: dsv2's kernels built, K a
multiple of 64) and int4 ones in w4a8 (`Int4Linear.traces`: dsv2's kernels built, groups of 64 or 128), whose
linears the graph calls as dsv2's kernels, opaque ops, with the rest of the step fused around them; other quantized
formats (weight-only int8 and int4, FP8, w8a8 on fbgemm, w4a8 in groups of 32) do not trace and run eagerly.

Freezing makes the weights constants of the graph: inductor keeps its own packed copy of every weight the
graph multiplies by (more memory), and a graph outlives any change to them. So the graph belongs to one
`inference_version` of the model, and preparing the model again (new weights) needs a new `CompiledDecode`
(`CompiledPrefill`).
"""

from __future__ import annotations

import types

import torch

from dsv2.infer.cache import PagedBatch
from dsv2.model import cpu_kernels
from dsv2.model.moe import RoutedExperts, register_for_compile
from dsv2.model.quant import Int4Linear, Int8Linear
from dsv2.model.transformer import Transformer

# inductor's settings: weights frozen into the graph (packed once for its GEMMs), and GEMMs chosen by timing
# its C++ templates (AMX / AVX-512 micro-kernels) against ATen's: nano's decode step 1.0 ms against 1.7 without
# autotuning, 3.4 eager; the timing costs compile time (~30-60 s a graph instead of ~10-20)
AUTOTUNED = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
             "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}  # quiet on stderr
FROZEN = {"freezing": True}


def _own_copy(fn: types.FunctionType) -> types.FunctionType:
    """fn with a code object of its own, on which dynamo keeps the graphs it compiles from it."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class _CompiledForward:
    """`Transformer.forward` over a paged cache as compiled graphs, for one row and for batches of rows; what
    the two kinds of step share (the refusals, the weights' version, the per-instance graphs, the settings)."""

    MIN_TABLE_WIDTH = 2  # tables this wide at least: a table of one block would be a graph of its own
    WHAT = "forward"
    TAKES_INT8_ACTIVATIONS = False  # w8a8 and w4a8 weights on dsv2's kernels (`traces()`) besides float ones

    def __init__(self, model: Transformer, autotune: bool = True):
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"a compiled {self.WHAT} is built and measured on the CPU only; the model is on {device}")
        cpu_kernels.load()  # built before tracing (the experts and int8 kernels, where this CPU has AVX-512 BF16)
        traced_quantized = {name for name, module in model.named_modules()
                       if isinstance(module, Int8Linear | Int4Linear) and module.traces()} \
            if self.TAKES_INT8_ACTIVATIONS else set()
        takes = "float weights (bf16, fp16, fp32)" + (
            ", or w8a8 with K a multiple of 64 or w4a8 in groups of 64 or 128 on dsv2's kernel"
            if self.TAKES_INT8_ACTIVATIONS else "")
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if (not tensor.is_floating_point() or tensor.element_size() == 1) and \
                    name.rpartition(".")[0] not in traced_quantized:
                raise ValueError(f"a compiled {self.WHAT} takes {takes}: {name} is {tensor.dtype}; run quantized "
                                 f"weights eagerly")
        for module in model.modules():
            if isinstance(module, RoutedExperts):  # the key its graph calls `dsv2::routed_experts` with
                register_for_compile(module)
        self.model = model
        self.inference_version = model.inference_version  # the weights frozen into the graph
        self._options = AUTOTUNED if autotune else FROZEN
        # dynamo keeps compiled graphs on the function's code object and finds them again by guards that compare
        # object ids, which a later model or weight copy can reuse once the old one is freed; so every instance
        # compiles its own copies of the code, and its graphs (its weights frozen in) are no one else's. Two
        # copies: one row (a graph of its own, a dimension of 1 being specialised) and batches, so a call checks
        # the guards of its one graph only (with both graphs on one code, a one-row step checked the batch
        # graph's guards first: nano 1.46 ms a step against 1.03). No guards on the model's modules: its weights
        # are frozen in and `__call__` checks the version they came from, so those guards re-checked what cannot
        # change under the graph, one tensor at a time: 1.6 ms of a V2-Lite-4 w8a8 step at batch 1 (~600 expert
        # tensors) against 0.16 without (guards on the inputs' shapes and on globals stay)
        forward = type(self)._forward
        self._one_row, self._rows = (
            torch.compile(types.MethodType(_own_copy(forward), self), dynamic=True,
                          options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
            for _ in range(2))

    def _forward(self, tokens: torch.Tensor, cache: PagedBatch) -> torch.Tensor:
        """tokens [B,S] -> the last position's logits [B,vocab], every row attending over its whole table."""
        raise NotImplementedError

    def _check(self, tokens: torch.Tensor) -> None:
        """Raise if this graph cannot run `tokens` [B,S]."""
        raise NotImplementedError

    def __call__(self, tokens: torch.Tensor, cache: PagedBatch) -> torch.Tensor:
        if self.model.inference_version != self.inference_version:
            raise RuntimeError(f"the model was prepared again (new weights) after this {self.WHAT} was compiled "
                               f"with the old ones frozen in; compile a new {type(self).__name__}")
        self._check(tokens)
        # the settings as a patch around the call, not torch.compile(options=...): with those, freezing is not
        # applied (torch 2.13; the weights stay graph inputs, 1.8 ms a nano step against 0.8); a call that
        # compiles (the first of a shape) is inside the patch, and the others lose ~10 us to it. No duck sizing:
        # with it, sizes that are equal when a graph is traced (a batch of 3 over tables 3 blocks wide) become one
        # symbol, and the graph compiles again the first time they part
        with torch._inductor.config.patch(self._options), torch.fx.experimental._config.patch(use_duck_shape=False):
            return (self._one_row if len(tokens) == 1 else self._rows)(tokens, cache)


class CompiledDecode(_CompiledForward):
    """`model(tokens, cache=...)` for tokens [B, 1] as a compiled graph -> logits [B, vocab]. On the CPU; the
    model prepared for inference and run under `torch.inference_mode()` (what `LLMEngine` does)."""

    WHAT = "decode step"
    # the step's rows are few, so w8a8's and w4a8's linears run on dsv2's kernels, opaque calls in the graph
    # (V2-Lite-4 w8a8 at batch 1: 46.8-52.7 ms against 56.7-63.6 eager, alternating processes on a noisy 2-core AMX
    # Xeon). A prefill chunk's rows would dequantize past INT8_KERNEL_MAX_ROWS, and freezing would keep each
    # dequantized weight
    TAKES_INT8_ACTIVATIONS = True

    def _forward(self, tokens: torch.Tensor, cache: PagedBatch) -> torch.Tensor:
        return self.model(tokens, cache=cache, span=cache.capacity)[:, -1]

    def _check(self, tokens: torch.Tensor) -> None:
        if tokens.shape[1] != 1:
            raise ValueError(f"a compiled decode step takes one new token per row, got tokens {tuple(tokens.shape)}")


class CompiledPrefill(_CompiledForward):
    """A prefill chunk of S >= 2 tokens in each of B rows (equal chunks) as a compiled graph -> the logits of
    each row's last token [B, vocab]. S is symbolic, so one graph takes every chunk length; a chunk of one
    token is a decode step's shape, for `CompiledDecode`."""

    WHAT = "prefill"
    # chunks of this many tokens in all (rows x chunk) at most, where the operators' cost is what compiling saves;
    # measured past it, the compiled graph lost: small, one 1024-token prompt in chunks of 512, 906 ms compiled
    # against 831 eager; one of 128 tokens, compiled ~1.1-1.4x faster, nano's 2.5x (2-core AMX Xeon, torch 2.13)
    MAX_TOKENS = 256

    @classmethod
    def takes(cls, counts: list[int]) -> bool:
        """Whether a prefill step's chunks (tokens per row) are worth this graph: all one length, of two tokens
        or more, MAX_TOKENS in all at most."""
        return len(set(counts)) == 1 and counts[0] >= 2 and sum(counts) <= cls.MAX_TOKENS

    def _forward(self, tokens: torch.Tensor, cache: PagedBatch) -> torch.Tensor:
        # only the last position through the output projection (the [B,S,vocab] logits would be a GEMM of their own)
        last = torch.full((len(tokens),), tokens.shape[1] - 1, device=tokens.device)
        return self.model(tokens, cache=cache, span=cache.capacity, logits_index=last)

    def _check(self, tokens: torch.Tensor) -> None:
        if tokens.shape[1] < 2:
            raise ValueError(f"a compiled prefill takes chunks of two tokens or more, got tokens "
                             f"{tuple(tokens.shape)}; one new token per row is a decode step")
