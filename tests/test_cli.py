"""`dsv2 info`: the paper's parameter counts and KV-cache sizes, instantly, from the meta device."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dsv2.cli import main, parse_args


def info_json(name, capsys) -> dict:
    assert main(["info", name, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_deepseek_v2(capsys):
    s = info_json("deepseek-v2", capsys)
    assert s["total_params"] == 235_741_434_880
    assert s["active_params"] / 1e9 == pytest.approx(20.85, abs=0.005)
    assert s["kv_cache_bytes_per_token"] == 69_120  # (512 + 64) × 60 layers × 2 bytes
    assert s["mha_kv_cache_bytes_per_token"] == 2 * 128 * 128 * 60 * 2
    assert sum(s["params_by_part"].values()) == s["total_params"]


def test_info_deepseek_v2_lite(capsys):
    s = info_json("deepseek-v2-lite", capsys)
    assert s["total_params"] == 15_706_484_224
    assert s["active_params"] / 1e9 == pytest.approx(2.45, abs=0.005)
    assert s["kv_cache_bytes_per_token"] == 576 * 27 * 2


def test_info_small_preset_size(capsys):
    # the sizes README.md quotes: small ≈ 278M, nano ≈ 1.4M
    assert info_json("small", capsys)["total_params"] == 277_601_280
    assert info_json("nano", capsys)["total_params"] == 1_372_928


def test_info_reads_checkpoint_folder(tmp_path, capsys):
    import dsv2

    dsv2.save_model(dsv2.load_model("nano", seed=0), tmp_path)
    assert info_json(str(tmp_path), capsys)["total_params"] == info_json("nano", capsys)["total_params"]


def test_info_text_and_errors():
    out = subprocess.run([sys.executable, "-m", "dsv2.cli", "info", "deepseek-v2"], capture_output=True, text=True)
    assert out.returncode == 0 and "235,741,434,880" in out.stdout and "69,120 bytes" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "dsv2.cli", "info", "no-such-model"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a preset" in bad.stderr


def test_init_then_generate_on_a_folder(tmp_path):
    folder = tmp_path / "nano"
    run = lambda *a: subprocess.run([sys.executable, "-m", "dsv2.cli", *a], capture_output=True, text=True)  # noqa: E731
    assert run("init", "nano", str(folder), "--dtype", "float32").returncode == 0
    assert all((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "config.json"))
    greedy = ("--prompt", "def f():", "--max-tokens", "5", "--temperature", "0")
    out = run("generate", str(folder), *greedy, "-v")
    assert out.returncode == 0, out.stderr
    assert "[9 prompt tokens at " in out.stderr and ", 5 generated, " in out.stderr  # BOS + 8 bytes; max_tokens
    # the other spelling of the model names the same one: the same greedy text
    assert run("generate", "--model", str(folder), *greedy).stdout == out.stdout
    bad = run("generate", str(folder), "--prompt", "x", "--top-p", "0")
    assert bad.returncode == 2 and "`top_p`" in bad.stderr
    chat = subprocess.run([sys.executable, "-m", "dsv2.cli", "chat", str(folder), "--max-tokens", "3"],
                          input="hello\n/exit\n", capture_output=True, text=True)
    assert chat.returncode == 0 and "assistant>" in chat.stdout


# ------------------------------------------------------------------------ one way to name a model
# (command, the arguments it needs besides the model, its default when no model is given; None = required)
MODEL_COMMANDS = [
    ("info", [], None), ("init", ["out"], None), ("generate", [], None), ("chat", [], None),
    ("serve", [], "nano"), ("train", [], None), ("data", [], "nano"), ("eval", [], None),
]


@pytest.mark.parametrize(("command", "rest", "default"), MODEL_COMMANDS, ids=[c[0] for c in MODEL_COMMANDS])
def test_model_is_positional_or_option(command, rest, default, capsys):
    assert parse_args([command, "small", *rest]).model == "small"
    assert parse_args([command, "--model", "small", *rest]).model == "small"
    assert parse_args([command, "--model", "small", "small", *rest]).model == "small"  # the same twice is fine
    with pytest.raises(SystemExit) as e:
        parse_args([command, "small", *rest, "--model", "nano"])
    assert e.value.code == 2
    assert f"dsv2 {command}: error: MODEL 'small' and --model 'nano' disagree" in capsys.readouterr().err
    if command == "train":  # no model: TrainConfig's default (nano), which the parser leaves to it
        assert parse_args([command, *rest]).model is None
    elif default is not None:
        assert parse_args([command, *rest]).model == default
    else:
        with pytest.raises(SystemExit):
            parse_args([command, *rest])
        assert f"dsv2 {command}: error: the following arguments are required: MODEL" in capsys.readouterr().err


def test_model_keeps_the_other_options():
    args = parse_args(["train", "small", "--steps", "7", "--out", "runs/x"])
    assert (args.model, args.steps, args.out) == ("small", 7, "runs/x")
    assert parse_args(["plot", "runs/x"]).run == "runs/x"  # a run folder, not a model: no --model
    with pytest.raises(SystemExit):
        parse_args(["init", "--model", "no-such-preset", "out"])  # init's preset keeps its choices
