"""Long prompts: prefill tok/s and peak memory against context length, and the decode step at long context.

The model is `small` extended with DeepSeek-V2's YaRN (factor 8 from L0 = 4096: `config.yarn_v2`), random
weights, written once as a checkpoint. Each (implementation, context) point runs in its own process, so its
peak memory is its own: a warm-up prompt of 512 tokens (first-call costs), then one prompt of `context`
random tokens, greedy, `--new-tokens` new tokens.

- **prefill tok/s**: context / seconds from handing over the prompt to its first new token on the host.
  dsv2's engine prefills in chunks of `--chunk` tokens (each chunk's queries against the latent cache, through
  whichever MLA path is cheaper); transformers runs the whole prompt in one forward (SDPA).
- **prefill memory**: peak RSS (VmHWM) above the RSS after the model and engine are built: the latent cache
  pages the prompt fills, plus the largest transient of a forward.
- **decode step** (ms): the median of the remaining new tokens' steps, as in `benchmarks/decode.py`.
- **bytes**: what one decode step must read (`decode.step_bytes`: active weights + the latent cache at that
  context). The target: step(longest) / step(shortest) <= 1.1 x bytes(longest) / bytes(shortest).

    python benchmarks/long_context.py                                   # 1K..32K, transformers to 16K
    python benchmarks/long_context.py --contexts 1024 4096 --transformers-max 4096   # quick look
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
from pathlib import Path

import torch

import dsv2
from dsv2 import hardware
from dsv2.config import yarn_v2
from dsv2.infer.engine import LLMEngine

sys.path.insert(0, str(Path(__file__).parent))
from decode import peak_memory_mb, prompts, step_bytes, transformers_runner  # noqa: E402

L0, FACTOR = 4096, 8
CONTEXTS = [1024, 4096, 8192, 16384, 32768]
WARMUP = 512


def config() -> dsv2.ModelConfig:
    # room for the new tokens past 32K: positions past s·L0 are still YaRN's, only less trained
    return dsv2.preset("small").replace(rope_scaling=yarn_v2(float(FACTOR), L0), original_max_position_embeddings=L0,
                                        max_position_embeddings=FACTOR * L0 + 256)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def worker(which: str, path: str, dtype: torch.dtype, context: int, new_tokens: int, chunk: int) -> dict:
    if which == "dsv2":  # one chunk of `chunk` tokens per step
        net = dsv2.load_model(path, dtype=dtype, progress=False)
        run = _engine_run(LLMEngine(net, max_running=1, prefill_chunk=chunk, max_prefill_tokens=chunk))
    else:
        run = transformers_runner(path, dtype, "cpu")
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    run(prompts(1, WARMUP, vocab), 3)
    base = rss_mb()
    seconds, steps = run(prompts(1, context, vocab), new_tokens)
    return {"prefill_tok_s": context / seconds, "step_ms": 1000 * statistics.median(steps),
            "prefill_mem_mb": peak_memory_mb("cpu") - base}


def _engine_run(engine: LLMEngine):
    """`decode.dsv2_runner`'s loop for one sequence on an engine with its own prefill chunk."""
    def run(ids: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
        params = dsv2.SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        request = engine.make_request(ids[0], params)
        t0 = time.perf_counter()
        engine.add_request(request)
        while not request.out.token_ids:
            engine.step()
        t1 = time.perf_counter()
        steps = []
        while engine.has_unfinished():
            t = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t)
        return t1 - t0, steps

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    ap.add_argument("--transformers-max", dest="transformers_max", type=int, default=16384,
                    help="longest context to run transformers at (its one-forward prefill is slow on a CPU)")
    ap.add_argument("--new-tokens", dest="new_tokens", type=int, default=9)
    ap.add_argument("--chunk", type=int, default=512, help="dsv2's prefill chunk")
    ap.add_argument("--dtype", default="auto", choices=list(hardware.DTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--worker", nargs=4, metavar=("WHICH", "PATH", "DTYPE", "CONTEXT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        which, path, dtype, context = args.worker
        print(json.dumps(worker(which, path, getattr(torch, dtype), int(context), args.new_tokens, args.chunk)))
        return
    dtype = str(hardware.resolve_dtype(args.dtype, "cpu")).removeprefix("torch.")
    print(f"machine: {hardware.describe()}; small + YaRN x{FACTOR} from {L0}, {dtype}, dsv2 prefill chunk "
          f"{args.chunk}, {args.new_tokens} new tokens")
    results: dict[str, dict[int, dict]] = {"dsv2": {}, "transformers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "small-yarn")
        dsv2.save_model(dsv2.random_model(config(), dtype=torch.bfloat16, seed=0), path, progress=False)
        os.sync()  # the checkpoint's writeback would compete with the first timed point (decode.run_worker)
        for context in args.contexts:
            for which in ("dsv2", "transformers"):
                if which == "transformers" and context > args.transformers_max:
                    continue
                cmd = [sys.executable, __file__, "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
                       "--chunk", str(args.chunk), "--worker", which, path, dtype, str(context)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    print(f"{which} at {context}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                results[which][context] = row = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{which:>12} {context:>6}: prefill {row['prefill_tok_s']:.0f} tok/s, "
                      f"+{row['prefill_mem_mb']:.0f} MB, decode step {row['step_ms']:.1f} ms", flush=True)
    cfg, torch_dtype = config(), getattr(torch, dtype)
    print("\n| context | prefill tok/s dsv2 | transformers | prefill memory MB dsv2 | transformers "
          "| decode step ms dsv2 | transformers | step bytes MB |")
    print("|---|---|---|---|---|---|---|---|")
    for context in args.contexts:
        o, t = results["dsv2"].get(context), results["transformers"].get(context)
        cells = [f"{r[key]:.{digits}f}" if r else "-" for key, digits in
                 (("prefill_tok_s", 0), ("prefill_mem_mb", 0), ("step_ms", 1)) for r in (o, t)]
        print(f"| {context} | " + " | ".join(cells) + f" | {step_bytes(cfg, torch_dtype, 1, context) / 2**20:.1f} |")
    ours = results["dsv2"]
    if len(ours) >= 2:
        lo, hi = min(ours), max(ours)
        steps = ours[hi]["step_ms"] / ours[lo]["step_ms"]
        byte_ratio = step_bytes(cfg, torch_dtype, 1, hi) / step_bytes(cfg, torch_dtype, 1, lo)
        verdict = "met" if steps <= 1.1 * byte_ratio else "NOT met"
        print(f"\ndsv2 decode step({hi}) / step({lo}) = {steps:.2f}; bytes({hi}) / bytes({lo}) = {byte_ratio:.2f}; "
              f"target step ratio <= 1.1 x bytes ratio = {1.1 * byte_ratio:.2f}: {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: {str(c): r for c, r in v.items()} for k, v in results.items()},
                                              indent=1))


if __name__ == "__main__":
    main()
