"""Shared fixtures and helpers: tiny hub-format configs covering the architecture's switches, random models,
and `require` for the reference libraries."""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import dsv2

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before 3.11
    import tomli as tomllib

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


def randomize_(model: torch.nn.Module, std: float = 0.1) -> None:
    """Weights large enough that attention is far from uniform, and norm weights that are not all ones."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)


def random_model(case: str = "v2_like", dtype: torch.dtype = torch.float32) -> dsv2.Transformer:
    """A model of one of the CASES with `randomize_`d weights (attention and routing far from uniform), in eval mode."""
    model = dsv2.random_model(dsv2.ModelConfig.from_dict(hub_config(case)), dtype=dtype)
    randomize_(model)
    return model.eval()


def drain(engine, prompts: list[list[int]], params) -> list[list[int]]:
    """Add every prompt to an LLMEngine as a request, step until all finish -> their output token ids."""
    requests = [engine.make_request(p, params) for p in prompts]
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        engine.step()
    return [r.out.token_ids for r in requests]


def hf_model_from(path, dtype: torch.dtype = torch.float32):
    """transformers' DeepseekV2ForCausalLM loaded from a checkpoint folder, the way the parity tests compare against
    it: eager attention, eval mode."""
    transformers = require("transformers")
    model = transformers.DeepseekV2ForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype)
    return model.eval()


# mixed lengths (3, 41, 1 and 12 tokens), for engines with fewer slots than prompts
PROMPTS = [[5, 17, 99], list(range(30, 71)), [200], list(range(100, 112))]


def _dev_extra() -> dict[str, Requirement]:
    """pyproject.toml's `dev` extra by distribution name: the reference libraries and the releases pinned for them."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    requirements = (Requirement(r) for r in pyproject["project"]["optional-dependencies"]["dev"])
    return {canonicalize_name(r.name): r for r in requirements}


def require(module: str) -> ModuleType:
    """Import a library the tests check against (transformers, the openai client, uvicorn), at a release inside the
    range pyproject.toml's dev extra gives it.

    Missing or outside that range, the tests that need it are skipped on a developer's machine but fail under CI
    (the CI environment variable set): there a skip would report a reference check as passed that never ran."""
    try:
        lib = importlib.import_module(module)
    except ImportError as e:
        problem = f"{module} is not installed ({e}); install the dev extra: pip install -e '.[dev]'"
    else:
        pinned = _dev_extra()[canonicalize_name(module)]  # every library required here is pinned there
        installed = Version(importlib.metadata.version(module))
        if pinned.specifier.contains(installed, prereleases=True):
            return lib
        problem = f"{module} {installed} is outside the dev extra's {pinned}, the releases the tests were run against"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI: {problem}", pytrace=False)
    pytest.skip(problem, allow_module_level=True)
