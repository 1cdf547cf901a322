"""The training core: token dropping removes slots before the experts run, the schedule decays by tokens (also
under a batch-size ramp), a stage starts from a model folder with config overrides, and a SIGKILLed run with
token dropping resumes exactly on one process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from conftest import wait_for_checkpoint

import dsv2
from dsv2.config import ConfigError
from dsv2.model.moe import RoutedExperts
from dsv2.train import balance, checkpoint, core, optim
from dsv2.train.pretrain import PretrainConfig, train

TINY = ["--batch-size", "4", "--seq-len", "32", "--max-documents", "120", "--tokenizer-documents", "40",
        "--eval-every", "5", "--warmup-steps", "3", "--sample-tokens", "0"]


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def counting_experts(monkeypatch) -> list[int]:
    """Record how many rows each expert call computes."""
    rows: list[int] = []
    expert = RoutedExperts.expert

    def counted(x, w1, w2, w3):
        rows.append(len(x))
        return expert(x, w1, w2, w3)

    monkeypatch.setattr(RoutedExperts, "expert", staticmethod(counted))
    return rows


def test_dropped_slots_are_not_computed(monkeypatch):
    experts = RoutedExperts(8, 16, 12)
    torch.nn.init.normal_(experts.w1), torch.nn.init.normal_(experts.w2), torch.nn.init.normal_(experts.w3)
    x, weights = torch.randn(10, 16), torch.rand(10, 2)
    indices = torch.stack([torch.randperm(8)[:2] for _ in range(10)])
    dropped = torch.rand(10, 2) < 0.4
    rows = counting_experts(monkeypatch)
    out = experts(x, weights, indices.masked_fill(dropped, -1))
    assert sum(rows) == int((~dropped).sum())  # the experts saw only the kept slots
    # = the kept slots alone (the same sum with weight 0 on the dropped ones), and = the per-expert loop twin
    torch.testing.assert_close(out, experts(x, weights * ~dropped, indices), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, experts.loop_experts(x, weights, indices.masked_fill(dropped, -1)))


def test_moe_drops_before_its_experts(monkeypatch):
    model = dsv2.load_model("nano", seed=0).train()  # 4 groups, top-2 of them: device-limited
    dropping = balance.install_token_dropping(model, 1.0, n_devices=4)
    tokens = torch.randint(0, model.config.vocab_size, (4, 32))
    rows = counting_experts(monkeypatch)
    torch.manual_seed(3)
    dropping.new_batch(4)
    protected = dropping.protected.clone()
    logits, routings = model(tokens, return_routing=True)
    assert sum(rows) == sum(int(r.kept.sum()) for r in routings)
    for r in routings:  # the keep-mask is the dropping rule applied to the router's own affinities
        affinity = r.scores.detach().gather(2, r.indices)
        expected, fraction = balance.drop_tokens(affinity, r.indices, n_experts=8, n_devices=4, protected=protected)
        assert torch.equal(r.kept, expected) and 0 < fraction < 0.5
    model.eval()  # evaluation drops nothing
    _, routings = model(tokens, return_routing=True)
    assert all(bool(r.kept.all()) for r in routings)


def test_lr_decays_at_token_fractions_under_a_ramp():
    schedule = optim.Schedule(steps=100, peak_lr=1.0, warmup_steps=5, batch_size=32, seq_len=8, ramp_start=4,
                              ramp_steps=50)
    lrs = [schedule.lr_at(s) for s in range(100)]
    total = schedule.total_tokens
    assert total == sum(schedule.batch_size_at(s) for s in range(100)) * 8
    for point, factor in ((0.6, 0.316), (0.9, 0.316**2)):
        first = next(s for s in range(5, 100) if lrs[s] <= factor + 1e-12)
        assert schedule.tokens_before(first) >= point * total > schedule.tokens_before(first - 1)
        assert lrs[first - 1] > factor + 1e-12
    # the small early steps push both decays later than 60% / 90% of the steps
    assert lrs[60] == 1.0 and lrs[90] == pytest.approx(0.316)


def test_train_with_a_batch_ramp(tmp_path):
    from dsv2.cli import main

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "8", "--batch-ramp-start", "2", "--batch-ramp-steps", "4",
                 *TINY]) == 0
    rows = metrics(run)
    schedule = optim.Schedule(8, 3e-3, 3, 4, 32, ramp_start=2, ramp_steps=4)
    assert [r["batch_size"] for r in rows] == [2, 2, 3, 4, 4, 4, 4, 4] == [schedule.batch_size_at(s) for s in range(8)]
    assert [r["tokens"] for r in rows] == [schedule.tokens_before(s + 1) for s in range(8)]
    assert [r["lr"] for r in rows] == [schedule.lr_at(s) for s in range(8)]
    assert json.loads((run / "train_config.json").read_text())["batch_ramp_start"] == 2


def test_sigkill_resume_with_token_dropping(tmp_path):
    args = [sys.executable, "-m", "dsv2.cli", "train", "--steps", "12", "--save-every", "1", "--capacity-factor",
            "1.0", *TINY]
    ref, run = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(args + ["--out", str(ref)], check=True, capture_output=True)
    proc = subprocess.Popen(args + ["--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(run, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.latest_checkpoint(run)
    assert killed_at is not None and killed_at.name < "step_0000012", killed_at
    subprocess.run(args + ["--out", str(run), "--resume"], check=True, capture_output=True)
    want, got = metrics(ref), metrics(run)
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=0, abs=1e-6)
    dropped = [[layer["dropped"] for layer in r["layers"]] for r in got]
    assert dropped == [[layer["dropped"] for layer in r["layers"]] for r in want]
    assert any(d > 0 for row in dropped for d in row)


def test_stage_from_a_model_folder_with_overrides(tmp_path):
    first = PretrainConfig(out=str(tmp_path / "first"), steps=1, batch_size=2, seq_len=32, max_documents=120,
                           tokenizer_documents=40, progress=False)
    train(first)
    base = tmp_path / "first" / "model"  # a trained model folder with its own BPE tokenizer
    yarn = {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32, "beta_fast": 32,
            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}  # from the length `first` recorded
    overrides = {"max_position_embeddings": 8192, "rope_scaling": yarn}
    cfg = PretrainConfig(model=str(base), config_overrides=overrides, out=str(tmp_path / "run"), steps=2,
                         batch_size=2, seq_len=32, max_documents=120, tokenizer_documents=40, progress=False)
    config = core.model_config(cfg)
    model = core.initial_model(cfg, config, torch.device("cpu"))
    start = dsv2.load_model(base, progress=False)
    assert model.config.max_position_embeddings == 8192 and model.config.rope_scaling["factor"] == 16.0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values(),
                                                 strict=True))
    assert not torch.equal(model.rope.inv_freq, start.rope.inv_freq)  # YaRN's blended frequencies
    train(cfg)
    saved = dsv2.config.ModelConfig.from_json(tmp_path / "run" / "model" / "config.json")
    # the stage kept the model's tokenizer rather than training another
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert saved.max_position_embeddings == 8192 and saved.rope_scaling["factor"] == 16.0
    with pytest.raises(ConfigError, match="'rope_scale' is not a ModelConfig field"):
        core.model_config(PretrainConfig(model=str(base), config_overrides={"rope_scale": 2}))


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="batch_size: 6 sequences .* grad_accum=4"):
        PretrainConfig(batch_size=6, grad_accum=4).validate()
    with pytest.raises(ValueError, match="batch_size: 2 sequences .* over 4 process"):
        PretrainConfig(batch_size=8, batch_ramp_start=2, batch_ramp_steps=4).validate(world=4)
    with pytest.raises(ValueError, match="capacity_factor: must be positive"):
        PretrainConfig(capacity_factor=0.0).validate()
    with pytest.raises(ValueError, match="steps: must be an integer >= 1"):
        train(PretrainConfig(steps=0, out=str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("kind", ["empty folder", "binary files", "jsonl without text"])
def test_train_refuses_bad_data_before_writing(tmp_path, capsys, kind):
    from dsv2.cli import main

    data = tmp_path / "data"
    if kind == "jsonl without text":
        data = tmp_path / "rows.jsonl"
        data.write_text('{"body": "no text field"}\n')
        expected = r"rows.jsonl:1: no field 'text'"
    else:
        data.mkdir()
        if kind == "binary files":
            for i in range(3):
                (data / f"blob{i}.txt").write_bytes(bytes(range(128, 256)) * 4)
        expected = str(data)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--steps", "2", *TINY]) == 2
    err = capsys.readouterr().err
    assert expected in err and "dsv2: error:" in err, err
    assert not run.exists()  # nothing half-written left behind
