"""Run by tests/test_parallel.py under `torchrun --nproc-per-node 2`: one training step of a 2-group nano model
(expert parallel over the 2 ranks, FSDP2 for the rest) on a fixed global batch.

    torchrun --standalone --nproc-per-node 2 tests/parallel_worker.py CONFIG OUT

Rank 0 writes OUT/step.pt (losses, gathered gradients, all-to-all counts, logits of the stepped model) and
OUT/model (the stepped model, gathered, in the HF layout).
"""

from __future__ import annotations

import sys

import torch

from dsv2.config import ModelConfig
from dsv2.model import Transformer
from dsv2.train import balance, core, parallel
from dsv2.train.distributed import Distributed
from dsv2.train.optim import build_optimizer
from dsv2.weights import random_model, save_model

SEED, BATCH, SEQ, CAPACITY = 0, 4, 16, 1.0


def step_context(model: Transformer, dist: Distributed) -> core.StepContext:
    """The training step's context with the paper's V2 coefficients and token dropping at capacity 1.0."""
    n_devices, topk_devices = parallel.device_groups(model.config, dist.world)
    dropping = balance.install_token_dropping(model, CAPACITY, n_devices, dist)
    alphas = (balance.ALPHA_EXPERT, balance.ALPHA_DEVICE, balance.ALPHA_COMM)
    return core.StepContext(core.next_token_loss, alphas, n_devices, topk_devices, dropping=dropping, dist=dist)


def batch(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def lopsided_inputs(dim: int, per_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [8,d], weights and expert ids [8,2] where every slot is one of rank 0's experts."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, dim, generator=gen)
    weights = torch.rand(8, 2, generator=gen)
    return x, weights, torch.stack([torch.randperm(per_rank, generator=gen)[:2] for _ in range(8)])


def one_rank_only(layer: parallel.ExpertParallel) -> dict[str, torch.Tensor]:
    """Every slot of both ranks on rank 0's experts: rank 1 receives nothing, yet must join every all-to-all of
    the backward too. The output and input gradients, for comparison with RoutedExperts on one process."""
    x, weights, indices = lopsided_inputs(layer.w1.shape[-1], layer.per_rank)
    x.requires_grad_(True)
    weights.requires_grad_(True)
    y = layer(x, weights, indices)
    y.square().sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "w_grad": weights.grad}


def main() -> None:
    config_path, out = sys.argv[1], sys.argv[2]
    config = ModelConfig.from_json(config_path)
    dist = Distributed.from_env()
    model = parallel.parallelize(random_model(config, seed=SEED).train(), dist)
    optimizer = build_optimizer(model, 1e-3)
    inputs, targets = batch(config)
    torch.manual_seed(SEED)  # the protected-sequence draw of token dropping
    result = core.backward(model, core.Batch(inputs, targets), step_context(model, dist))
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    # (tokens, hidden states dispatched, slots computed by experts) per MoE layer, for every rank
    counts = [[m.traffic.tokens, m.traffic.dispatched, m.traffic.expert_rows] for m in parallel.expert_layers(model)]
    traffic = dist.gather(torch.tensor([counts]))
    norm = parallel.clip_grad_norm_(model, 1.0, dist)
    optimizer.step()
    with torch.no_grad():
        logits = model.eval()(inputs)  # eval: no token dropping
    full = parallel.full_model(model)
    lopsided = one_rank_only(parallel.expert_layers(model)[0])
    if dist.is_main:
        torch.save({"lm": result["loss"], "aux": result["balance_loss"], "grads": grads, "traffic": traffic,
                    "norm": norm, "logits": logits, "lopsided": lopsided}, f"{out}/step.pt")
        save_model(full, f"{out}/model", progress=False)
    dist.close()


if __name__ == "__main__":
    main()
