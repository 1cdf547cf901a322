"""What the CPU GEMV kernels PyTorch ships read per second at batch 1: the wall under decode on the CPU.

A decode step at batch 1 is a chain of matrix-vector products, one per weight matrix, so its floor is the
weights' bytes over the machine's read bandwidth. This prints, for the matrix shapes of DeepSeek-V2-Lite
(an expert's projections, the shared experts, the dense MLP, the LM head) and of the small presets' experts
(where oneDNN's ~20 us per call, not bytes, is the cost), ms per call and GB/s of weight
bytes for each format dsv2 can run, at 1 thread and at all threads, beside a plain large read (the
machine's bandwidth). A kernel whose GB/s doubles from 1 to 2 threads is compute-bound, not memory-bound:
faster memory would not help it, a better kernel would.

Each matrix is timed over enough distinct copies (≥ 64 MiB in all) that no call finds its weight in the
core's L2 cache; the median of several repeats.

    python benchmarks/cpu_kernels.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from dsv2 import hardware
from dsv2.model import layers
from dsv2.model.quant import Int4Linear, Int8Linear

THREADS = torch.get_num_threads()  # all threads: the second column of every row
SHAPES = {  # [N, K] of V2-Lite's weight matrices, then small's and nano's experts (where per-call cost rules)
    "expert gate/up 1408x2048": (1408, 2048),
    "expert down 2048x1408": (2048, 1408),
    "shared experts 2816x2048": (2816, 2048),
    "dense MLP 10944x2048": (10944, 2048),
    "LM head 102400x2048": (102400, 2048),
    "small expert 256x1024": (256, 1024),
    "nano expert 64x128": (64, 128),
}


def median_s(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def linear(weight: torch.Tensor) -> torch.nn.Linear:
    module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    module.weight.data = weight
    return module


class Kernel(torch.nn.Module):
    """y = fn(x, W) for a kernel function of dsv2.model.layers."""

    def __init__(self, weight: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.weight, self.fn = weight, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.weight)


class MatrixVector(torch.nn.Module):
    """y = W x by torch.mv (ATen's own GEMV, not oneDNN's GEMM) for a batch of one row."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mv(self.weight, x[0])[None]


def w8a8(weight: torch.Tensor) -> Int8Linear:
    module = Int8Linear.quantize(weight)
    module.int8_activations = True
    return module


FORMATS: dict[str, tuple[Callable[[torch.Tensor], torch.nn.Module], torch.dtype, float]] = {
    # name: (the module from a bf16 weight, the activations' dtype, bytes per weight element)
    "fp32 F.linear": (lambda w: linear(w.float()), torch.float32, 4),
    "bf16 F.linear": (linear, torch.bfloat16, 2),
    "bf16 torch.mv": (MatrixVector, torch.bfloat16, 2),
    "bf16 ATen F.linear (oneDNN off)": (lambda w: Kernel(w, layers.aten_linear), torch.bfloat16, 2),
    "bf16 dsv2 layers.linear (its pick)": (lambda w: Kernel(w, layers.linear), torch.bfloat16, 2),
    "int8 _weight_int8pack_mm": (Int8Linear.quantize, torch.bfloat16, 1),
    "int8 w8a8 (fbgemm linear_dynamic)": (w8a8, torch.bfloat16, 1),
    "int4 _weight_int4pack_mm_for_cpu (g128)": (lambda w: Int4Linear.quantize(w, 128), torch.bfloat16, 0.5),
}


def per_call_s(modules: list[torch.nn.Module], x: torch.Tensor, threads: int) -> float:
    torch.set_num_threads(threads)
    try:
        return median_s(lambda: [m(x) for m in modules]) / len(modules)
    finally:
        torch.set_num_threads(THREADS)


@torch.no_grad()
def main() -> None:
    print(hardware.describe())
    print(f"read bandwidth: {hardware.read_bandwidth_gbs():.1f} GB/s ({THREADS} threads; fastest full read of 512 MiB)")
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        copies = max(2, (64 * 2**20) // (n * k))
        weights = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        print(f"\n{name}: {copies} copies")
        for fmt, (build, dtype, nbytes) in FORMATS.items():
            modules = [build(w) for w in weights]
            x = torch.randn(1, k, dtype=dtype)
            row = []
            for threads in sorted({1, THREADS}):
                s = per_call_s(modules, x, threads)
                row.append(f"{threads} thread(s): {s * 1e3:7.3f} ms {n * k * nbytes / s / 1e9:5.1f} GB/s")
            print(f"  {fmt:<40} " + "   ".join(row))


if __name__ == "__main__":
    main()
