"""What the CPU kernels for a few rows (PyTorch's GEMVs, dsv2's kernels) read per second: the wall under decode.

A decode step at batch 1 is a chain of matrix-vector products, one per weight matrix, so its floor is the
weights' bytes over the machine's read bandwidth. This prints, for the matrix shapes of DeepSeek-V2-Lite
(an expert's projections, the shared experts, the dense MLP, the LM head) and of the small presets' experts
(where oneDNN's ~20 us per call, not bytes, is the cost), ms per call and GB/s of weight
bytes for each format dsv2 can run, at 1 thread and at all threads, beside a plain large read (the
machine's bandwidth). A kernel whose GB/s doubles from 1 to 2 threads is compute-bound, not memory-bound:
faster memory would not help it, a better kernel would.

dsv2's w4a8 (int4 weights, int8 rows) and w8a8 run on its own kernels where they build (dsv2.model.cpu_kernels:
VNNI, and for w8a8 AMX tiles where the CPU has them). On a CPU with AMX it also times dsv2's bf16 AMX kernel (the
weight read in place as A tiles) and, with --inductor, inductor's frozen, autotuned GEMM for the same x Wᵀ (what a
compiled decode graph runs where the bf16 kernel does not). --rows times a few rows at once (a batch of decode
steps) instead of one. --experts times one layer of routed experts (V2-Lite's, small's) instead, at the token
counts given: `dispatch` (oneDNN per expert) against dsv2's bf16 experts kernel, and what an eager forward picks
(`RoutedExperts.kernel_runs`).

Each matrix is timed over enough distinct copies (≥ 64 MiB in all) that no call finds its weight in the
core's L2 cache; the median of several repeats.

    python benchmarks/cpu_kernels.py
    python benchmarks/cpu_kernels.py --rows 1 8 16 --inductor --shapes "small dense" "LM head"
    python benchmarks/cpu_kernels.py --experts 16 32 64 128 256     # a prefill chunk's experts, by tokens
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from dsv2 import hardware
from dsv2.infer import compiled
from dsv2.model import cpu_kernels, layers
from dsv2.model.moe import RoutedExperts
from dsv2.model.quant import Int4Linear, Int8Linear, int8_rows

THREADS = torch.get_num_threads()  # all threads: the second column of every row
SHAPES = {  # [N, K] of V2-Lite's weight matrices, then small's and nano's experts (where per-call cost rules)
    "expert gate/up 1408x2048": (1408, 2048),
    "expert down 2048x1408": (2048, 1408),
    "shared experts 2816x2048": (2816, 2048),
    "dense MLP 10944x2048": (10944, 2048),
    "LM head 102400x2048": (102400, 2048),
    "small dense gate/up 2816x1024": (2816, 1024),
    "small dense down 1024x2816": (1024, 2816),
    "small q_b 768x512": (768, 512),
    "small LM head 32000x1024": (32000, 1024),
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


class Fbgemm(torch.nn.Module):
    """w8a8 by fbgemm's dynamic linear (`quant.int8_rows`), what Int8Linear runs where the AMX kernel does not."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.packed = w8a8(weight).fbgemm_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_rows(x, self.packed)


class DsvInt8(torch.nn.Module):
    """w8a8 by dsv2's int8 kernel (`cpu_kernels.linear_int8`: AMX tiles, or VNNI where there are none)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        module = Int8Linear.quantize(weight)
        self.weight, self.scale = module.weight, module.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear_int8(x, self.weight, self.scale)


class Copies(torch.nn.Module):
    """Every copy's x Wᵀ in one module: compiled as one graph, so inductor picks one GEMM per copy."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(w, requires_grad=False) for w in weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.nn.functional.linear(x, w) for w in self.weights]


INDUCTOR_COPIES = 64  # copies in one graph at most: small matrices have thousands, which take hours to compile


def inductor_s(weights: list[torch.Tensor], x: torch.Tensor) -> float:
    """Seconds per x Wᵀ of inductor's frozen, autotuned GEMM (C++ template or ATen, whichever it measures faster),
    over the first INDUCTOR_COPIES copies (for matrices under 1 MiB these fit in cache: a per-call cost)."""
    weights = weights[:INDUCTOR_COPIES]
    torch._dynamo.reset()
    with torch._inductor.config.patch(compiled.AUTOTUNED):  # the settings of a compiled decode step
        graph = torch.compile(Copies(weights))
        return median_s(lambda: graph(x)) / len(weights)


FORMATS: dict[str, tuple[Callable[[torch.Tensor], torch.nn.Module], torch.dtype, float]] = {
    # name: (the module from a bf16 weight, the activations' dtype, bytes per weight element)
    "fp32 F.linear": (lambda w: linear(w.float()), torch.float32, 4),
    "bf16 F.linear": (linear, torch.bfloat16, 2),
    "bf16 torch.mv": (MatrixVector, torch.bfloat16, 2),
    "bf16 ATen F.linear (oneDNN off)": (lambda w: Kernel(w, layers.aten_linear), torch.bfloat16, 2),
    "bf16 dsv2 layers.linear (its pick)": (lambda w: Kernel(w, layers.linear), torch.bfloat16, 2),
    "int8 _weight_int8pack_mm": (Int8Linear.quantize, torch.bfloat16, 1),
    "int8 w8a8 (fbgemm linear_dynamic)": (Fbgemm, torch.bfloat16, 1),
    "int8 w8a8 dsv2 Int8Linear (its pick)": (w8a8, torch.bfloat16, 1),
    "int4 _weight_int4pack_mm_for_cpu (g128)": (lambda w: Int4Linear.quantize(w, 128), torch.bfloat16, 0.5),
    # dsv2's VNNI kernel (cpu_kernels.linear_w4a8) where it is built, else torch's int4 kernel on the rounded rows
    "int4 w4a8 dsv2 Int4Linear (its pick, g128)": (lambda w: Int4Linear.quantize(w, 128, int8_activations=True),
                                                   torch.bfloat16, 0.5),
}
KERNEL_FORMATS: dict[str, tuple[Callable[[torch.Tensor], torch.nn.Module], torch.dtype, float]] = {
    "int8 w8a8 dsv2 kernel (linear_int8)": (DsvInt8, torch.bfloat16, 1),
}
AMX_FORMATS: dict[str, tuple[Callable[[torch.Tensor], torch.nn.Module], torch.dtype, float]] = {
    "bf16 dsv2 AMX kernel (cpu_kernels.linear)": (lambda w: Kernel(w, cpu_kernels.linear), torch.bfloat16, 2),
}


def per_call_s(modules: list[torch.nn.Module], x: torch.Tensor, threads: int) -> float:
    torch.set_num_threads(threads)
    try:
        return median_s(lambda: [m(x) for m in modules]) / len(modules)
    finally:
        torch.set_num_threads(THREADS)


EXPERTS = {  # name: (routed experts, hidden size, expert width, experts per token)
    "V2-Lite experts 64 x 1408x2048, top-6": (64, 2048, 1408, 6),
    "small experts 32 x 256x1024, top-4": (32, 1024, 256, 4),
}


def time_experts(token_counts: list[int]) -> None:
    """One layer of bf16 routed experts at each token count, random balanced routing: `dispatch` against the kernel
    (alternating calls, the median of 7 each), and what `RoutedExperts.eager` runs there."""
    if not cpu_kernels.loaded_bf16():
        print("no bf16 experts kernel here (it needs AVX-512 BF16): nothing to compare")
        return
    for name, (n_experts, dim, inner, top_k) in EXPERTS.items():
        experts = RoutedExperts(n_experts, dim, inner).to(torch.bfloat16).requires_grad_(False)
        for w in (experts.w1, experts.w2, experts.w3):
            w.normal_(0, 0.02)
        print(f"\n{name}: ms per layer")
        for tokens in token_counts:
            x, gates = torch.randn(tokens, dim, dtype=torch.bfloat16), torch.rand(tokens, top_k)
            indices = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(tokens)])
            runs = {"dispatch": functools.partial(experts.dispatch, x, gates, indices),
                    "kernel": functools.partial(cpu_kernels.routed_experts, x, gates, indices, experts.w1, experts.w2,
                                                experts.w3)}
            times: dict[str, list[float]] = {key: [] for key in runs}
            for run in runs.values():
                run()
            for _ in range(7):
                for key, run in runs.items():
                    t = time.perf_counter()
                    run()
                    times[key].append(time.perf_counter() - t)
            dispatch_ms, kernel_ms = (statistics.median(times[key]) * 1e3 for key in runs)
            picked = "kernel" if experts.kernel_runs(x, indices.numel()) else "dispatch"
            print(f"  {tokens:5d} tokens ({tokens * top_k / n_experts:5.1f} slots an expert): dispatch "
                  f"{dispatch_ms:8.2f}  kernel {kernel_ms:8.2f}  kernel / dispatch {kernel_ms / dispatch_ms:4.2f}  "
                  f"eager runs: {picked}", flush=True)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1], help="rows of x per call (decode steps at once)")
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="time only the matrices whose names contain one of these (default: all)")
    parser.add_argument("--inductor", action="store_true",
                        help="also time inductor's frozen, autotuned GEMM (bf16; compiles once per matrix and rows)")
    parser.add_argument("--experts", type=int, nargs="+", default=None, metavar="TOKENS",
                        help="time a layer of routed experts at these token counts instead (bf16 kernel vs dispatch)")
    return parser.parse_args()


@torch.no_grad()
def main() -> None:
    args = arguments()
    print(hardware.describe())
    print(f"read bandwidth: {hardware.read_bandwidth_gbs():.1f} GB/s ({THREADS} threads; fastest full read of 512 MiB)")
    if args.experts:
        cpu_kernels.load()
        time_experts(args.experts)
        return
    formats = dict(FORMATS)
    if cpu_kernels.load():
        formats.update(KERNEL_FORMATS)
    else:
        print("dsv2's kernels did not build here (no AVX2, or no compiler): their rows are left out")
    if cpu_kernels.loaded_bf16() and torch.cpu._is_amx_tile_supported():
        formats.update(AMX_FORMATS)
    else:
        print("no bf16 AMX kernel here (not an AMX CPU): its row is left out")
    torch.manual_seed(0)
    shapes = {name: nk for name, nk in SHAPES.items() if args.shapes is None or any(p in name for p in args.shapes)}
    for name, (n, k) in shapes.items():
        copies = max(2, (64 * 2**20) // (n * k))
        weights = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for rows in args.rows:
            print(f"\n{name}, {rows} row(s): {copies} copies")
            for fmt, (build, dtype, nbytes) in formats.items():
                modules = [build(w) for w in weights]
                x = torch.randn(rows, k, dtype=dtype)
                row = []
                for threads in sorted({1, THREADS}):
                    s = per_call_s(modules, x, threads)
                    row.append(f"{threads} thread(s): {s * 1e3:7.3f} ms {n * k * nbytes / s / 1e9:5.1f} GB/s")
                print(f"  {fmt:<42} " + "   ".join(row), flush=True)
            if args.inductor:
                s = inductor_s(weights, torch.randn(rows, k, dtype=torch.bfloat16))
                print(f"  {'bf16 inductor (frozen, max-autotune)':<42} {THREADS} thread(s): {s * 1e3:7.3f} ms "
                      f"{n * k * 2 / s / 1e9:5.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
