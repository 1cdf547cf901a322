"""Serving under load: N concurrent streaming clients against `dsv2 serve`, vs the same requests one by one.

Starts `dsv2 serve --model PRESET` in its own process, then for each concurrency level sends the same
`--requests` completions (random-length prompts, `--max-tokens` tokens each, EOS ignored, streaming)
from that many concurrent clients, and reports requests/s, output tokens/s, time to first token and
inter-token latency (p50 / p99), errors (must be 0) and the peak cache blocks in use (scraped from
/metrics while it runs). Concurrency 1 is the one-after-another baseline.

`--shared-prefix N` starts every prompt with the same N random tokens (a system prompt), and reports the
prompt tokens the server found in its prefix cache; `--no-prefix-caching` serves without it, for the
comparison. The warm-up requests share nothing with the measured ones, so the cache starts cold.

    python benchmarks/serve.py [--model small] [--requests 64] [--concurrency 1 8 32 64] [--max-tokens 32]
    python benchmarks/serve.py --requests 16 --concurrency 16 --shared-prefix 1024 [--no-prefix-caching]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import torch

from dsv2.config import resolve_config


async def one_request(http: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
    if not stamps:
        return {"error": "no tokens"}
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
            "tokens": len(stamps), "stamps": stamps}


async def scrape(http: httpx.AsyncClient) -> dict[str, float]:
    return {line.split()[0]: float(line.split()[1]) for line in (await http.get("/metrics")).text.splitlines()
            if line.startswith("dsv2_")}


@dataclass
class Load:
    """What one load level recorded: each request's result (its token stamps included), /metrics as
    (perf_counter time, values) before the first request, every 50 ms while they run and after the last,
    and when the clients started and how long they took."""

    results: list[dict]
    samples: list[tuple[float, dict[str, float]]]
    t0: float
    seconds: float


async def drive(base: str, bodies: list[dict], concurrency: int) -> Load:
    """Send `bodies` as streaming completions from `concurrency` clients, each taking the next body when its
    last one finishes, while watching /metrics."""
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        samples = [(time.perf_counter(), await scrape(http))]
        stop = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                samples.append((time.perf_counter(), await scrape(http)))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        queue = list(bodies)
        results: list[dict] = []

        async def client() -> None:
            while queue:
                results.append(await one_request(http, queue.pop(0)))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        stop.set()
        await watcher
        samples.append((time.perf_counter(), await scrape(http)))
    return Load(results, samples, t0, elapsed)


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of sorted seconds, in ms."""
    return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarize(load: Load, concurrency: int) -> dict:
    """One row of the table: throughput, latency percentiles, errors, peaks of cache blocks and sequences
    running, prefix-cache hits."""
    ok = [r for r in load.results if "error" not in r]
    ttft = sorted(r["ttft"] for r in ok)
    itl = sorted(x for r in ok for x in r["itl"])
    hits = [v["dsv2_prefix_cache_hit_tokens_total"] for _, v in load.samples]
    return {
        "concurrency": concurrency, "requests": len(load.results), "errors": len(load.results) - len(ok),
        "seconds": load.seconds, "req_per_s": len(ok) / load.seconds,
        "out_tok_per_s": sum(r["tokens"] for r in ok) / load.seconds,
        "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99), "itl_p50_ms": pct(itl, 0.5),
        "itl_p99_ms": pct(itl, 0.99),
        "peak_blocks": max(int(v["dsv2_cache_blocks_used"]) for _, v in load.samples),
        "peak_running": max(int(v["dsv2_requests_running"]) for _, v in load.samples),
        "prefix_hit_tokens": int(hits[-1] - hits[0]),
        "first_error": next((r["error"] for r in load.results if "error" in r), None),
    }


@contextmanager
def server(model: str, *, dtype: str, threads: int, max_running: int, kv_cache_dtype: str = "auto",
           cache_mb: float | None = None, prefix_caching: bool = True, prefill_chunk: int | None = None,
           ) -> Iterator[str]:
    """`dsv2 serve --model MODEL` in its own process (`threads` OpenMP threads) on a free port: its base URL,
    once /health answers; stopped on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(
        [sys.executable, "-m", "dsv2.cli", "serve", "--model", model, "--dtype", dtype, "--port", str(port),
         "--served-model-name", "bench", "--max-running", str(max_running), "--log-level", "warning",
         "--kv-cache-dtype", kv_cache_dtype, *(["--cache-mb", str(cache_mb)] if cache_mb else []),
         *([] if prefix_caching else ["--no-prefix-caching"]),
         *(["--prefill-chunk", str(prefill_chunk)] if prefill_chunk else [])],
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server of {model} did not start")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=60)


def completion_bodies(model: str, n: int, prompt_tokens: tuple[int, int], max_tokens: int,
                      shared_prefix: int = 0, seed: int = 0) -> list[dict]:
    """`n` greedy streaming completions (EOS ignored, so each makes `max_tokens` tokens) of random token
    prompts, their lengths uniform in `prompt_tokens`; all but the first two (the warm-up) start with the
    same `shared_prefix` tokens."""
    rng = random.Random(seed)
    vocab = min(resolve_config(model).vocab_size, 30000)
    lengths = [rng.randint(*prompt_tokens) for _ in range(n)]
    shared = [rng.randrange(10, vocab) for _ in range(shared_prefix)]
    prompts = [(shared if i >= 2 else []) + [rng.randrange(10, vocab) for _ in range(k)] for i, k in enumerate(lengths)]
    return [{"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
             "stream": True} for prompt in prompts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, nargs=2, default=[16, 256], help="prompt length range")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "6bit"])
    ap.add_argument("--cache-mb", type=float, help="latent cache memory (default: the server's)")
    ap.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with")
    ap.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false")
    ap.add_argument("--prefill-chunk", type=int, help="the server's --prefill-chunk (default: the server's)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()

    bodies = completion_bodies(args.model, args.requests + 2, tuple(args.prompt_tokens), args.max_tokens,
                               args.shared_prefix)
    warmup, bodies = bodies[:2], bodies[2:]
    with server(args.model, dtype=args.dtype, threads=args.threads, max_running=max(args.concurrency),
                kv_cache_dtype=args.kv_cache_dtype, cache_mb=args.cache_mb, prefix_caching=args.prefix_caching,
                prefill_chunk=args.prefill_chunk) as base:
        asyncio.run(drive(base, warmup, 1))  # shares no prefix with what is measured
        rows = [summarize(asyncio.run(drive(base, bodies, c)), c) for c in args.concurrency]

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads; "
          f"model {args.model} {args.dtype}, {args.kv_cache_dtype} cache"
          f"{f' of {args.cache_mb} MiB' if args.cache_mb else ''}; {args.requests} requests, prompts "
          f"{args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens after a shared prefix of {args.shared_prefix}, "
          f"{args.max_tokens} new tokens each, streaming; prefix caching {'on' if args.prefix_caching else 'off'}; "
          f"prefill chunk {args.prefill_chunk or 'the server default'}")
    print("| clients | req/s | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors | peak cache blocks | "
          "peak running | prefix-cache hit tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['req_per_s']:.2f} | {r['out_tok_per_s']:.1f} | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f} | "
              f"{r['errors']} | {r['peak_blocks']} | {r['peak_running']} | {r['prefix_hit_tokens']:,} |")
    for r in rows[1:]:
        ratio = r["out_tok_per_s"] / max(rows[0]["out_tok_per_s"], 1e-9)
        print(f"{r['concurrency']} clients: {ratio:.2f}x the output tokens/s of {rows[0]['concurrency']}")
    if any(r["first_error"] for r in rows):
        print("errors:", [r["first_error"] for r in rows if r["first_error"]])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
