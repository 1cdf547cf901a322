"""`dsv2 ablate`: a tiny study end to end from the command line (results, table, plots, equal tokens, matched
parameters), reuse of finished runs, refusal of a folder trained otherwise, and the errors for bad arguments."""

from __future__ import annotations

import json
import math

import pytest

from dsv2.cli import main
from dsv2.config import ModelConfig, preset, resolve_config
from dsv2.info import summarize, train_flops_per_token
from dsv2.plots import read_metrics
from dsv2.train import ablate, checkpoint, core, pretrain
from dsv2.train.distributed import Distributed

# a two-layer nano, 3 steps of 2 x 16 tokens: a run takes well under a second
TINY = ["--set", "num_hidden_layers=2", "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
        "--eval-batches", "1", "--max-documents", "120", "--tokenizer-documents", "40", "--no-progress"]
STUDY = ["ablate", "moe", "--variants", "deepseekmoe,dense", "--seeds", "2", *TINY]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "moe"
    assert main([*STUDY, "--out", str(out)]) == 0
    return out


def test_tiny_study_from_cli(study, capsys):
    summary = json.loads((study / "results.json").read_text())
    variants = {v["name"]: v for v in summary["variants"]}
    assert list(variants) == ["deepseekmoe", "dense"]
    # equal training tokens, read back from every run's own metrics
    for name in variants:
        for seed in (0, 1):
            rows = read_metrics(study / "runs" / name / f"seed_{seed}")
            assert rows[-1]["tokens"] == 3 * 2 * 16 == summary["training_tokens"]
            assert math.isfinite(rows[-1]["val_loss"])
    assert {r["seed"] for r in variants["dense"]["runs"]} == {0, 1}
    # matched active parameters, and the counts are those of the models trained
    active = [v["active_params"] for v in variants.values()]
    spread = summary["matched_spread"]
    assert spread == pytest.approx(max(active) / min(active) - 1) and spread < 0.03
    for name, v in variants.items():
        trained = summarize(resolve_config(study / "runs" / name / "seed_0" / "model"))
        assert (trained["total_params"], trained["active_params"]) == (v["total_params"], v["active_params"])
    assert variants["deepseekmoe"]["total_params"] > variants["dense"]["total_params"]
    dense = variants["dense"]
    losses = [r["val_loss"] for r in dense["runs"]]
    assert dense["val_loss_mean"] == pytest.approx(sum(losses) / 2)
    assert dense["val_loss_max"] - dense["val_loss_min"] == pytest.approx(abs(losses[0] - losses[1]))
    table = (study / "results.md").read_text()
    assert "| deepseekmoe |" in table and "| dense |" in table and "deepseekmoe ahead of dense" in table
    for png in ("loss_curves.png", "val_loss.png"):
        assert (study / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a finished run keeps its model and result, not the checkpoints only a cut-short run needs
    run = study / "runs" / "dense" / "seed_0"
    assert (run / "model" / "config.json").is_file() and not (run / checkpoint.CHECKPOINTS).exists()


def test_rerun_reuses_finished_runs(study, capsys):
    results = sorted(study.glob("runs/*/seed_*/result.json"))
    before = [p.stat().st_mtime_ns for p in results]
    capsys.readouterr()
    assert main([*STUDY, "--out", str(study)]) == 0
    assert capsys.readouterr().out.count("(reused)") == 4
    assert [p.stat().st_mtime_ns for p in results] == before


def test_folder_of_other_settings_refused(study, capsys):
    args = [*STUDY, "--out", str(study)]
    args[args.index("--steps") + 1] = "4"
    assert main(args) == 2
    assert "a finished run with steps=3, not 4" in capsys.readouterr().err


def _study_config(out, variant: str) -> ablate.AblateConfig:
    return ablate.AblateConfig(study="moe", variants=(variant,), seeds=1, out=str(out), steps=3, batch_size=2,
                               seq_len=16, eval_every=2, eval_batches=1, max_documents=120, tokenizer_documents=40,
                               progress=False, config_overrides={"num_hidden_layers": 2})


def test_cut_short_run_is_resumed_or_refused(tmp_path):
    """A run that trained to its end but died before its result was written is finished from its checkpoint
    (no step retrained); one whose checkpoint holds other settings is refused."""
    dist = Distributed()
    prepared = None
    for name, steps in (("dense", 3), ("gshard", 2)):
        cfg = _study_config(tmp_path, name)
        run = pretrain.PretrainConfig(**{**vars(cfg.run_config(*ablate.study_variants(cfg), 0)), "steps": steps})
        prepared = prepared or pretrain.prepare_data(pretrain.PretrainConfig(**{**vars(run), "out": str(tmp_path)}),
                                                     dist)
        core.run(pretrain.stage(run, dist, prepared), dist)  # as run_study would, then "killed" before result.json
    metrics = (tmp_path / "runs/dense/seed_0/metrics.jsonl").read_text()
    summary = ablate.run_study(_study_config(tmp_path, "dense"), log=lambda _: None)
    assert (tmp_path / "runs/dense/seed_0/metrics.jsonl").read_text() == metrics
    assert summary["variants"][0]["runs"][0]["val_loss"] == json.loads(metrics.splitlines()[-1])["val_loss"]
    with pytest.raises(ValueError, match="a cut-short run with steps=2, not 3"):
        ablate.run_study(_study_config(tmp_path, "gshard"), log=lambda _: None)


def test_moe_variants_share_expert_and_active_widths():
    """DeepSeekMoE's fine experts add up to GShard's coarse ones, and every variant's token passes through the
    same FFN width: the active parameters differ by the routers alone."""
    base = preset("nano")
    counts = {v.name: summarize(base.__class__.from_dict({**base.to_dict(), **v.overrides}))
              for v in ablate.moe_variants(base)}
    experts = {name: s["params_by_part"].get("routed experts", 0) + s["params_by_part"].get("shared experts", 0)
               for name, s in counts.items()}
    assert experts["deepseekmoe"] == experts["gshard"] > 0 and experts["dense"] == 0
    routers = {name: s["params_by_part"].get("router", 0) for name, s in counts.items()}
    active = {name: s["active_params"] - routers[name] for name, s in counts.items()}
    assert active["deepseekmoe"] == active["gshard"] == active["dense"]


def test_paper_ordering_verdicts():
    study = ablate.STUDIES["moe"]
    rows = [{"name": "deepseekmoe", "val_loss_mean": 3.0, "val_loss_std": 0.01},
            {"name": "gshard", "val_loss_mean": 3.1, "val_loss_std": 0.01},
            {"name": "dense", "val_loss_mean": 3.09, "val_loss_std": 0.02}]
    pairs = ablate.paper_ordering(study, rows)
    assert [(p["better"], p["worse"], p["holds"], p["beyond_spread"]) for p in pairs] == [
        ("deepseekmoe", "gshard", True, True), ("gshard", "dense", False, False)]


@pytest.mark.parametrize(("args", "message"), [
    (["ablate", "moe", "--variants", "dense,switch"], "variants: 'switch' is not a variant of the moe study"),
    (["ablate", "moe", "--seeds", "0"], "seeds: must be an integer >= 1"),
    (["ablate", "moe", "--steps", "3", "--tokens", "4096"], "--steps and --tokens: give one"),
    (["ablate", "moe", "--tokens", "100"], "--tokens 100: fewer than one step's 2048 tokens"),
    (["ablate", "moe", "--set", "num_experts=3"], "'num_experts' is not a ModelConfig field"),
])
def test_bad_arguments_name_the_problem(args, message, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path / "study")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


def test_unknown_study_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ablate", "mamba"])
    assert exc.value.code == 2 and "invalid choice: 'mamba'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="study: unknown 'mamba'; choose one of"):
        ablate.AblateConfig(study="mamba").validate()


def test_attention_variants_match_total_params_and_cache_what_table_1_says():
    base = preset("nano")
    rows = {v.name: (v, summarize(ModelConfig.from_dict({**base.to_dict(), **v.overrides})))
            for v in ablate.attention_variants(base)}
    assert list(rows) == ["mla", "mha", "gqa", "mqa"]
    totals = [s["total_params"] for _, s in rows.values()]
    assert max(totals) / min(totals) - 1 < 0.01
    layers, heads = base.num_hidden_layers, base.num_attention_heads
    assert rows["mla"][1]["kv_cache_bytes_per_token"] == (base.kv_lora_rank + base.qk_rope_head_dim) * layers * 2
    for name, kv in (("mha", heads), ("gqa", heads // 2), ("mqa", 1)):
        variant, s = rows[name]
        assert variant.overrides["num_key_value_heads"] == kv
        assert s["kv_cache_bytes_per_token"] == 2 * kv * variant.overrides["head_dim"] * layers * 2  # bf16
    with pytest.raises(ValueError, match="num_attention_heads: the attention study needs an even number >= 4"):
        ablate.attention_variants(ModelConfig.from_dict({**base.to_dict(), "num_attention_heads": 2}))


def test_cost_variants_are_dense_gqa_at_multiples_of_the_active_params():
    base = preset("nano")
    variants = ablate.cost_variants(base)
    assert [v.name for v in variants] == ["v2", *(f"dense-{m}x" for m in ablate.DENSE_MULTIPLES)]
    active = summarize(base)["active_params"]
    for m, v in zip(ablate.DENSE_MULTIPLES, variants[1:], strict=True):
        config = ModelConfig.from_dict({**base.to_dict(), **v.overrides})
        assert (config.attention, config.n_routed_experts, config.num_key_value_heads) == ("gqa", None, 2)
        assert summarize(config)["active_params"] == pytest.approx(m * active, rel=0.01)


def test_train_flops_per_token_by_hand():
    """6 FLOPs per matmul parameter a token activates plus PaLM's attention term, counted by hand: a dense GQA
    model, and DeepSeek-V2 (20.85B active, paper-facts §1) with MLA's 192-wide queries and 128-wide values."""
    d, heads, kv, head_dim, inner, layers, vocab, seq = 64, 4, 2, 16, 96, 3, 512, 256
    dense = ModelConfig.from_dict({**preset("nano").to_dict(), "hidden_size": d, "num_attention_heads": heads,
                                   "attention": "gqa", "num_key_value_heads": kv, "head_dim": head_dim,
                                   "intermediate_size": inner, "num_hidden_layers": layers, "vocab_size": vocab,
                                   "n_routed_experts": None})
    matmuls = layers * (2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * inner) + d * vocab
    assert train_flops_per_token(dense, seq) == 6 * matmuls + 6 * layers * heads * 2 * head_dim * seq
    v2 = preset("deepseek-v2")
    norms = 60 * (2 * 5120 + 1536 + 512) + 5120  # two per block, MLA's q and kv latents; the final norm
    expected = 6 * (20_851_512_320 - norms) + 6 * 60 * 128 * (192 + 128) * 4096
    assert train_flops_per_token(v2, 4096) == expected
