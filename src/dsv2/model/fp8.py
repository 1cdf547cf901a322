"""DeepSeek's block-FP8 weights: the quantization math and modules that keep weights in it.

The format (DeepSeek-V3/R1 releases, DeepSeek-V3 README_WEIGHTS.md; also how V2 is FP8-quantized):
a weight W [N,K] is stored as `float8_e4m3fn` codes Q [N,K] next to a float32 tensor `<name>_scale_inv`
S [ceil(N/bn), ceil(K/bk)], one scale per bn×bk block (config.json `quantization_config`:
`{"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [bn, bk]}`).

    dequantize:  W[i,j] = float32(Q[i,j]) · S[i // bn, j // bk]       edge blocks are partial
    quantize:    S_b = amax(|W_b|) / 448,  Q_b = e4m3(W_b / S_b)       448 = largest finite e4m3 value

Which tensors are quantized (DeepSeek's releases; transformers' FineGrainedFP8 keeps `lm_head` and the
last module unconverted and its DeepSeek router is not a Linear): the Linear weights of attention, the
dense MLPs, the shared experts and every routed expert (one scale grid per expert). Not the embedding,
the norms, the router (`mlp.gate.weight`) or the LM head.

Error of the round trip, per element w of a block with scale S: e4m3 keeps 3 mantissa bits, so a value
in the normal range (|w|/S ≥ 2^-6) is off by at most half an ulp, 2^-4·|w|; a subnormal one by at most
half the smallest step, 2^-10·S. Hence |dequantize(quantize(w)) − w| ≤ 2^-4·|w| + 2^-10·S.

`FP8Linear` and `FP8RoutedExperts` hold the codes and scales as they are on disk (1 byte + 4/(bn·bk)
bytes per weight) and dequantize at use into the activations' dtype. That dequantization costs, per
call, one float32 temporary of the weight and about 9 bytes of memory traffic per weight element, more
than a bf16 matmul reads (2): on CPU, keeping FP8 trades speed for memory at rest. Routed experts are
dequantized one chosen expert at a time, so experts nobody chose are never read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.model import layers
from dsv2.model.moe import RoutedExperts

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"
_ROUTED_EXPERTS = re.compile(r"^layers\.\d+\.ffn\.experts\.w[123]$")
NOT_QUANTIZED = ("head",)  # Linear modules DeepSeek keeps in bf16: the LM head


def quantization_config(block: tuple[int, int]) -> dict:
    """config.json's `quantization_config` for block-FP8 weights, spelled as in DeepSeek's releases."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}


def scale_shape(shape: Sequence[int], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the scale grid of a weight [..., N, K]: [..., ceil(N/bn), ceil(K/bk)]."""
    *lead, n, k = shape
    return (*lead, math.ceil(n / block[0]), math.ceil(k / block[1]))


def _expand(scale: torch.Tensor, shape: Sequence[int], block: tuple[int, int]) -> torch.Tensor:
    """Each block's scale repeated over its block, cut to the weight's shape (partial edge blocks)."""
    n, k = shape[-2:]
    return scale.repeat_interleave(block[0], dim=-2)[..., :n, :].repeat_interleave(block[1], dim=-1)[..., :k]


def quantize_block_fp8(
    w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (e4m3 codes [..., N, K], float32 scale_inv [..., ceil(N/bn), ceil(K/bk)])."""
    w32 = w.detach().float()
    *lead, n, k = w32.shape
    nb, kb = scale_shape((n, k), block)[-2:]
    # zero padding to whole blocks leaves every block's amax unchanged (DeepSeek pads edge blocks the same way)
    padded = F.pad(w32.abs(), (0, kb * block[1] - k, 0, nb * block[0] - n))
    amax = padded.view(*lead, nb, block[0], kb, block[1]).amax(dim=(-3, -1))
    # an all-zero block gets scale 1: its codes are 0 either way, and 0/0 would make them NaN
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # clamp: w / (amax / 448) may round a hair above 448, which e4m3fn (no infinity) cannot hold
    codes = (w32 / _expand(scale_inv, w32.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale_inv


def dequantize_block_fp8(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The reference rule float32(Q) · S per block, then one rounding to `dtype`; [..., N, K] like w_fp8."""
    return (w_fp8.float() * _expand(scale_inv.float(), w_fp8.shape, block)).to(dtype)


def is_deepseek_fp8_target(model: nn.Module, param: str) -> bool:
    """Whether DeepSeek's releases store parameter `param` of our model in block FP8 (see module docstring)."""
    if _ROUTED_EXPERTS.match(param):
        return True
    module, _, leaf = param.rpartition(".")
    return leaf == "weight" and module not in NOT_QUANTIZED and isinstance(model.get_submodule(module), nn.Linear)


def can_keep_fp8(model: nn.Module, param: str) -> bool:
    """Whether a block-FP8 tensor for `param` can be kept in FP8: any Linear weight (the LM head too, should a
    checkpoint quantize it) or a routed-expert stack. Embeddings, norms and the router cannot."""
    if _ROUTED_EXPERTS.match(param):
        return True
    module, _, leaf = param.rpartition(".")
    return leaf == "weight" and isinstance(model.get_submodule(module), nn.Linear)


class _BlockFP8Storage(nn.Module):
    """Parameters stored in block FP8 whatever dtype the model is cast to.

    `Module.to(dtype)`, `.half()`, `.float()` cast every floating tensor, and float8 is one: the codes would
    become plain numbers and the float32 scales lose bits. Here a cast only changes `compute_dtype`, the
    dtype weights are dequantized into when no activation says otherwise; device moves (and `to_empty`)
    apply as usual. Subclasses hold nothing but their FP8 parameters (no buffers, no submodules).
    """

    block: tuple[int, int]
    compute_dtype: torch.dtype

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _BlockFP8Storage:
        for name, p in self._parameters.items():
            probe = fn(torch.empty(0, dtype=p.dtype, device=p.device))  # what fn does, without touching p
            if probe.dtype == p.dtype:
                new = fn(p)
            else:
                new = p.to(probe.device)
                if p.dtype == FP8_DTYPE:
                    self.compute_dtype = probe.dtype
            self._parameters[name] = nn.Parameter(new, requires_grad=False)
        return self


class FP8Linear(_BlockFP8Storage):
    """A bias-free Linear whose weight [out, in] is block-FP8 codes plus `weight_scale_inv`, dequantized at use.

    The parameter names are the checkpoint's own (`weight`, `weight_scale_inv`), so the HF name map and
    `save_model` handle it like any Linear. Inference only: the parameters do not require gradients.
    """

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = DEFAULT_BLOCK,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block, self.compute_dtype = block, compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(scale_shape((out_features, in_features), block), dtype=torch.float32), requires_grad=False,
        )

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] in `dtype` (default `compute_dtype`): what the dequantizing loader would hold."""
        return dequantize_block_fp8(self.weight, self.weight_scale_inv, self.block, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the whole weight per call, into the activations' dtype (cost: module docstring), then the kernel a loaded
        # bf16 weight would get (`layers.linear` picks by size and CPU), so kept and dequantized agree bit for bit
        return layers.linear(x, self.dequantized(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={list(self.block)}"


class _PerExpert(Sequence):
    """Expert e's (codes, scale_inv) of one stacked projection, indexable like the stacked weight itself."""

    def __init__(self, codes: torch.Tensor, scale_inv: torch.Tensor):
        self.codes, self.scale_inv = codes, scale_inv

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes[e], self.scale_inv[e]


class FP8RoutedExperts(_BlockFP8Storage, RoutedExperts):
    """RoutedExperts with stacked block-FP8 w1/w2/w3 ([E,I,d] / [E,d,I]) and per-expert scale grids
    (`w1_scale_inv` [E, ceil(I/bn), ceil(d/bk)], ...). The grouped forward is RoutedExperts'; only the
    per-expert weights differ: `per_expert` hands out (codes, scales) pairs and `expert` dequantizes the
    one expert it runs, into the activations' dtype."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, block: tuple[int, int] = DEFAULT_BLOCK,
                 compute_dtype: torch.dtype = torch.bfloat16):
        nn.Module.__init__(self)  # not RoutedExperts.__init__: it would allocate three plain stacks first
        self.block, self.compute_dtype, self.n_experts = block, compute_dtype, n_experts
        for name, shape in (("w1", (n_experts, inter_dim, dim)), ("w2", (n_experts, dim, inter_dim)),
                            ("w3", (n_experts, inter_dim, dim))):
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=FP8_DTYPE), requires_grad=False))
            scales = torch.empty(scale_shape(shape, block), dtype=torch.float32)
            setattr(self, name + SCALE_SUFFIX, nn.Parameter(scales, requires_grad=False))

    def per_expert(self) -> tuple[Sequence, Sequence, Sequence]:
        return (_PerExpert(self.w1, self.w1_scale_inv), _PerExpert(self.w2, self.w2_scale_inv),
                _PerExpert(self.w3, self.w3_scale_inv))

    def expert(self, x: torch.Tensor, w1, w2, w3) -> torch.Tensor:  # w*: (codes, scale_inv) of one expert
        w1, w2, w3 = (dequantize_block_fp8(codes, scale, self.block, x.dtype) for codes, scale in (w1, w2, w3))
        return super().expert(x, w1, w2, w3)

    def uses_grouped_mm(self, x: torch.Tensor, n_slots: int) -> bool:
        # one grouped GEMM would need every expert dequantized per call; the per-expert path reads only those chosen
        return False
