"""A CPU kernel of dsv2's own: the routed experts of a decode step, each chosen expert's weights read once.

Why: a decode step is a few tokens, and its routed experts are most of the bytes it reads. Of the ways PyTorch
offers to run them inside a compiled graph, none reads only the distinct experts the tokens chose at the
machine's bandwidth: `RoutedExperts.gathered` reads one expert per (token, k) slot (at batch 8 `small`'s 32
slots for ~21 distinct experts) through reductions inductor generates, which are bound by their arithmetic
even when the weights sit in cache; the opaque `dispatch` op reads each expert once but pays a host sync and
three kernel launches per expert. `cpu_kernels.cpp` groups the slots by expert on the host side of one call
and streams each chosen expert's three matrices once, for all of its tokens, with AVX-512 BF16 dot products
(`vdpbf16ps`), one expert per thread.

It is built on first use with torch's C++ extension loader (`torch.utils.cpp_extension.load`: the C++ compiler
and ninja that `torch.compile` on a CPU needs anyway) into torch's extension cache, and used only inside
compiled decode graphs on a CPU with AVX-512 BF16 (`dsv2.infer.compiled` calls `load()` before it traces). On
any other machine, or if the build fails (a warning says why), the graphs keep `gathered` and the `dispatch`
op. `DSV2_CPU_KERNELS=0` turns it off.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# -fopenmp: at::parallel_for is inline, and without it runs on one thread (torch's own libgomp serves it)
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp"]
_loaded = False  # a plain global, so a traced graph reads it as a constant (checked by a guard)
_tried = False


def supported() -> bool:
    """Whether this machine can run the kernel: a CPU with AVX-512 BF16, and not turned off by the user."""
    return os.environ.get("DSV2_CPU_KERNELS", "1") != "0" and torch.cpu._is_avx512_bf16_supported()


def load() -> bool:
    """Build (once per source version, cached by torch) and load the kernel where `supported`; whether it is
    loaded. Call it before tracing: building inside a traced region would be traced."""
    global _loaded, _tried
    if _tried:
        return _loaded
    _tried = True
    if not supported():
        return False
    try:
        from torch.utils.cpp_extension import load as build

        build(name=f"dsv2_{SOURCE.stem}", sources=[str(SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
              is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, no ninja, an old assembler: fall back, saying why
        warnings.warn(f"dsv2: the CPU experts kernel ({SOURCE.name}) did not build, decode keeps PyTorch's "
                      f"paths: {error}", stacklevel=2)
        return False
    torch.library.register_fake("dsv2_cpu::routed_experts_bf16")(_output_like_x)
    _loaded = True
    return True


def _output_like_x(x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor,
                   w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def loaded() -> bool:
    return _loaded


def routed_experts(x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor,
                   w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """Σ_k gates[n,k]·FFN_{indices[n,k]}(x[n]) for bf16 x [N,d] and stacked bf16 weights w1/w3 [E,I,d],
    w2 [E,d,I]; a slot of id -1 contributes nothing. Rounds as `RoutedExperts.forward` does in bf16."""
    return torch.ops.dsv2_cpu.routed_experts_bf16(x, gates, indices, w1, w2, w3)
