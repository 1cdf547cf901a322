"""What the machine computes fast: the CPU's instruction-set level and the dtype inference should use there.

On a CPU, bf16 matmuls are fast only where the hardware multiplies bf16 natively (AVX-512 BF16, AMX); on
AVX2 they are emulated and several times slower than fp32 (measured: ../docs/benchmarks.md). So
`dtype="auto"`, the default of `LLM` and the inference commands, is bf16 on a GPU and on a CPU with native
bf16, and fp32 on any other CPU.
"""

from __future__ import annotations

import platform
import time

import torch

DTYPES = ("auto", "bfloat16", "float32")


def cpu_capability() -> str:
    """The CPU's level in words: "AMX", "AVX-512 BF16", "AVX-512", "AVX2" or torch's own name for it."""
    cpu = torch.cpu
    if cpu._is_amx_tile_supported():
        return "AMX"
    if cpu._is_avx512_bf16_supported():
        return "AVX-512 BF16"
    if cpu._is_avx512_supported():
        return "AVX-512"
    if cpu._is_avx2_supported():
        return "AVX2"
    return torch.backends.cpu.get_cpu_capability()


def has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX tiles)."""
    return cpu_capability() in ("AMX", "AVX-512 BF16")


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """"auto" -> bf16 on a GPU or a CPU with native bf16, else fp32; a dtype or its name -> that dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPES))} or a torch.dtype, got {dtype!r}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if torch.device(device).type != "cpu" or has_native_bf16():
        return torch.bfloat16
    return torch.float32


def describe() -> str:
    """One line naming the machine for a benchmark's output."""
    torch_level = torch.backends.cpu.get_cpu_capability()
    return (f"{platform.machine()} CPU, capability {cpu_capability()} (torch: {torch_level}), "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"dtype auto = {str(resolve_dtype('auto')).removeprefix('torch.')}")


def read_bandwidth_gbs(device: str | torch.device = "cpu", repeats: int = 7) -> float:
    """The machine's read bandwidth in GB/s, for rooflines: the fastest full read of a 512 MiB tensor, best of
    `repeats`, over a few reductions (int64 max, int32 max, fp32 sum), as whichever one the vector units keep
    up with best is the one limited by memory alone (on the 2-core AVX-512 machine int64 max alone is
    compute-bound). Random data: pages of identical content (torch.ones) can be merged by the hypervisor and
    then read from cache."""
    x = torch.rand(128 * 2**20, device=device)  # 512 MiB
    reads = [lambda: x.view(torch.int64).max(), lambda: x.view(torch.int32).max(), lambda: x.sum()]
    best = float("inf")
    for read in reads:
        read()
        for _ in range(repeats):
            if x.is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            read()
            if x.is_cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
    return x.numel() * x.element_size() / best / 1e9
