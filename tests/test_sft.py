"""The SFT stage end to end: full and LoRA fine-tuning from a model folder, RUN/model loadable by the engine,
the PEFT adapter beside it, exact resume of a LoRA run, bad files refused before anything is written, and the
CLI (`dsv2 sft`, `dsv2 eval --task`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dsv2 import LLM
from dsv2.align import sft
from dsv2.cli import main
from dsv2.config import preset
from dsv2.data import tasks
from dsv2.data.corpus import DataError
from dsv2.tokenizer import Tokenizer
from dsv2.train import checkpoint, core
from dsv2.weights import load_model, random_model, save_model


@pytest.fixture
def start(tmp_path):
    """A random nano model folder with a byte-level tokenizer, and a file of task conversations."""
    model = random_model(preset("nano"), seed=0)
    save_model(model, tmp_path / "start", progress=False)
    Tokenizer.byte_level(model.config).save(tmp_path / "start")
    tasks.write_jsonl(tasks.sft_rows(tasks.get_task("compare"), 64, seed=0), tmp_path / "chats.jsonl")
    return tmp_path


def _config(tmp, **overrides) -> sft.SFTConfig:
    fields = dict(model=str(tmp / "start"), data=str(tmp / "chats.jsonl"), out=str(tmp / "run"), steps=4,
                  batch_size=8, seq_len=48, lr=3e-3, warmup_steps=0, save_every=2, eval_every=2, progress=False)
    return sft.SFTConfig(**{**fields, **overrides})


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / core.METRICS_FILE).read_text().splitlines()]


def test_full_sft_writes_a_model_the_engine_loads(start):
    last, counts = sft.train(_config(start))
    run = start / "run"
    assert counts["conversations"] == 64 and counts["kept"] == 64 and counts["train"] + counts["validation"] == 64
    assert json.loads((run / sft.DATA_REPORT).read_text()) == counts
    assert last["step"] == 4 and "val_loss" in last
    llm = LLM(run / "model", dtype="float32")
    out = llm.chat([{"role": "user", "content": "Which is larger: 12 or 34?"}])
    assert out.finish_reason in ("stop", "length")
    assert not (run / checkpoint.ADAPTER_DIR).exists()


def test_lora_sft_trains_only_the_adapter_and_resumes_exactly(start):
    cfg = _config(start, lora_rank=4)
    sft.train(cfg)
    run = start / "run"
    losses = _losses(run)
    assert losses[-1] < losses[0]
    assert (run / checkpoint.ADAPTER_DIR / "adapter_config.json").is_file()
    assert (run / checkpoint.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    base, tuned = load_model(start / "start"), load_model(run / "model")
    base_sd, tuned_sd = base.state_dict(), tuned.state_dict()
    changed = {k for k in base_sd if not torch.equal(base_sd[k], tuned_sd[k])}
    assert changed and all(".attn." in k or ".experts." in k or "shared_experts" in k for k in changed)
    assert not any("norm" in k or k.startswith(("embed", "head")) for k in changed)

    shutil.rmtree(checkpoint.latest_checkpoint(run))  # lose step 4: redo steps 3-4 from step 2's adapter
    sft.train(sft.SFTConfig(**{**cfg.__dict__, "resume": True}))
    assert _losses(run) == pytest.approx(losses, rel=1e-6)


def test_bad_conversations_are_refused_before_anything_is_written(start):
    (start / "chats.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r"chats\.jsonl:1: .*assistant"):
        sft.train(_config(start))
    (start / "chats.jsonl").write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r"chats\.jsonl:1: .*robot"):
        sft.train(_config(start))
    with pytest.raises(ValueError, match="data"):
        sft.train(_config(start, task="addition"))  # a file and a task
    assert not (start / "run").exists()


def test_cli_sft_then_eval_task(start, capsys):
    assert main(["sft", str(start / "start"), "--task", "compare", "--task-examples", "32", "--out",
                 str(start / "run"), "--steps", "2", "--batch-size", "8", "--seq-len", "48", "--no-progress"]) == 0
    assert "model in" in capsys.readouterr().out
    assert main(["eval", str(start / "run"), "--task", "compare", "--n", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "compare" and result["n"] == 8 and 0 <= result["accuracy"] <= 1
    assert main(["eval", str(start / "run"), "--task", "nope"]) == 2
    assert "known tasks" in capsys.readouterr().err
