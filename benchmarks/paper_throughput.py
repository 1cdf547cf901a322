"""Maximum generation throughput under the same cache memory: a V2-shaped MoE + MLA model against a
DeepSeek-67B-shaped dense GQA model (the paper's 5.76×, §3.2.3, at small scale).

The paper serves both models on the same 8 H800s; V2's "much smaller KV cache" buys "a much larger batch
size", and a decode step on a GPU costs about the same at any batch until compute binds, so a larger batch is
nearly free throughput. Here each model is served by `dsv2 serve` with the same `--cache-mb` and a
`--max-running` far above what the cache can hold, so the paged cache, not a slot limit, decides how many
sequences run. `--clients` concurrent streaming clients (more than the largest cache holds) send the same
`--requests` completions to each server (benchmarks/serve.py's machinery). /metrics, scraped every 50 ms,
shows the cache full and requests waiting; output tokens/s is counted over that saturated window (the first
streamed token to the moment the wait queue empties), per wall second and per second of the server's CPU
time (steadier on a shared machine).

Cases: the V2 analogue with its cache in the model dtype and with `--kv-cache-dtype 6bit` (the paper's
~6-bit cache), and the dense analogue in the model dtype (the attention variants store "auto" only; the
paper's 67B serves a bf16 cache). Each row: KV bytes per token (the engine's, from /metrics), blocks and
sequences held, preemptions, output tokens/s at saturation, tokens per CPU-second per running sequence (the
per-step cost side of the ratio, apart from the batch side) and the ratios to the dense model. Before the
servers, `--step-batches` times one decode step in process at a few batch sizes: a larger batch is worth
as much as the step cost stays flat. Weights are random (throughput does not depend on them; EOS is ignored
so every request makes `--max-tokens` tokens).

    python benchmarks/paper_throughput.py [--pair small|nano] [--cache-mb 4] [--clients 48] [--requests 96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from dsv2 import LLM, SamplingParams
from dsv2.config import resolve_config
from dsv2.info import summarize as model_summary

sys.path.insert(0, str(Path(__file__).parent))
import serve  # noqa: E402  benchmarks/serve.py: the server process, the clients and the /metrics watcher

# the V2 analogue and the dense 67B analogue of each scale: equal width, depth, heads, vocabulary and active
# parameters per token (config.py's presets)
PAIRS = {"nano": ("nano", "llm-nano"), "small": ("small", "llm-small")}
CPU = "dsv2_process_cpu_seconds_total"


def saturated(load: serve.Load) -> dict:
    """Throughput and occupancy while requests waited: from the first streamed token to the last /metrics
    sample with a request waiting (after it the batch only drains). Tokens per wall second, and per second
    of the server's CPU time (all its threads), which other work on the machine barely moves."""
    stamps = sorted(t for r in load.results if "error" not in r for t in r["stamps"])
    waiting = [t for t, v in load.samples if v["dsv2_requests_waiting"] > 0]
    inside = [(t, v) for t, v in load.samples if stamps and waiting and stamps[0] <= t <= waiting[-1]]
    if len(inside) < 2:
        return {"saturated_s": 0.0, "sat_tok_per_s": float("nan"), "sat_tok_per_cpu_s": float("nan"),
                "mean_running": float("nan"), "mean_blocks_used": float("nan")}
    (start, first), (end, last) = inside[0], inside[-1]
    tokens = sum(start <= t <= end for t in stamps)
    return {
        "saturated_s": end - start,
        "sat_tok_per_s": tokens / (end - start),
        "sat_tok_per_cpu_s": tokens / (last[CPU] - first[CPU]),
        "mean_running": sum(v["dsv2_requests_running"] for _, v in inside) / len(inside),
        "mean_blocks_used": sum(v["dsv2_cache_blocks_used"] for _, v in inside) / len(inside),
    }


def step_costs(model: str, kv_cache_dtype: str, prompts: list[list[int]], args: argparse.Namespace) -> list[float]:
    """CPU ms of one decode step of the engine in this process, at each batch size (the first prompts, after
    their prefill): how a step's cost grows with the batch, which decides what a larger batch is worth."""
    torch.set_num_threads(args.threads)
    engine = LLM(model, dtype=args.dtype, kv_cache_dtype=kv_cache_dtype, max_batch_size=max(args.step_batches),
                 skip_tokenizer_init=True).engine
    params = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0)
    costs = []
    for batch in args.step_batches:
        for prompt in prompts[:batch]:
            engine.add_request(engine.make_request(prompt, params))
        for _ in range(3):  # the prefill, then decode steps at full batch
            engine.step()
        t0 = time.process_time()
        for _ in range(8):
            engine.step()
        costs.append(1000 * (time.process_time() - t0) / 8)
        while engine.has_unfinished():
            engine.step()
    return costs


def measure(model: str, kv_cache_dtype: str, bodies: list[dict], args: argparse.Namespace) -> dict:
    warmup, bodies = bodies[:2], bodies[2:]
    with serve.server(model, dtype=args.dtype, threads=args.threads, max_running=args.max_running,
                      kv_cache_dtype=kv_cache_dtype, cache_mb=args.cache_mb) as base:
        asyncio.run(serve.drive(base, warmup, 1))
        load = asyncio.run(serve.drive(base, bodies, args.clients))
    last = load.samples[-1][1]
    return {
        "model": model, "kv_cache_dtype": kv_cache_dtype, **serve.summarize(load, args.clients), **saturated(load),
        "bytes_per_token": int(last["dsv2_cache_bytes_per_token"]),
        "blocks_total": int(last["dsv2_cache_blocks_total"]),
        "preemptions": int(last["dsv2_preemptions_total"] - load.samples[0][1]["dsv2_preemptions_total"]),
        "active_params": model_summary(resolve_config(model))["active_params"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--pair", default="small", choices=list(PAIRS), help="the V2 / dense presets: small / llm-small "
                    "(the dense step reads its weights once, so its cost is flat in the batch) or nano / llm-nano "
                    "(weights in the CPU's caches: a step costs per sequence)")
    ap.add_argument("--cache-mb", type=float, default=4.0, help="the cache memory every server gets")
    ap.add_argument("--clients", type=int, default=48, help="concurrent streaming clients (> the largest batch)")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, nargs=2, default=[16, 48], help="prompt length range")
    ap.add_argument("--max-running", type=int, default=512, help="the servers' slot limit, far above the cache's")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1,
                    help="the server's threads (1: the clients get the other core, and CPU time counts no spinning)")
    ap.add_argument("--step-batches", type=int, nargs="*", default=[1, 4, 16, 32],
                    help="batch sizes at which to time one decode step in process (none: skip)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()

    v2, dense = PAIRS[args.pair]
    vocab_model = min((v2, dense), key=lambda m: resolve_config(m).vocab_size)  # prompts valid for both
    bodies = serve.completion_bodies(vocab_model, args.requests + 2, tuple(args.prompt_tokens), args.max_tokens)
    cases = ((dense, "auto"), (v2, "auto"), (v2, "6bit"))
    prompts = [body["prompt"] for body in bodies[2:]]
    steps = {case: step_costs(*case, prompts, args) for case in cases if args.step_batches}
    rows = [measure(model, kv, bodies, args) for model, kv in cases]
    base = rows[0]

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; servers with "
          f"{args.threads} thread(s), {args.dtype} weights (random); {args.cache_mb} MiB cache each; {args.requests} "
          f"requests from {args.clients} streaming clients, prompts {args.prompt_tokens[0]}-{args.prompt_tokens[1]} "
          f"tokens, {args.max_tokens} new tokens each (EOS ignored); --max-running {args.max_running}")
    print("| model (active params) | cache | KV bytes / token | blocks: peak used / total | sequences running: peak / "
          "mean | preemptions | output tok/s at saturation | per CPU-second | per CPU-second per sequence | "
          "vs dense: tok/s | per CPU-second | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} ({r['active_params'] / 1e6:.2f}M) | {r['kv_cache_dtype']} | {r['bytes_per_token']:,} | "
              f"{r['peak_blocks']} / {r['blocks_total']} | {r['peak_running']} / {r['mean_running']:.1f} | "
              f"{r['preemptions']} | {r['sat_tok_per_s']:.0f} | {r['sat_tok_per_cpu_s']:.0f} | "
              f"{r['sat_tok_per_cpu_s'] / r['mean_running']:.1f} | {r['sat_tok_per_s'] / base['sat_tok_per_s']:.2f}× | "
              f"{r['sat_tok_per_cpu_s'] / base['sat_tok_per_cpu_s']:.2f}× | {r['errors']} |")
    for r in rows[1:]:
        per_seq = (r["sat_tok_per_cpu_s"] / r["mean_running"]) / (base["sat_tok_per_cpu_s"] / base["mean_running"])
        print(f"{r['model']} {r['kv_cache_dtype']} vs {base['model']}: "
              f"{base['bytes_per_token'] / r['bytes_per_token']:.2f}× fewer KV bytes per token -> "
              f"{r['mean_running'] / base['mean_running']:.2f}× the sequences running, × {per_seq:.2f} the tokens "
              f"per CPU-second per sequence = {r['sat_tok_per_cpu_s'] / base['sat_tok_per_cpu_s']:.2f}× the throughput")
    for r in rows:
        if not r["saturated_s"] or r["peak_blocks"] < 0.9 * r["blocks_total"]:
            print(f"{r['model']} {r['kv_cache_dtype']}: the cache never filled (peak {r['peak_blocks']} of "
                  f"{r['blocks_total']} blocks), so it did not limit the batch: more --clients or less --cache-mb")
        if r["first_error"]:
            print(f"{r['model']} {r['kv_cache_dtype']}: error {r['first_error']}")
    if steps:
        print(f"CPU ms per decode step, in process ({args.threads} thread(s), the same prompts):")
        print("| model | cache | " + " | ".join(f"batch {b}" for b in args.step_batches) + " |")
        print("|---|---|" + "---|" * len(args.step_batches))
        for (model, kv), costs in steps.items():
            print(f"| {model} | {kv} | " + " | ".join(f"{c:.1f}" for c in costs) + " |")
        for r in rows:
            r["step_cpu_ms"] = dict(zip(args.step_batches, steps[r["model"], r["kv_cache_dtype"]], strict=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
