"""Training time per token of an ablation study's variants (`dsv2 ablate`), measured interleaved.

Each variant is built as its study builds it (`train/ablate.py`: the base preset with the variant's overrides) and
trained with the training core's own step (`core.train_step`: forward, loss, balance losses, backward, clipping,
AdamW) on random tokens of the study's batch. The steps are taken in rounds, one step of every variant per
round, so the load of a shared machine falls on all of them alike; the figure is each variant's median step
time over the rounds, after a warm-up round, as microseconds per token, with the training FLOPs per token
(`info.train_flops_per_token`) beside it and both as ratios to the first variant.

    python benchmarks/train_cost.py [--study cost] [--rounds 20] [--batch 16] [--seq 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsv2.config import ModelConfig, resolve_config
from dsv2.hardware import describe
from dsv2.info import summarize, train_flops_per_token
from dsv2.train import balance, core, optim, parallel
from dsv2.train.ablate import STUDIES
from dsv2.weights import random_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="cost", choices=list(STUDIES))
    ap.add_argument("--model", default="nano", help="the study's base preset or config.json")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = resolve_config(args.model)
    runs = []
    for v in STUDIES[args.study].variants(base):
        config = ModelConfig.from_dict({**base.to_dict(), **v.overrides})
        model = random_model(config, seed=0).train()
        n_devices, topk_devices = parallel.device_groups(config)
        ctx = core.StepContext(core.next_token_loss, balance.default_alphas(config), n_devices, topk_devices)
        runs.append((v.name, config, model, optim.build_optimizer(model, 1e-3), ctx, []))
    for i in range(args.rounds + 1):
        for _, config, model, optimizer, ctx, times in runs:
            tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1))
            t0 = time.perf_counter()
            core.train_step(model, core.Batch(tokens[:, :-1], tokens[:, 1:]), optimizer, 1e-3, ctx)
            if i:  # round 0 warms up
                times.append(time.perf_counter() - t0)
    print(f"{describe()}; {args.rounds} rounds of one step per variant, batch {args.batch} x {args.seq}")
    print(f"{'variant':<12} {'active params':>14} {'FLOPs/token':>12} {'us/token':>9} {'FLOPs ratio':>11} "
          f"{'time ratio':>10}")
    first_flops = first_time = None
    for name, config, _, _, _, times in runs:
        flops = train_flops_per_token(config, args.seq)
        per_token = statistics.median(times) / (args.batch * args.seq)
        first_flops, first_time = first_flops or flops, first_time or per_token
        print(f"{name:<12} {summarize(config)['active_params']:>14,} {flops / 1e6:>10.2f} M {per_token * 1e6:>9.2f} "
              f"{flops / first_flops:>11.2f} {per_token / first_time:>10.2f}")


if __name__ == "__main__":
    main()
