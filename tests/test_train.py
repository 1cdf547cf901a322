"""Pretraining: the loss falls on the standard-library corpus, and a SIGKILLed run resumes exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from conftest import wait_for_checkpoint

import dsv2
from dsv2.train import checkpoint, optim
from dsv2.train.pretrain import PretrainConfig as TrainConfig
from dsv2.train.pretrain import train

TINY = dict(steps=30, batch_size=4, seq_len=32, max_documents=120, tokenizer_documents=40, eval_every=5,
            eval_batches=2, save_every=1, warmup_steps=3, progress=False)


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_model_generates(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), steps=80, batch_size=8, seq_len=64, max_documents=120, warmup_steps=10,
                      tokenizer_documents=120, eval_every=80, eval_batches=4, save_every=80, progress=False)
    last = train(cfg)
    first = losses(tmp_path)[0]
    # measured (AVX-512 machine, deduplicated corpus): 6.97 at step 1 (ln 1024 = 6.93: uniform), validation
    # 5.88 after 80 steps (5.52 in an earlier session, before deduplication changed the documents)
    assert first > 6.5 and last["val_loss"] < 6.1, (first, last)
    llm = dsv2.LLM(tmp_path / "model", dtype="float32")
    out = llm.generate("def ", dsv2.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.text == llm.tokenizer.decode(out.token_ids) and out.text.strip()


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    train(TrainConfig(out=str(ref), **TINY))
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "dsv2.cli", "train", "--out", str(run), "--sample-tokens", "0"]
    opts = ["--steps", "30", "--batch-size", "4", "--seq-len", "32", "--max-documents", "120",
            "--tokenizer-documents", "40", "--eval-every", "5", "--save-every", "1", "--warmup-steps", "3"]
    proc = subprocess.Popen(args + opts, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(run, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.latest_checkpoint(run)
    assert killed_at is not None and killed_at.name < "step_0000030", killed_at
    subprocess.run(args + opts + ["--resume"], check=True, capture_output=True)
    assert losses(run) == pytest.approx(losses(ref), rel=0, abs=1e-6)


def test_interrupted_checkpoint_write_keeps_previous(tmp_path):
    model = dsv2.load_model("nano", seed=0)
    opt = optim.build_optimizer(model, 1e-3)
    checkpoint.save_checkpoint(tmp_path, 1, model, opt, {"loader": {}})
    (tmp_path / "checkpoints" / ".step_0000002.tmp").mkdir()  # a write that died before its rename
    (tmp_path / "checkpoints" / ".step_0000002.tmp" / "model.safetensors").write_bytes(b"partial")
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert latest.name == "step_0000001"
    loaded, _, state = checkpoint.load_checkpoint(latest, lambda m: optim.build_optimizer(m, 1e-3))
    assert state["step"] == 1
    assert torch.equal(loaded.head.weight, model.head.weight)


def test_schedule_matches_paper():
    schedule = optim.Schedule(steps=100, peak_lr=1.0, warmup_steps=10, batch_size=16, seq_len=8)
    lrs = [schedule.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[59] == 1.0
    assert lrs[60] == pytest.approx(0.316) and lrs[89] == pytest.approx(0.316) and lrs[90] == pytest.approx(0.316**2)
    ramp = optim.Schedule(steps=100, peak_lr=1.0, warmup_steps=10, batch_size=16, seq_len=8, ramp_start=4,
                          ramp_steps=10)
    assert [ramp.batch_size_at(s) for s in (0, 5, 10, 50)] == [4, 10, 16, 16]


def test_device_losses_need_device_groups(tmp_path):
    from conftest import hub_config

    cfg_path = tmp_path / "lite.json"
    cfg_path.write_text(json.dumps({**hub_config("lite_like"), "vocab_size": 300}))
    with pytest.raises(RuntimeError, match="alpha_device=0.05 is set but the device-level balance loss"):
        train(TrainConfig(model=str(cfg_path), out=str(tmp_path / "run"), alpha_device=0.05, **{**TINY, "steps": 1}))


def test_token_dropping_run_plot_and_eval(tmp_path):
    from dsv2.cli import main
    from dsv2.plots import plot_run

    train(TrainConfig(out=str(tmp_path), capacity_factor=1.0, **{**TINY, "steps": 6}))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    dropped = [layer["dropped"] for row in rows for layer in row["layers"]]
    # with D = 4 devices at capacity 1.0 a device keeps at least its average load once any is over it, so at most
    # 1 - 1/D of the slots are dropped (0.74 seen where early routing collapsed onto one device)
    assert all(0 <= d <= 0.75 for d in dropped) and any(d > 0 for d in dropped)
    assert set(rows[-1]["layers"][0]["losses"]) == {"expert", "device", "comm"}
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["expert_load.png", "loss.png", "lr.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert main(["eval", str(tmp_path), "--batches", "2", "--batch-size", "2", "--seq-len", "32"]) == 0
