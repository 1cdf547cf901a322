"""Decode and prefill speed: dsv2's engine vs transformers' DeepseekV2ForCausalLM on the same checkpoint.

For each model (random weights, written once as a checkpoint both libraries load) and dtype, each
implementation runs in its own process (so peak RSS is its own): batch 1 and 8, prompt 128 and 1024,
128 new tokens, greedy, EOS ignored. Then, batch 1, the decode step time at contexts 128, 1K, 4K, 8K,
and the bandwidth dsv2 achieves: (active weight bytes + latent cache bytes read per step) / step time,
against this machine's read bandwidth measured in the same run.

    python benchmarks/decode.py                       # nano, small, lite4; bf16 and fp32
    python benchmarks/decode.py --models nano --dtypes bfloat16 --new-tokens 32   # quick look

transformers timing: one forward over the prompts (prefill), then single-token forwards with its cache
(decode steps), greedy. dsv2 timing: the engine's own prefill/decode clocks (`LLM.stats()`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import dsv2
from dsv2.info import summarize

MODELS = {
    "nano": lambda: dsv2.preset("nano").replace(max_position_embeddings=16384),
    "small": lambda: dsv2.preset("small"),
    # V2-Lite's shapes cut to 4 layers (1 dense + 3 MoE): hidden 2048, 16 heads, 64+2 experts, top-6
    "lite4": lambda: dsv2.preset("deepseek-v2-lite").replace(num_hidden_layers=4),
    "lite": lambda: dsv2.preset("deepseek-v2-lite"),  # the full 15.7B shape: for a GPU
}
SHAPES = [(1, 128), (1, 1024), (8, 128), (8, 1024)]
CONTEXTS = [128, 1024, 4096, 8192]
CONTEXT_STEPS = 32  # decode steps timed after a prompt of each context length


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch * 100003 + length)
    return torch.randint(10, min(vocab, 30000), (batch, length), generator=g).tolist()


def peak_memory_mb(device: str) -> float:
    """Peak resident memory of this process (CPU), or peak allocated GPU memory (CUDA)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ one implementation
def run_dsv2(path: str, dtype: str, new_tokens: int, contexts: list[int], device: str) -> dict:
    llm = dsv2.LLM(path, dtype=dtype, device=device, skip_tokenizer_init=True, max_batch_size=8)
    vocab = llm.config.vocab_size
    params = dsv2.SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts(1, 16, vocab), dsv2.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    rows = {}
    for batch, length in SHAPES:
        llm.generate(prompts(batch, length, vocab), params)
        s = llm.stats()
        rows[f"{batch}x{length}"] = {
            "prefill_tok_s": s["prefill_tok_per_s"], "decode_tok_s": s["decode_tok_per_s"],
            "step_ms": 1000 * s["decode_s"] / max(1, s["decode_tokens"] / batch),
            "kv_bytes": s["kv_cache_peak_bytes_in_use"],
        }
    steps = {}
    for ctx in contexts:
        llm.generate(prompts(1, ctx, vocab),
                     dsv2.SamplingParams(max_tokens=CONTEXT_STEPS + 1, temperature=0, ignore_eos=True))
        s = llm.stats()
        steps[ctx] = 1000 * s["decode_s"] / s["decode_tokens"]
    return {"shapes": rows, "context_step_ms": steps, "peak_rss_mb": peak_memory_mb(device)}


def run_transformers(path: str, dtype: str, new_tokens: int, contexts: list[int], device: str) -> dict:
    """Prefill = one forward over the prompts with use_cache; decode = single-token forwards feeding
    past_key_values back (greedy): transformers' own decode step, without generate()'s bookkeeping."""
    import transformers

    model = transformers.DeepseekV2ForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    vocab = model.config.vocab_size

    def run(ids, n):
        ids = torch.tensor(ids, device=device)
        sync(device)
        t = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        sync(device)
        t_prefill = time.perf_counter() - t
        past = out.past_key_values
        t = time.perf_counter()
        for _ in range(n - 1):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        return t_prefill, (time.perf_counter() - t) / max(1, n - 1)

    with torch.inference_mode():
        run(prompts(1, 16, vocab), 4)
        rows = {}
        for batch, length in SHAPES:
            prefill, step = run(prompts(batch, length, vocab), new_tokens)
            rows[f"{batch}x{length}"] = {
                "prefill_tok_s": batch * length / prefill, "decode_tok_s": batch / step, "step_ms": 1000 * step,
            }
        steps = {ctx: 1000 * run(prompts(1, ctx, vocab), CONTEXT_STEPS + 1)[1] for ctx in contexts}
    return {"shapes": rows, "context_step_ms": steps, "peak_rss_mb": peak_memory_mb(device)}


# ---------------------------------------------------------------------------------------- driver
def read_bandwidth_gbs(device: str = "cpu") -> float:
    # random data: pages of identical content (torch.ones) can be merged by the hypervisor and then
    # read from cache, which once showed 50 GB/s here
    x = torch.rand(256 * 1024 * 1024, device=device)  # 1 GiB fp32
    x.sum()
    times = []
    for _ in range(7):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


def step_bytes(config: dsv2.ModelConfig, dtype: str, context: int) -> int:
    """Bytes one batch-1 decode step must read: active weights (top-k experts, LM head, no embedding
    lookup beyond one row) plus the latent cache of `context` tokens."""
    elt = 2 if dtype == "bfloat16" else 4
    s = summarize(config)
    return s["active_params"] * elt + context * config.kv_cache_dim * config.num_hidden_layers * elt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json", help="also write all figures to this file")
    ap.add_argument("--from-json", help="print the tables of an earlier --json run (bandwidth measured now)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        which, path, dtype, n = args.worker
        run = run_dsv2 if which == "dsv2" else run_transformers
        print(json.dumps(run(path, dtype, int(n), args.contexts, args.device)))
        return

    bandwidth = read_bandwidth_gbs(args.device)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print(f"read bandwidth now: {bandwidth:.1f} GB/s (1 GiB fp32 sum)")
        for name in args.models:
            for dtype in args.dtypes:
                if f"{name} {dtype} dsv2" in saved:
                    report(name, dtype, MODELS[name](), saved[f"{name} {dtype} dsv2"],
                           saved[f"{name} {dtype} transformers"], bandwidth, args.contexts)
        return
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus{gpu}, torch {torch.__version__}, "
          f"{args.threads} threads, read bandwidth {bandwidth:.1f} GB/s (1 GiB fp32 sum on {args.device})")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            config = MODELS[name]()
            path = str(Path(tmp) / name)
            dsv2.save_model(dsv2.random_model(config, dtype=torch.bfloat16, device=args.device, seed=0), path)
            for dtype in args.dtypes:
                for which in ("dsv2", "transformers"):
                    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--device", args.device,
                           "--contexts", *map(str, args.contexts),
                           "--worker", which, path, dtype, str(args.new_tokens)]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode:
                        print(out.stderr[-3000:], file=sys.stderr)
                        raise SystemExit(f"{which} {name} {dtype} failed")
                    results[(name, dtype, which)] = json.loads(out.stdout.strip().splitlines()[-1])
                report(name, dtype, config, results[(name, dtype, "dsv2")], results[(name, dtype, "transformers")],
                       bandwidth, args.contexts)
    if args.json:
        Path(args.json).write_text(json.dumps({" ".join(k): v for k, v in results.items()}, indent=1))


def report(name, dtype, config, ours, theirs, bandwidth, contexts) -> None:
    print(f"\n### {name} ({summarize(config)['total_params'] / 1e6:.0f}M params), {dtype}")
    print(f"peak memory (RSS on CPU, allocated on GPU): dsv2 {ours['peak_rss_mb']:.0f} MB, "
          f"transformers {theirs['peak_rss_mb']:.0f} MB")
    print("| batch x prompt | prefill tok/s dsv2 | transformers | ratio | decode tok/s dsv2 | transformers | ratio "
          "| latent cache bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for key, o in ours["shapes"].items():
        t = theirs["shapes"][key]
        print(f"| {key} | {o['prefill_tok_s']:.0f} | {t['prefill_tok_s']:.0f} | "
              f"{o['prefill_tok_s'] / t['prefill_tok_s']:.2f} | {o['decode_tok_s']:.1f} | {t['decode_tok_s']:.1f} | "
              f"**{o['decode_tok_s'] / t['decode_tok_s']:.2f}** | {o['kv_bytes']:,} |")
    print("| context (batch 1) | step ms dsv2 | transformers | ratio | dsv2 GB/s | % of read bandwidth |")
    print("|---|---|---|---|---|---|")
    for ctx in contexts:
        o, t = ours["context_step_ms"][str(ctx)], theirs["context_step_ms"][str(ctx)]
        gbs = step_bytes(config, dtype, ctx) / (o / 1000) / 1e9
        print(f"| {ctx} | {o:.1f} | {t:.1f} | {t / o:.2f} | {gbs:.1f} | {100 * gbs / bandwidth:.0f}% |")
    first, last = (ours["context_step_ms"][str(c)] for c in (contexts[0], contexts[-1]))
    print(f"dsv2 step at {contexts[-1]} / step at {contexts[0]}: {last / first:.2f}")


if __name__ == "__main__":
    main()
