"""Shared fixtures: tiny hub-format configs covering the architecture's switches."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

BASE: dict[str, Any] = {
    "model_type": "deepseek_v2",
    "architectures": ["DeepseekV2ForCausalLM"],
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "routed_scaling_factor": 1.0,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "max_position_embeddings": 512,  # = factor x original, as in the real configs
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn", "factor": 8, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
    },
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "use_cache": True,
}

# Each case flips some of: q_lora_rank set/null, greedy / group-limited routing with several groups,
# first_k_dense_replace 1/2, YaRN (mscale ratio 1 and not) with sequences far past the original
# context, and no rope scaling.
CASES: dict[str, dict[str, Any]] = {
    "v2_like": dict(
        q_lora_rank=48, topk_method="group_limited_greedy", n_routed_experts=16, n_group=4, topk_group=2,
        num_experts_per_tok=3, routed_scaling_factor=2.5, first_k_dense_replace=1,
    ),
    "lite_like": dict(q_lora_rank=None, topk_method="greedy", first_k_dense_replace=1),
    "dense2_groups_yarn_ratio": dict(
        q_lora_rank=None, topk_method="group_limited_greedy", n_routed_experts=12, n_group=3, topk_group=2,
        num_experts_per_tok=2, first_k_dense_replace=2, num_hidden_layers=4,
        rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 32, "beta_fast": 24,
                      "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
    ),
    "yarn_mscale_only": dict(
        n_shared_experts=1, num_experts_per_tok=1,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 128, "mscale": 0.9},
    ),
    "no_rope_scaling": dict(
        q_lora_rank=40, rope_scaling=None, topk_method="group_limited_greedy", n_group=2, topk_group=1,
        n_shared_experts=1, first_k_dense_replace=2, num_hidden_layers=3,
    ),
}


def hub_config(case: str) -> dict[str, Any]:
    cfg = copy.deepcopy(BASE)
    cfg.update(copy.deepcopy(CASES[case]))
    return cfg


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def wait_for_checkpoint(run_dir, step: int, timeout: float = 120.0) -> None:
    """Poll until a training run folder holds a checkpoint of at least `step` (a run to be killed mid-way)."""
    import time

    from dsv2.train import checkpoint

    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = checkpoint.latest_checkpoint(run_dir)
        if latest is not None and latest.name >= f"{checkpoint.PREFIX}{step:07d}":
            return
        time.sleep(0.02)
