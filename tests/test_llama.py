"""The dense DeepSeek-LLM baseline: LlamaForCausalLM checkpoints in both directions against transformers (logits,
and cached decoding through the engine), the presets, and `dsv2 info`'s KV-cache comparison with DeepSeek-V2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import randomize_, require

import dsv2
from dsv2.cli import main
from dsv2.config import ModelConfig, preset, yarn_v2
from dsv2.tokenizer import Tokenizer

# the keys of DeepSeek LLM's released config.json (LlamaForCausalLM, written by transformers 4.33)
DEEPSEEK_LLM_67B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 100000, "eos_token_id": 100001, "hidden_act": "silu",
    "hidden_size": 8192, "initializer_range": 0.02, "intermediate_size": 22016, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 64, "num_hidden_layers": 95, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
    "vocab_size": 102400,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_deepseek_llm_config_round_trips_and_is_the_preset():
    config = ModelConfig.from_dict(DEEPSEEK_LLM_67B)
    assert config.to_dict() == DEEPSEEK_LLM_67B
    assert (config.attention, config.num_key_value_heads, config.attention_head_dim) == ("gqa", 8, 128)
    assert config.replace(transformers_version=None) == preset("deepseek-llm-67b")
    written = preset("deepseek-llm-67b").to_dict()  # a llama config writes Llama's keys only
    assert {"attention", "kv_lora_rank", "n_routed_experts", "q_lora_rank"}.isdisjoint(written)
    assert ModelConfig.from_dict(written) == preset("deepseek-llm-67b")


def test_a_llama_config_is_dense_and_names_the_field():
    with pytest.raises(dsv2.ConfigError, match="`n_routed_experts`"):
        ModelConfig.from_dict({**DEEPSEEK_LLM_67B, "n_routed_experts": 8, "num_experts_per_tok": 2})
    with pytest.raises(dsv2.ConfigError, match="`mlp_bias`"):
        ModelConfig.from_dict({**DEEPSEEK_LLM_67B, "mlp_bias": True})
    assert ModelConfig.from_dict({**DEEPSEEK_LLM_67B, "num_key_value_heads": 64}).attention == "mha"
    assert ModelConfig.from_dict({**DEEPSEEK_LLM_67B, "num_key_value_heads": 1}).attention == "mqa"


def hf_llama(path):
    transformers = require("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize(("kv_heads", "rope_scaling"), [(2, None), (2, yarn_v2(4.0, 128)), (4, None), (1, None)])
@torch.no_grad()
def test_dsv2_saved_llama_loads_in_transformers_with_equal_logits(tmp_path, kv_heads, rope_scaling):
    """llm-nano (4 heads) as GQA, MHA and MQA, with plain RoPE and with V2's YaRN settings past the original
    length (transformers' Llama: YaRN's factor on cos/sin, none on the softmax scale)."""
    config = preset("llm-nano").replace(num_key_value_heads=kv_heads, rope_scaling=rope_scaling,
                                        max_position_embeddings=512 if rope_scaling else 2048)  # = factor x original
    model = dsv2.random_model(config)
    randomize_(model)
    dsv2.save_model(model, tmp_path, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    x = torch.randint(0, config.vocab_size, (2, 300))
    assert rel_err(model(x), hf_llama(tmp_path)(x).logits) <= 1e-5


@torch.no_grad()
def test_transformers_saved_llama_loads_in_dsv2_with_equal_logits_and_decodes_alike(tmp_path):
    transformers = require("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    theirs = transformers.LlamaForCausalLM(hf_config)
    randomize_(theirs)
    theirs.save_pretrained(tmp_path)
    theirs = hf_llama(tmp_path)
    ours = dsv2.load_model(tmp_path, progress=False)
    assert ours.config.to_dict() == json.loads((tmp_path / "config.json").read_text())  # exact round trip
    x = torch.randint(0, 300, (2, 120))
    assert rel_err(ours(x), theirs(x).logits) <= 1e-5
    # cached decoding through the engine (paged cache, batched) = transformers' own generate
    llm = dsv2.LLM(ours, max_batch_size=2, tokenizer=Tokenizer.byte_level(ours.config))
    prompts = [[5, 17, 99], list(range(30, 71)), [200]]
    params = dsv2.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params), strict=True):
        ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref


# ------------------------------------------------------------------------------------------------- info
def info_json(*args: str, capsys) -> dict:
    assert main(["info", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_deepseek_llm_67b_and_the_reduction_against_v2(capsys):
    s = info_json("deepseek-llm-67b", capsys=capsys)
    assert s["total_params"] == 67_425_001_472 and s["moe_layers"] == 0  # ≈ 67.4B
    assert s["kv_cache_elements_per_token"] == 2 * 8 * 128 * 95 == 194_560
    assert s["kv_cache_bytes_per_token"] == 389_120  # bf16
    v = info_json("deepseek-v2", "--compare", "deepseek-llm-67b", "--kv-cache-dtype", "6bit", capsys=capsys)["compare"]
    assert v["elements"] == [34_560, 194_560] and round(v["elements_reduction"], 3) == 0.822
    assert v["six_bit_bytes"] == [25_920, 389_120] and round(v["six_bit_reduction"], 3) == 0.933
    assert v["kv_cache_dtype_bytes"] == [25_800, 389_120]  # dsv2's 6bit layout: 430 B per layer
    out = subprocess.run([sys.executable, "-m", "dsv2.cli", "info", "deepseek-v2", "--compare", "deepseek-llm-67b"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "34,560 vs 194,560: 82.2% less" in out.stdout and "25,920 vs 389,120: 93.3% less" in out.stdout


def test_small_dense_presets_match_the_moe_presets_active_parameters(capsys):
    for dense, moe in [("llm-nano", "nano"), ("llm-small", "small")]:
        d, m = info_json(dense, capsys=capsys), info_json(moe, capsys=capsys)
        assert abs(d["active_params"] / m["active_params"] - 1) < 0.03 and d["moe_layers"] == 0


def test_init_then_generate_a_llama_folder(tmp_path):
    folder = tmp_path / "llm-nano"
    run = lambda *a: subprocess.run([sys.executable, "-m", "dsv2.cli", *a], capture_output=True, text=True)  # noqa: E731
    assert run("init", "llm-nano", str(folder), "--dtype", "float32").returncode == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    out = run("generate", str(folder), "--prompt", "def f():", "--max-tokens", "5", "--temperature", "0", "-v")
    assert out.returncode == 0 and ", 5 generated, " in out.stderr, out.stderr


def test_serve_a_llama_model_with_prefix_caching():
    """The server over a dense GQA model's paged cache: a completion = the engine's greedy tokens, twice (the
    second from the cached prefix)."""
    require("fastapi")
    from fastapi.testclient import TestClient

    from dsv2.infer.engine import LLMEngine
    from dsv2.serve.api import create_app

    model = dsv2.random_model(preset("llm-nano"), seed=0)
    tokenizer = Tokenizer.byte_level(model.config)
    engine = LLMEngine(model, tokenizer, num_blocks=64, block_size=8)
    prompt = "def fibonacci(n): return n if n < 2 else fibonacci(n - 1)"
    params = dsv2.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = dsv2.LLM(model, tokenizer=tokenizer).generate(prompt, params)[0].text
    body = {"model": "llm-nano", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(engine, "llm-nano")) as client:
        texts = [client.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(2)]
    assert texts == [expected, expected]
    assert engine.stats().totals["prefix_hit_tokens"] > 0
