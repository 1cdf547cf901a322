"""Distributed training on 2 CPU processes (gloo, torchrun): expert parallel + FSDP2 give the single-process
step, device-limited routing bounds the all-to-all, and a SIGKILLed 2-process run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import wait_for_checkpoint

import dsv2
from dsv2.config import preset
from dsv2.train import checkpoint, core, parallel
from dsv2.train.distributed import Distributed
from dsv2.train.optim import build_optimizer

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
WORKER = Path(__file__).with_name("parallel_worker.py")


def two_group_config(path: Path, topk_group: int = 1) -> Path:
    """nano with D = 2 expert groups (one per rank) and M = topk_group of them per token."""
    preset("nano").replace(n_group=2, topk_group=topk_group).to_json(path)
    return path


def torchrun(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(TORCHRUN + args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]


def descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [d for c in map(int, children) for d in (c, *descendants(c))]


def test_two_ranks_match_one_process(tmp_path):
    import parallel_worker as worker

    config_path = two_group_config(tmp_path / "config.json")
    torchrun([str(WORKER), str(config_path), str(tmp_path)])
    ranks = torch.load(tmp_path / "step.pt", weights_only=True)

    config = dsv2.ModelConfig.from_json(config_path)
    model = dsv2.weights.random_model(config, seed=worker.SEED).train()
    optimizer = build_optimizer(model, 1e-3)
    inputs, targets = worker.batch(config)
    ctx = worker.step_context(model, Distributed())
    torch.manual_seed(worker.SEED)
    result = core.backward(model, core.Batch(inputs, targets), ctx)
    assert ranks["lm"] == pytest.approx(result["loss"], rel=1e-6)
    assert ranks["aux"] == pytest.approx(result["balance_loss"], rel=1e-6)
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads.keys() == ranks["grads"].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ranks["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)

    # Token dropping removed slots before dispatch: with M = 1 of D = 2, a token's hidden state went to exactly
    # one rank if any of its slots was kept and to none otherwise, and the experts computed exactly the kept
    # slots; the same slots as one process keeps (the same protected draw, replayed here).
    torch.manual_seed(worker.SEED)
    ctx.dropping.new_batch(len(inputs))
    with torch.no_grad():
        _, routings = model(inputs, return_routing=True)
    kept = torch.stack([r.kept for r in routings])  # [layer, B, S, K]
    assert 0 < kept.float().mean() < 1  # capacity 1.0 dropped some, not all
    traffic = ranks["traffic"]  # [rank, layer, (tokens, dispatched, expert rows)]
    assert traffic.shape == (2, len(routings), 3)
    assert (traffic[..., 0] == inputs.numel() // 2).all()
    assert traffic[..., 1].sum(0).tolist() == kept.any(-1).flatten(1).sum(1).tolist()
    assert traffic[..., 2].sum(0).tolist() == kept.flatten(1).sum(1).tolist()

    assert ranks["norm"] == pytest.approx(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item(), rel=1e-5)
    optimizer.step()

    # the gathered model loads on one process and gives the 2-rank model's logits
    loaded = dsv2.load_model(tmp_path / "model", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), ranks["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.eval()(inputs), ranks["logits"], rtol=1e-4, atol=1e-5)

    # a rank that no token reaches still completes forward and backward, with the single-process result
    experts = loaded.layers[config.first_k_dense_replace].ffn.experts.train()
    x, weights, indices = worker.lopsided_inputs(config.hidden_size, config.n_routed_experts // 2)
    x.requires_grad_(True)
    weights.requires_grad_(True)
    y = experts(x, weights, indices)
    y.square().sum().backward()
    lopsided = ranks["lopsided"]
    torch.testing.assert_close(lopsided["y"], y.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lopsided["x_grad"], x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lopsided["w_grad"], weights.grad, rtol=1e-5, atol=1e-6)


def test_two_ranks_killed_and_resumed(tmp_path):
    config = two_group_config(tmp_path / "config.json")
    opts = ["-m", "dsv2.cli", "train", "--model", str(config), "--sample-tokens", "0", "--steps", "10",
            "--batch-size", "4", "--seq-len", "32", "--max-documents", "120", "--tokenizer-documents", "40",
            "--eval-every", "5", "--save-every", "1", "--warmup-steps", "3", "--capacity-factor", "1.0"]
    ref, run = tmp_path / "ref", tmp_path / "killed"
    torchrun(opts + ["--out", str(ref)])

    run.mkdir()  # the same tokenizer and shards, without building them again
    for name in ("tokenizer.json", "data"):
        os.symlink(ref / name, run / name)
    proc = subprocess.Popen(TORCHRUN + opts + ["--out", str(run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_checkpoint(run, 4)
    for pid in [*descendants(proc.pid), proc.pid]:  # both ranks (torchrun starts them in sessions of their own)
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.latest_checkpoint(run)
    assert killed_at is not None and killed_at.name < "step_0000010", killed_at
    assert sorted(p.name for p in killed_at.iterdir()) == [
        "config.json", "model.safetensors", "state.json", "trainer.rank0.pt", "trainer.rank1.pt"]

    with pytest.raises(ValueError, match="world_size is 2 but this run has 1 process"):
        from dsv2.train.pretrain import PretrainConfig, train

        train(PretrainConfig(model=str(config), out=str(run), resume=True, steps=10, progress=False))
    torchrun(opts + ["--out", str(run), "--resume"])

    def losses(folder: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(run)) == 10
    assert losses(run) == pytest.approx(losses(ref), rel=0, abs=1e-6)
    tokens = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dsv2.load_model(run / "model", progress=False)(tokens),
                                   dsv2.load_model(ref / "model", progress=False)(tokens), rtol=0, atol=1e-6)


def test_placement_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="n_routed_experts=8 is not divisible by the expert-parallel size 3"):
        parallel.check_placement(preset("nano"), 3)
    with pytest.raises(ValueError, match="n_group=4.* run 4 processes, not 2"):
        parallel.check_placement(preset("nano"), 2)
    parallel.check_placement(preset("nano"), 4)
    greedy = preset("nano").replace(topk_method="greedy", n_group=1, topk_group=1)
    parallel.check_placement(greedy, 2)
    assert parallel.device_groups(greedy, 2) == (2, 2) and parallel.device_groups(greedy) == (1, 1)
    assert parallel.device_groups(preset("nano")) == (4, 2) == parallel.device_groups(preset("nano"), 4)
