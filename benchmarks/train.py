"""Training throughput: dsv2's training step vs transformers' DeepseekV2ForCausalLM, same config and batch.

One step = forward, loss, backward, gradient clipping and an AdamW step on the CPU (2 threads by default),
fp32 or, with --bf16, under bf16 autocast for both. dsv2's step also computes the three balance losses
(α = the paper's V2 values) as `dsv2 train` does; transformers' computes none (it has no aux loss).
Each implementation runs in its own process.

    python benchmarks/train.py [--preset small] [--batch 4] [--seq 256] [--steps 3]

With --nproc N, dsv2 on one process against dsv2 on N processes (torchrun, gloo on the CPU, expert parallel +
FSDP2), the same global batch and the same total threads, on the preset with n_group = N expert groups (one per
rank) and topk_group = M (--topk-group): tokens/s of each, and the hidden states the all-to-alls moved per step
against device-limited routing's bound of M·T per layer (T tokens); and the N-process run with token dropping at
--capacity-factor against none: expert rows computed and bytes dispatched.

    python benchmarks/train.py --nproc 2 [--topk-group 1]
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
    from dsv2.train import balance, optim, parallel
    model = dsv2.load_model(path, progress=False).train()
    opt = optim.build_optimizer(model, 1e-4)
    alphas = (balance.ALPHA_EXPERT, balance.ALPHA_DEVICE, balance.ALPHA_COMM)
    n_devices, topk_devices = parallel.device_groups(model.config)
    def loss_of(x, y):
        logits, routings = model(x, return_routing=True)
        aux, _, _ = balance.routing_losses(routings, alphas, n_devices, topk_devices)
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

# one rank of an N-process run (under torchrun): the training core's own step (core.train_step), token dropping
# at the capacity factor given (0 = off)
DIST_WORKER = r"""
import json, sys, time, torch
import dsv2
from dsv2.train import balance, core, optim, parallel
from dsv2.train.distributed import Distributed
path, batch, seq, steps, threads, bf16 = sys.argv[1], *map(int, sys.argv[2:7])
capacity = float(sys.argv[7])
torch.set_num_threads(threads)
torch.manual_seed(0)
dist = Distributed.from_env()
model = parallel.parallelize(dsv2.load_model(path, progress=False).train(), dist)
opt = optim.build_optimizer(model, 1e-4)
config = model.config
n_devices, topk_devices = parallel.device_groups(config, dist.world)
dropping = balance.install_token_dropping(model, capacity, n_devices, dist) if capacity > 0 else None
ctx = core.StepContext(core.next_token_loss, (balance.ALPHA_EXPERT, balance.ALPHA_DEVICE, balance.ALPHA_COMM),
                       n_devices, topk_devices, bf16=bool(bf16), dropping=dropping, dist=dist)
layers = parallel.expert_layers(model)
times = []
for i in range(steps + 1):
    if i == 1:  # count the timed steps only
        for layer in layers:
            layer.traffic = parallel.Traffic()
    x = torch.randint(0, config.vocab_size, (batch, seq + 1))  # the global batch: same seed on every rank
    dist.barrier()
    t = time.perf_counter()
    core.train_step(model, core.Batch(x[:, :-1], x[:, 1:]), opt, 1e-4, ctx)
    times.append(time.perf_counter() - t)
step = sorted(times[1:])[len(times[1:]) // 2]
# summed over layers and ranks, per step
tokens, dispatched, sent, rows = (sum(dist.mean(*(getattr(l.traffic, f) for l in layers))) * dist.world / steps
                                  for f in ("tokens", "dispatched", "bytes_sent", "expert_rows"))
if dist.is_main:
    print(json.dumps({"step_s": step, "tokens_per_s": batch * seq / step, "tokens": tokens,
                      "dispatched": dispatched, "bytes_sent": sent, "expert_rows": rows}))
dist.close()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for both (weights and optimizer fp32)")
    ap.add_argument("--nproc", type=int, help="compare dsv2 on 1 and on this many processes (no transformers)")
    ap.add_argument("--topk-group", type=int, default=1, help="with --nproc: M, expert groups (ranks) per token")
    ap.add_argument("--capacity-factor", type=float, default=1.0,
                    help="with --nproc: token dropping's capacity, against no dropping")
    args = ap.parse_args()
    if args.nproc:
        compare_processes(args)
        return
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


def compare_processes(args: argparse.Namespace) -> None:
    import dsv2

    config = dsv2.config.preset(args.preset).replace(n_group=args.nproc, topk_group=args.topk_group)
    threads = max(1, args.threads // args.nproc)
    with tempfile.TemporaryDirectory() as d:
        dsv2.save_model(dsv2.weights.random_model(config, seed=0), d, progress=False)
        worker = f"{d}/worker.py"
        with open(worker, "w") as f:
            f.write(DIST_WORKER)
        sizes = [str(args.batch), str(args.seq), str(args.steps)]
        flag = str(int(args.bf16))
        one = subprocess.run([sys.executable, "-c", WORKER, "dsv2", d, *sizes, str(args.threads), flag],
                             capture_output=True, text=True)
        many, dropping = (
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            str(args.nproc), worker, d, *sizes, str(threads), flag, str(capacity)],
                           capture_output=True, text=True)
            for capacity in (0, args.capacity_factor))
    for out in (one, many, dropping):
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
    one, many, dropping = (json.loads(out.stdout.strip().splitlines()[-1]) for out in (one, many, dropping))
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    elt = 4  # the residual stream, hence the experts' input, stays fp32 (bf16 autocast only lowers the matmuls)
    bound = args.topk_group * args.batch * args.seq * moe_layers  # M·T hidden states per layer, all layers
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {args.threads} threads in all; preset "
          f"{args.preset} with n_group={args.nproc}, topk_group={args.topk_group}; batch {args.batch} x {args.seq} "
          f"tokens, {'bf16 autocast' if args.bf16 else 'fp32'}, median of {args.steps} steps")
    print(f"1 process        {one['step_s']:7.2f} s/step  {one['tokens_per_s']:8.1f} tokens/s")
    print(f"{args.nproc} processes      {many['step_s']:7.2f} s/step  {many['tokens_per_s']:8.1f} tokens/s "
          f"({many['tokens_per_s'] / one['tokens_per_s']:.2f}x)")
    print(f"all-to-all per step ({moe_layers} MoE layers, all ranks): {many['dispatched']:.0f} hidden states "
          f"dispatched = {many['dispatched'] * config.hidden_size * elt / 1e6:.2f} MB, bound M*T*hidden = "
          f"{bound} = {bound * config.hidden_size * elt / 1e6:.2f} MB ({many['dispatched'] / bound:.2f} of it); "
          f"{many['bytes_sent'] / 1e6:.2f} MB sent between ranks by all all-to-alls, forward and backward")
    # token dropping removes the slots over a device's budget before dispatch: fewer rows computed and sent
    for name, r in (("no dropping", many), (f"capacity {args.capacity_factor}", dropping)):
        print(f"{args.nproc} processes, {name:<13} {r['tokens_per_s']:8.1f} tokens/s, expert rows computed "
              f"{r['expert_rows']:.0f}, hidden states dispatched {r['dispatched']:.0f}, "
              f"{r['bytes_sent'] / 1e6:.2f} MB sent between ranks")
    print(f"dropping saves {1 - dropping['expert_rows'] / many['expert_rows']:.1%} of expert rows and "
          f"{1 - dropping['bytes_sent'] / many['bytes_sent']:.1%} of the bytes sent")


if __name__ == "__main__":
    main()
