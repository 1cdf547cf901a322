"""Decode and prefill speed: dsv2's engine vs transformers' DeepseekV2ForCausalLM on the same checkpoint.

For each model (random weights, written once as a checkpoint both libraries load) and dtype, each
implementation runs in its own process (so peak RSS is its own) and is timed by this file's own clock,
the same way for both:

- a *point* is (batch B, prompt P, new tokens N): the same B prompts of P random token ids for both,
  greedy, EOS ignored, exactly N new tokens per sequence. Run once as a warm-up (first-call costs:
  allocator growth, kernel selection, first touch of cache pages), then `--repeats` times; every figure
  is the median over those repeats.
- **prefill** (tok/s = B·P / seconds): from handing over the prompts until every sequence has its first
  new token on the host (the prompt forwards plus the first greedy pick).
- **decode step** (ms): each of the remaining N-1 steps timed alone: one forward of B tokens (one per
  sequence) against the cache, the greedy pick and the B token ids on the host. A run's figure is the
  median of its steps (a step another process interrupts does not move it). dsv2: `LLMEngine.step()`,
  scheduler included; its prefill budget is one chunk per sequence (`PREFILL_CHUNK`), so all B prompts
  prefill in lock-step and every timed step decodes the whole batch and nothing else. transformers:
  `model(token, past_key_values=...)` with its own cache, without generate()'s bookkeeping.

Tables: the shape table (batch 1 and 8 × prompt 128 and 1024, N = `--new-tokens`) and the context table
(batch 1, prompt = each of `--contexts`, N = `--context-tokens`). Both time the same unit, so the batch-1
shape figure and the context figure at the same prompt must agree; the last lines check that (within 10%;
they differ only in N, i.e. in the context of the median step, about P + N/2).

Roofline: the time a decode step needs just to read its bytes once at this machine's read bandwidth,
measured in the same run (the fastest full read of a 512 MiB tensor, best of several). Bytes (`step_bytes`):
every active weight in the checkpoint's dtype (attention, dense MLPs, shared experts, routers, LM head; no
embedding beyond a row) with the routed experts the batch's tokens pick: E·(1-(1-K/E)^B) distinct experts
per MoE layer expected under uniform routing (K at batch 1); plus every sequence's latent cache (c_KV and
k^R per layer) at the mean context P + N/2. It is the same minimum for both implementations.

Noise: each table ends with the largest spread (slowest / fastest repeat) of its points, and the header
warns when the machine was busy at the start. Other processes on the cores skew everything, and with as many
threads as cores one descheduled thread stalls every parallel region (a 4 ms step measured at 290 ms):
on a shared machine pass `--threads` below the free cores.

    python benchmarks/decode.py                        # nano, small, lite4; dtype auto
    python benchmarks/decode.py --models nano --new-tokens 16 --contexts 128 512   # quick look
    python benchmarks/decode.py --compile              # dsv2's decode and prefill steps compiled (infer/compiled.py)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import dsv2
from dsv2 import hardware
from dsv2.config import ModelConfig
from dsv2.infer.engine import LLMEngine
from dsv2.info import summarize
from dsv2.model import quant

MODELS: dict[str, Callable[[], ModelConfig]] = {
    "nano": lambda: dsv2.preset("nano").replace(max_position_embeddings=16384),
    "small": lambda: dsv2.preset("small"),
    # V2-Lite's shapes cut to 4 layers (1 dense + 3 MoE): hidden 2048, 16 heads, 64+2 experts, top-6; with V2's
    # q_lora_rank 1536, as llama.cpp takes a cut-down Lite only with it (it treats 26/27 layers as V2-Lite)
    "lite4": lambda: dsv2.preset("deepseek-v2-lite").replace(num_hidden_layers=4, q_lora_rank=1536),
    "lite": lambda: dsv2.preset("deepseek-v2-lite"),  # the full 15.7B shape: for a GPU
}
SHAPES = [(1, 128), (1, 1024), (8, 128), (8, 1024)]  # (batch, prompt) of the shape table
CONTEXTS = [128, 1024, 4096, 8192]
PREFILL_CHUNK = 512  # LLMEngine's default prefill chunk
TOLERANCE = 0.10  # how far the two tables' batch-1 figures at one context may part

Point = tuple[int, int, int]  # batch, prompt length, new tokens
# (prompts, new tokens) -> (prefill seconds, seconds of each decode step)
Run = Callable[[list[list[int]], int], tuple[float, list[float]]]


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    """The same random token ids for both implementations (and for both tables at batch 1)."""
    g = torch.Generator().manual_seed(batch * 100003 + length)
    return torch.randint(10, min(vocab, 30000), (batch, length), generator=g).tolist()


def points(new_tokens: int, contexts: list[int], context_tokens: int) -> dict[str, list[Point]]:
    return {"shapes": [(b, p, new_tokens) for b, p in SHAPES], "contexts": [(1, c, context_tokens) for c in contexts]}


def peak_memory_mb(device: str) -> float:
    """Peak resident memory of this process (CPU), or peak allocated GPU memory (CUDA)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------- the two runners
def dsv2_runner(path: str, dtype: torch.dtype, device: str, max_batch: int,
                quantization: str | None = None, compiled: bool = False) -> tuple[Run, int]:
    """dsv2's engine on the checkpoint (its weights quantized as `LLM(quantization=...)` does; with `compiled`, its
    decode steps compiled, and its prefill steps where the weights are float: `infer/compiled.py`); also its
    latent-cache bytes per token."""
    net = quant.for_inference(dsv2.load_model(path, dtype=dtype, device=device, progress=False), quantization)
    # one chunk per sequence per step fits the budget, so equal prompts prefill in lock-step; no prefix
    # caching, as `measure` hands the same prompts over again and they would be served from the cache
    engine = LLMEngine(net, max_running=max_batch, prefill_chunk=PREFILL_CHUNK,
                       max_prefill_tokens=max_batch * PREFILL_CHUNK, prefix_caching=False,
                       compile_decode=compiled, compile_prefill=compiled and quantization is None)

    def run(ids: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
        params = dsv2.SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        requests = [engine.make_request(p, params) for p in ids]
        sync(device)
        t0 = time.perf_counter()
        for r in requests:
            engine.add_request(r)
        while any(not r.out.token_ids for r in requests):
            engine.step()
        sync(device)
        t1 = time.perf_counter()
        if any(len(r.out.token_ids) != 1 for r in requests):
            raise RuntimeError("a decode step ran before every prompt was prefilled")
        steps = []
        while engine.has_unfinished():
            t = time.perf_counter()
            engine.step()
            sync(device)
            steps.append(time.perf_counter() - t)
        if len(steps) != new_tokens - 1 or any(len(r.out.token_ids) != new_tokens for r in requests):
            raise RuntimeError(f"expected {new_tokens - 1} decode steps of the whole batch, ran {len(steps)}")
        return t1 - t0, steps

    return run, engine.cache.bytes_per_token()


def transformers_runner(path: str, dtype: torch.dtype, device: str) -> Run:
    """transformers' model with its own cache: one forward over the prompts, then single-token forwards
    feeding past_key_values back, the greedy ids brought to the host each step as the engine does."""
    import transformers

    model = transformers.DeepseekV2ForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    @torch.inference_mode()
    def run(ids: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
        tokens = torch.tensor(ids, device=device)
        sync(device)
        t0 = time.perf_counter()
        out = model(tokens, use_cache=True, logits_to_keep=1)
        tokens = out.logits[:, -1].argmax(-1)
        generated = [tokens.tolist()]
        sync(device)
        t1 = time.perf_counter()
        past, steps = out.past_key_values, []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            out = model(tokens[:, None], past_key_values=past, use_cache=True)
            past, tokens = out.past_key_values, out.logits[:, -1].argmax(-1)
            generated.append(tokens.tolist())
            sync(device)
            steps.append(time.perf_counter() - t)
        assert len(generated) == new_tokens
        return t1 - t0, steps

    return run


def measure(run: Run, point: Point, vocab: int, repeats: int) -> dict[str, float]:
    """One warm-up run of the point, then `repeats` runs: each figure is the median over the runs (a run's
    decode figure: the median of its steps)."""
    batch, length, new_tokens = point
    ids = prompts(batch, length, vocab)
    _, warm_steps = run(ids, new_tokens)
    runs = [run(ids, new_tokens) for _ in range(repeats)]
    steps = [statistics.median(r[1]) for r in runs]
    return {
        "prefill_tok_s": batch * length / statistics.median(r[0] for r in runs),
        "step_ms": 1000 * statistics.median(steps),
        "warmup_step_ms": 1000 * statistics.median(warm_steps),  # kept to show what the warm-up keeps out
        "first_step_ms": 1000 * warm_steps[0],  # the very first decode step of the point
        "spread": max(steps) / min(steps),
    }


def worker(which: str, path: str, dtype: torch.dtype, device: str, grid: dict[str, list[Point]],
           repeats: int, compiled: bool = False) -> dict[str, Any]:
    max_batch = max(b for pts in grid.values() for b, _, _ in pts)
    if which == "dsv2":
        # compiled: the warm-up runs compile the graphs (each point's warm-up those its shapes need)
        run, cache_bytes_per_token = dsv2_runner(path, dtype, device, max_batch, compiled=compiled)
    else:
        run, cache_bytes_per_token = transformers_runner(path, dtype, device), 0
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    out: dict[str, Any] = {}
    for table, pts in grid.items():
        out[table] = {}
        for b, p, n in pts:
            row = measure(run, (b, p, n), vocab, repeats)
            if cache_bytes_per_token:
                row["kv_bytes"] = b * (p + n - 1) * cache_bytes_per_token  # every token but the last is cached
            out[table][f"{b}x{p}"] = row
    out["peak_rss_mb"] = peak_memory_mb(device)
    return out


# ----------------------------------------------------------------------------------------- roofline
def expected_distinct_experts(n_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts B tokens pick when each picks K of E uniformly: E·(1 - (1 - K/E)^B)."""
    return n_experts * (1 - (1 - top_k / n_experts) ** batch)


def step_bytes(config: ModelConfig, dtype: torch.dtype, batch: int, context: float) -> float:
    """Bytes one decode step of `batch` sequences must read, each at `context` cached tokens: the active
    weights once (every non-routed parameter but the embedding, plus the routed experts the batch is
    expected to pick) and every sequence's latent cache, all in `dtype`."""
    s = summarize(config)
    routed = s["params_by_part"].get("routed experts", 0)
    weights = s["active_params"] - s["active_routed_expert_params"]
    if routed:
        E, K = config.n_routed_experts, config.num_experts_per_tok
        weights += routed * expected_distinct_experts(E, K, batch) / E
    cache = batch * context * config.kv_cache_dim * config.num_hidden_layers
    return (weights + cache) * dtype.itemsize


def roofline_ms(config: ModelConfig, dtype: torch.dtype, key: str, new_tokens: int, bandwidth_gbs: float) -> float:
    batch, prompt = map(int, key.split("x"))
    return 1000 * step_bytes(config, dtype, batch, prompt + new_tokens / 2) / (bandwidth_gbs * 1e9)


# ------------------------------------------------------------------------------------------- report
def decode_cells(o: dict[str, float], t: dict[str, float], roof: float) -> str:
    """step ms dsv2 | transformers | ratio | roofline ms | % of roofline dsv2 | transformers"""
    return (f"{o['step_ms']:.2f} | {t['step_ms']:.2f} | **{t['step_ms'] / o['step_ms']:.2f}** | {roof:.2f} | "
            f"{100 * roof / o['step_ms']:.0f}% | {100 * roof / t['step_ms']:.0f}%")


def report(title: str, config: ModelConfig, dtype: torch.dtype, ours: dict, theirs: dict, bandwidth_gbs: float,
           new_tokens: int, context_tokens: int) -> None:
    print(f"\n### {title}")
    print(f"peak memory (RSS on CPU, allocated on GPU): dsv2 {ours['peak_rss_mb']:.0f} MB, "
          f"transformers {theirs['peak_rss_mb']:.0f} MB. Ratio: transformers time / dsv2 time; "
          "% of roofline: roofline ms / step ms.")
    print(f"| batch x prompt ({new_tokens} new tokens) | prefill tok/s dsv2 | transformers | ratio "
          "| decode step ms dsv2 | transformers | ratio | roofline ms | % of roofline dsv2 | transformers "
          "| latent cache bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, o in ours["shapes"].items():
        t = theirs["shapes"][key]
        roof = roofline_ms(config, dtype, key, new_tokens, bandwidth_gbs)
        print(f"| {key} | {o['prefill_tok_s']:.0f} | {t['prefill_tok_s']:.0f} | "
              f"{o['prefill_tok_s'] / t['prefill_tok_s']:.2f} | {decode_cells(o, t, roof)} | {o['kv_bytes']:,} |")
    if ours["contexts"]:
        print(f"\n| context (batch 1, {context_tokens} new tokens) | decode step ms dsv2 | transformers | ratio "
              "| roofline ms | % of roofline dsv2 | transformers |")
        print("|---|---|---|---|---|---|---|")
        for key, o in ours["contexts"].items():
            roof = roofline_ms(config, dtype, key, context_tokens, bandwidth_gbs)
            print(f"| {key.removeprefix('1x')} | {decode_cells(o, theirs['contexts'][key], roof)} |")
        steps = [o["step_ms"] for o in ours["contexts"].values()]
        print(f"dsv2 step at the longest context / at the shortest: {steps[-1] / steps[0]:.2f}")
    rows = [r for side in (ours, theirs) for table in ("shapes", "contexts") for r in side[table].values()]
    spread = max(r["spread"] for r in rows)
    print(f"largest spread of one point's repeats (slowest / fastest decode step): {spread:.2f}")


def consistency(title: str, results: dict[str, dict]) -> list[str]:
    """The batch-1 shape figure vs the context figure at the same prompt, per implementation."""
    lines = []
    for which, r in results.items():
        for key, shape in r["shapes"].items():
            if key.startswith("1x") and key in r["contexts"]:
                a, b = shape["step_ms"], r["contexts"][key]["step_ms"]
                off = abs(a / b - 1)
                verdict = "ok" if off <= TOLERANCE else f"DIFFER by more than {TOLERANCE:.0%}"
                lines.append(f"{title}, {which}, batch 1 at context {key[2:]}: shape table {a:.2f} ms, "
                             f"context table {b:.2f} ms ({off:.1%}): {verdict}")
    return lines


# ------------------------------------------------------------------------------------------- driver
def resolved_dtypes(names: list[str], device: str) -> dict[str, str]:
    """Each distinct dtype the names resolve to (`dsv2.hardware.resolve_dtype`) -> its label, e.g.
    "bfloat16 (auto)"."""
    out: dict[str, str] = {}
    for name in names:
        dtype = str(hardware.resolve_dtype(name, device)).removeprefix("torch.")
        out.setdefault(dtype, dtype if name == dtype else f"{dtype} ({name})")
    return out


def run_worker(which: str, path: str, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--device", args.device,
           "--new-tokens", str(args.new_tokens), "--contexts", *map(str, args.contexts),
           "--context-tokens", str(args.context_tokens), "--repeats", str(args.repeats),
           *(["--compile"] if args.compile else []), "--worker", which, path, dtype]
    # the checkpoint (or GGUF) written just before is flushed to disk now: left to the kernel's writeback it
    # competes for the 2 cores with the first timed point (small 1x128 prefill measured at 0.6x its speed)
    os.sync()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{which} {path} {dtype} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_run(run: dict[str, Any], saved: dict[str, Any]) -> None:
    config = MODELS[run["model"]]()
    title = f"{run['model']} ({summarize(config)['total_params'] / 1e6:.0f}M params), {run['label']}"
    report(title, config, getattr(torch, run["dtype"]), run["dsv2"], run["transformers"], saved["bandwidth_gbs"],
           saved["new_tokens"], saved["context_tokens"])


def busy_warning() -> str:
    """A header line when the machine is busy at the start (load average >= 1), else ""."""
    load = os.getloadavg()[0]
    return (f"\nWARNING: the machine is busy (load average {load:.1f} at the start): other processes share the "
            "cores and skew every figure") if load >= 1 else ""


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the bandwidth, then every model and dtype in worker processes, printing each as it is done."""
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    bandwidth = hardware.read_bandwidth_gbs(args.device)
    header = (f"machine: {hardware.describe()}{gpu}\nread bandwidth {bandwidth:.1f} GB/s (fastest read of 512 MiB "
              f"on {args.device}); every figure the median of {args.repeats} runs of its point after a warm-up run")
    if args.compile:
        header += ("\ndsv2's decode and prefill steps compiled "
                   "(`LLMEngine(compile_decode=True, compile_prefill=True)`, infer/compiled.py)")
    header += busy_warning()
    print(header)
    saved: dict[str, Any] = {"header": header, "bandwidth_gbs": bandwidth, "new_tokens": args.new_tokens,
                             "context_tokens": args.context_tokens, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = str(Path(tmp) / name)
            dsv2.save_model(dsv2.random_model(MODELS[name](), dtype=torch.bfloat16, seed=0), path)
            for dtype, label in resolved_dtypes(args.dtypes, args.device).items():
                run = {"model": name, "dtype": dtype, "label": label}
                for which in ("dsv2", "transformers"):
                    run[which] = run_worker(which, path, dtype, args)
                saved["runs"][f"{name} {label}"] = run
                print_run(run, saved)
    return saved


def print_consistency(runs: dict[str, dict[str, Any]]) -> None:
    lines = [line for title, run in runs.items()
             for line in consistency(title, {w: run[w] for w in ("dsv2", "transformers")})]
    print("\nconsistency (batch-1 decode step, shape table vs context table at the same prompt):")
    print("\n".join(lines) if lines else "no context of the context table is a batch-1 prompt of the shape table")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["nano", "small", "lite4"], choices=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=["auto"], choices=list(hardware.DTYPES),
                    help="auto: dsv2.hardware.resolve_dtype (bf16 on a GPU or a CPU with native bf16, else fp32)")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per sequence in the shape table")
    ap.add_argument("--contexts", type=int, nargs="*", default=CONTEXTS, help="prompts of the context table")
    ap.add_argument("--context-tokens", type=int, default=33, help="new tokens per point of the context table")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per point after its warm-up (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--compile", action="store_true", help="dsv2's decode and prefill steps as compiled graphs (CPU)")
    ap.add_argument("--json", help="also write all figures to this file")
    ap.add_argument("--from-json", help="print the tables of an earlier --json run (with its bandwidth)")
    ap.add_argument("--worker", nargs=3, metavar=("WHICH", "PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if min(args.new_tokens, args.context_tokens) < 2 or args.repeats < 1:
        ap.error("--new-tokens and --context-tokens must be >= 2 (one token from the prefill, then decode steps), "
                 "--repeats >= 1")
    torch.set_num_threads(args.threads)
    if args.worker:
        which, path, dtype = args.worker
        grid = points(args.new_tokens, args.contexts, args.context_tokens)
        print(json.dumps(worker(which, path, getattr(torch, dtype), args.device, grid, args.repeats, args.compile)))
        return
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print(saved["header"])
        for run in saved["runs"].values():
            print_run(run, saved)
    else:
        saved = collect(args)
        if args.json:
            Path(args.json).write_text(json.dumps(saved, indent=1))
    print_consistency(saved["runs"])


if __name__ == "__main__":
    main()
