"""Distributed training on 2 CPU processes (gloo, torchrun): expert parallel + FSDP2 give the single-process
step, device-limited routing bounds the all-to-all, and a SIGKILLed 2-process run resumes exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv2
from dsv2.config import preset
from dsv2.train.distributed import Distributed
from dsv2.train.loop import forward_losses
from dsv2.train.optim import build_optimizer

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
WORKER = Path(__file__).with_name("parallel_worker.py")


def two_group_config(path: Path, topk_group: int = 1) -> Path:
    """nano with D = 2 expert groups (one per rank) and M = topk_group of them per token."""
    preset("nano").replace(n_group=2, topk_group=topk_group).to_json(path)
    return path


def torchrun(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(TORCHRUN + args, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def test_two_ranks_match_one_process(tmp_path):
    import parallel_worker as worker

    config_path = two_group_config(tmp_path / "config.json")
    done = torchrun([str(WORKER), str(config_path), str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = torch.load(tmp_path / "step.pt", weights_only=True)

    config = dsv2.ModelConfig.from_json(config_path)
    model = dsv2.weights.random_model(config, seed=worker.SEED).train()
    optimizer = build_optimizer(model, 1e-3)
    inputs, targets = worker.batch(config)
    torch.manual_seed(worker.SEED)
    lm, aux, _, _ = forward_losses(model, inputs, targets, worker.CFG, config, worker.CFG.alphas(config), Distributed())
    (lm + aux).backward()
    assert ranks["lm"] == pytest.approx(lm.item(), rel=1e-6)
    assert ranks["aux"] == pytest.approx(aux.item(), rel=1e-6)
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads.keys() == ranks["grads"].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ranks["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert ranks["norm"] == pytest.approx(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item(), rel=1e-5)
    optimizer.step()

    # M = 1 of D = 2: each token's hidden state went to exactly one rank, in every layer, from both ranks
    traffic = ranks["traffic"]  # [rank, layer, (tokens, dispatched)]
    assert traffic.shape == (2, config.num_hidden_layers - config.first_k_dense_replace, 2)
    assert (traffic[..., 0] == inputs.numel() // 2).all() and (traffic[..., 1] == traffic[..., 0]).all()

    # the gathered model loads on one process and gives the 2-rank model's logits
    loaded = dsv2.load_model(tmp_path / "model", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), ranks["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.eval()(inputs), ranks["logits"], rtol=1e-4, atol=1e-5)
