"""GRPO: the loss against a hand computation (ratio, clip, k3 KL, each normalisation), group advantages, the
rollout batch (engine log-probs and routing replay), a short run that raises a toy reward, exact resume, and
bad input refused before anything is written."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from dsv2.align import grpo
from dsv2.cli import main
from dsv2.config import preset
from dsv2.data.corpus import DataError
from dsv2.plots import plot_run
from dsv2.tokenizer import Tokenizer
from dsv2.train import checkpoint, core
from dsv2.weights import random_model, save_model

TOY_REWARD = '''
def reward(prompts, completions, **columns):
    """The share of a completion's first 8 characters that are lowercase letters."""
    return [sum(ch.islower() for ch in c[:8]) / 8 for c in completions]
'''


def test_grpo_loss_equals_a_hand_computation():
    torch.manual_seed(0)
    B, S, eps, beta = 3, 4, 0.2, 0.1
    logp = torch.randn(B, S) * 0.3 - 1
    old = logp + torch.randn(B, S) * 0.3  # ratios on both sides of the clip range
    ref = logp + torch.randn(B, S) * 0.2
    adv = torch.tensor([1.5, -0.7, 0.4])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    loss, kl, clipped = grpo.grpo_token_loss(logp, old, adv, eps, beta, ref)
    for i in range(B):
        for t in range(S):
            ratio = math.exp(logp[i, t] - old[i, t])
            a = adv[i].item()
            want_kl = math.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]).item() - 1
            want = -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a) + beta * want_kl
            assert loss[i, t].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
            assert kl[i, t].item() == pytest.approx(want_kl, rel=1e-5, abs=1e-6)
            assert clipped[i, t].item() == ((ratio > 1 + eps and a > 0) or (ratio < 1 - eps and a < 0))
    assert clipped.any() and not clipped.all()

    lengths = mask.sum(1).tolist()
    by_hand = {
        "grpo": sum(sum(loss[i, t].item() for t in range(S) if mask[i, t]) / lengths[i] for i in range(B)) / B,
        "dr_grpo": sum(loss[i][mask[i]].sum().item() for i in range(B)) / (B * 5),
        "dapo": loss[mask].sum().item() / mask.sum().item(),
    }
    for loss_type, want in by_hand.items():
        weights, denominator = grpo.loss_weights(mask, loss_type, max_completion_tokens=5)
        got = (loss * weights).sum() / (weights.sum() if denominator is None else denominator)
        assert got.item() == pytest.approx(want, rel=1e-5), loss_type


def test_advantages_are_group_relative():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    adv = grpo.group_advantages(rewards, group_size=4)
    assert torch.equal(adv[:4], torch.zeros(4))  # a group with equal rewards teaches nothing
    second = rewards[4:]
    assert torch.allclose(adv[4:], (second - second.mean()) / (second.std() + grpo.ADVANTAGE_EPS))
    assert torch.allclose(grpo.group_advantages(rewards, 4, scale=False)[4:], second - second.mean())


def _toy_setup(tmp_path, **overrides) -> grpo.GRPOConfig:
    model = random_model(preset("nano"), seed=0)
    save_model(model, tmp_path / "start", progress=False)
    Tokenizer.byte_level(model.config).save(tmp_path / "start")
    (tmp_path / "toy_reward.py").write_text(TOY_REWARD)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say {w}", "topic": w}) + "\n"
                                                    for w in ("hi", "hello", "yes", "no")))
    fields = dict(model=str(tmp_path / "start"), out=str(tmp_path / "run"), reward=f"{tmp_path}/toy_reward.py:reward",
                  prompts=str(tmp_path / "prompts.jsonl"), steps=12, batch_size=16, group_size=8,
                  max_completion_tokens=8, lr=1e-2, warmup_steps=0, beta=0.04, save_every=4, eval_every=100,
                  progress=False)
    return grpo.GRPOConfig(**{**fields, **overrides})


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / core.METRICS_FILE).read_text().splitlines()]


def test_a_short_run_raises_the_reward_and_resumes_exactly(tmp_path):
    cfg = _toy_setup(tmp_path)
    grpo.train(cfg)
    run = tmp_path / "run"
    lines = _metrics(run)
    assert len(lines) == 12
    for key in ("reward", "reward_std", "kl", "clip_fraction", "completion_length", "loss", "balance_loss",
                "logprob_diff"):
        assert all(math.isfinite(m[key]) for m in lines), key
    first, last = [sum(m["reward"] for m in part) / 3 for part in (lines[:3], lines[-3:])]
    assert last > first + 0.15, (first, last)
    assert lines[-1]["kl"] > 0  # the policy moved away from the reference
    assert (run / "model" / "config.json").is_file() and (run / "model" / "tokenizer.json").is_file()
    assert (run / "model" / "tokenizer_config.json").is_file()
    assert run / "reward.png" in plot_run(run)

    # lose the last checkpoint: the resumed run redoes steps 9..12 exactly
    shutil.rmtree(checkpoint.latest_checkpoint(run))
    grpo.train(grpo.GRPOConfig(**{**cfg.__dict__, "resume": True}))
    again = _metrics(run)
    assert [m["step"] for m in again] == list(range(1, 13))
    for a, b in zip(lines, again, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["reward"] == b["reward"]


@pytest.mark.parametrize("replay", [False, True])
def test_rollout_batch_and_routing_replay(tmp_path, replay):
    cfg = _toy_setup(tmp_path, routing_replay=replay, inner_iterations=2, steps=4, save_every=2)
    stage = grpo.stage(cfg)
    policy = core.initial_model(stage.config, core.model_config(stage.config), torch.device("cpu"))
    stage.on_model(policy)
    batch = stage.data.next_batch(cfg.batch_size)
    assert stage.data.next_batch(cfg.batch_size) is batch  # μ = 2 steps per rollout batch
    assert stage.data.next_batch(cfg.batch_size) is not batch
    mask = batch.columns["completion_mask"]
    assert torch.equal(batch.weights > 0, mask) and (mask <= batch.token_mask).all()
    figures = stage.data.metrics()
    assert 0 < figures["completion_length"] <= cfg.max_completion_tokens
    assert 0 <= figures["routing_mismatch"] < 0.01  # an fp32 engine routes as the trainer does
    if replay:
        # an fp32 engine routing every token as the trainer does: what remains is numerical
        assert batch.replay is not None and figures["logprob_diff"] < 1e-3
    else:
        assert batch.replay is None and figures["logprob_diff"] < 1e-2


def test_bad_prompts_file_is_refused_before_anything_is_written(tmp_path):
    cfg = _toy_setup(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"prompts\.jsonl:2"):
        grpo.train(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="group_size"):
        grpo.train(grpo.GRPOConfig(**{**cfg.__dict__, "group_size": 3}))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "ok"}\n')
    with pytest.raises(ValueError, match="toy_reward.py:missing"):
        grpo.train(grpo.GRPOConfig(**{**cfg.__dict__, "reward": f"{tmp_path}/toy_reward.py:missing"}))
    assert not (tmp_path / "run").exists()


def test_cli_grpo_with_lora(tmp_path, capsys):
    cfg = _toy_setup(tmp_path)
    assert main(["grpo", cfg.model, "--reward", cfg.reward, "--prompts", cfg.prompts, "--out", cfg.out,
                 "--steps", "2", "--batch-size", "8", "--group-size", "4", "--lora-rank", "4", "--lr", "1e-2",
                 "--routing-replay", "--no-progress"]) == 0
    assert "reward" in capsys.readouterr().out
    run = tmp_path / "run"
    assert (run / checkpoint.ADAPTER_DIR / "adapter_config.json").is_file()
    assert len(_metrics(run)) == 2
    assert main(["grpo", cfg.model, "--task", "addition", "--reward", cfg.reward, "--out", cfg.out]) == 2
    assert "either a built-in task or a reward" in capsys.readouterr().err
