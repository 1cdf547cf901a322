"""Training throughput: dsv2's training step vs transformers' DeepseekV2ForCausalLM, same config and batch.

One step = forward, loss, backward, gradient clipping and an AdamW step on the CPU (2 threads by default),
fp32 or, with --bf16, under bf16 autocast for both. dsv2's step also computes the three balance losses
(α = the paper's V2 values) as `dsv2 train` does; transformers' computes none (it has no aux loss).
Each implementation runs in its own process.

    python benchmarks/train.py [--preset small] [--batch 4] [--seq 256] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile

import torch

WORKER = r"""
import json, sys, time, torch
import torch.nn.functional as F
which, path, batch, seq, steps, threads, bf16 = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
torch.set_num_threads(threads)
torch.manual_seed(0)
if which == "dsv2":
    import dsv2
    from dsv2.model.moe import RoutingRecord
    from dsv2.train import balance, optim
    from dsv2.train.loop import routing_losses
    model = dsv2.load_model(path, progress=False).train()
    opt = optim.build_optimizer(model, 1e-4)
    alphas = (balance.ALPHA_EXPERT, balance.ALPHA_DEVICE, balance.ALPHA_COMM)
    def loss_of(x, y):
        record = RoutingRecord()
        logits = model(x, routing=record)
        aux, _, _ = routing_losses(record, model.config, alphas)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()) + aux
else:
    import transformers
    model = transformers.DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    def loss_of(x, y):
        return F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
vocab = model.config.vocab_size
times = []
for i in range(steps + 1):
    x = torch.randint(0, vocab, (batch, seq + 1))
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(bf16)):
        loss = loss_of(x[:, :-1], x[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
step = sorted(times[1:])[len(times[1:]) // 2]
print(json.dumps({"step_s": step, "tokens_per_s": batch * seq / step}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for both (weights and optimizer fp32)")
    args = ap.parse_args()
    import dsv2

    with tempfile.TemporaryDirectory() as d:
        dsv2.save_model(dsv2.load_model(args.preset, seed=0), d)
        rows = {}
        for which in ("dsv2", "transformers"):
            out = subprocess.run([sys.executable, "-c", WORKER, which, d, str(args.batch), str(args.seq),
                                  str(args.steps), str(args.threads), str(int(args.bf16))],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            rows[which] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {args.threads} threads; preset {args.preset}, "
          f"batch {args.batch} x {args.seq} tokens, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"median of {args.steps} steps")
    for which, r in rows.items():
        print(f"{which:<13} {r['step_s']:7.2f} s/step  {r['tokens_per_s']:8.1f} tokens/s")
    print(f"dsv2 / transformers: {rows['dsv2']['tokens_per_s'] / rows['transformers']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
