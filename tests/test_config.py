"""ModelConfig: exact config.json round trips, validation errors that name the field, presets."""

from __future__ import annotations

import json

import pytest
from conftest import hub_config

from dsv2 import ConfigError, ModelConfig, preset
from dsv2.config import PRESETS

# DeepSeek-V2-Lite's config.json as published (reference-spec §2), including remote-code keys we do not model.
V2_LITE_HUB = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV2Config",
        "AutoModel": "modeling_deepseek.DeepseekV2Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
    },
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


def test_hub_config_round_trip_is_exact(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V2_LITE_HUB))
    cfg = ModelConfig.from_json(tmp_path / "config.json")
    assert cfg.extra == {"auto_map": V2_LITE_HUB["auto_map"]}
    cfg.to_json(tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == V2_LITE_HUB
    # absent known keys (pad_token_id, ep_size) are not invented on the way out ...
    assert "pad_token_id" not in cfg.to_dict() and "ep_size" not in cfg.to_dict()
    # ... but a changed value is written
    assert cfg.replace(ep_size=2).to_dict()["ep_size"] == 2


def test_lite_preset_matches_hub_config():
    hub = ModelConfig.from_dict(V2_LITE_HUB)
    assert hub == preset("deepseek-v2-lite").replace(torch_dtype="bfloat16", transformers_version="4.33.1")


def test_transformers5_rope_parameters_spelling():
    d = hub_config("v2_like")
    del d["rope_theta"]
    rs = d.pop("rope_scaling")
    d["rope_parameters"] = {"rope_theta": 5000, "rope_type": "yarn", **{k: v for k, v in rs.items() if k != "type"}}
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 5000 and cfg.rope_scaling["factor"] == 8 and cfg.rope_scaling["type"] == "yarn"
    assert cfg.to_dict() == d


def test_v2_softmax_scale_and_yarn_range():
    from dsv2.model.rope import inv_frequencies

    cfg = preset("deepseek-v2")
    assert cfg.softmax_scale == pytest.approx(0.1147213868, rel=1e-9)  # 192^-0.5 × mscale², reference-spec §6
    inv = inv_frequencies(cfg)
    base = 1.0 / 10000 ** (2 * __import__("torch").arange(32) / 64)
    assert inv[:11].tolist() == pytest.approx(base[:11].tolist(), rel=1e-6)  # i <= low=10: unchanged
    assert inv[23:].tolist() == pytest.approx((base[23:] / 40).tolist(), rel=1e-6)  # i >= high=23: /40
    # in between, the blend ramps linearly: at i=16 it is 6/13 of the way to base/40 (base[16] = 10000^-1/2)
    assert inv[16].item() == pytest.approx(0.01 / 40 * 6 / 13 + 0.01 * 7 / 13, rel=1e-6)


BAD = [
    ({"n_routed_experts": 10, "topk_method": "group_limited_greedy", "n_group": 4}, "n_routed_experts",
     "not divisible by n_group"),
    ({"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 3}, "topk_group", "exceeds n_group"),
    ({"topk_method": "best"}, "topk_method", "unknown value 'best'"),
    ({"scoring_func": "sigmoid"}, "scoring_func", "unknown value 'sigmoid'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope_scaling.type", "unsupported value 'dynamic'"),
    ({"rope_scaling": {"type": "yarn"}}, "rope_scaling.factor", "positive number"),
    ({"hidden_size": 0}, "hidden_size", "positive integer"),
    ({"kv_lora_rank": -4}, "kv_lora_rank", "positive integer"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim", "must be even"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok", r"\[1, n_routed_experts=8\]"),
    ({"q_lora_rank": "big"}, "q_lora_rank", "null or a non-negative integer"),
    ({"hidden_act": "gelu"}, "hidden_act", "only 'silu'"),
    ({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 1, "num_experts_per_tok": 3},
     "num_experts_per_tok", "exceeds the 2 experts"),
]


@pytest.mark.parametrize(("change", "field", "message"), BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_validation_names_the_field(change, field, message):
    with pytest.raises(ConfigError, match=rf"`{field}`: .*{message}"):
        ModelConfig.from_dict({**hub_config("lite_like"), **change})


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelConfig.from_json(tmp_path / "config.json")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_valid_and_serialisable(name):
    cfg = preset(name)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_gready_alias():
    assert ModelConfig.from_dict({**hub_config("lite_like"), "topk_method": "gready"}).routing_method == "greedy"
