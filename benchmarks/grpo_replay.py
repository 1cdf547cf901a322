"""Routing replay (R3, arXiv 2510.11370) in GRPO: the train/inference mismatch with and without it.

From one model folder (an SFT run's RUN/model), the same GRPO run four times: rollouts from the engine in fp32
or bf16, routing replay off or on. Printed per run, as means over its steps: |log π_engine − log π_trainer| of
the sampled tokens (`logprob_diff`), the share of (token, MoE layer) pairs where the trainer's own router picks
other experts than the engine did (`routing_mismatch`), the KL to the reference, the sampled reward; then the
greedy accuracy of the final model. The fp32 run without replay is the reference the others are compared with.

    python benchmarks/grpo_replay.py --model runs/sft/model [--task addition] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from dsv2 import LLM
from dsv2.align import grpo
from dsv2.data import tasks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder to start GRPO from")
    p.add_argument("--task", default="addition")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--max-completion-tokens", type=int, default=6)
    p.add_argument("--eval-n", type=int, default=200)
    args = p.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    header = f"{'rollouts':<9} {'replay':<7} {'logprob_diff':>12} {'routing_mismatch':>16} {'kl':>8} " \
             f"{'reward':>7} {'accuracy':>8} {'s':>6}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            for replay in (False, True):
                out = Path(tmp) / f"{dtype}-{replay}"
                cfg = grpo.GRPOConfig(model=args.model, task=args.task, out=str(out), steps=args.steps,
                                      max_completion_tokens=args.max_completion_tokens, rollout_dtype=dtype,
                                      routing_replay=replay, save_every=args.steps, progress=False)
                t0 = time.perf_counter()
                grpo.train(cfg)
                seconds = time.perf_counter() - t0
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

                def mean(key: str, rows=rows) -> float:
                    return sum(r[key] for r in rows) / len(rows)

                acc = tasks.evaluate(LLM(out / "model", dtype="float32"), tasks.get_task(args.task), n=args.eval_n)
                print(f"{dtype:<9} {'on' if replay else 'off':<7} {mean('logprob_diff'):>12.2e} "
                      f"{mean('routing_mismatch'):>16.4f} {mean('kl'):>8.4f} {mean('reward'):>7.3f} "
                      f"{acc['accuracy']:>8.3f} {seconds:>6.1f}")


if __name__ == "__main__":
    main()
