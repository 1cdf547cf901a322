"""Checkpoint load/save: round trips, sharding, the transformers-5 fused layout, and every bad-input error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hub_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv2
from dsv2.weights import INDEX_FILE, SINGLE_FILE, CheckpointError


@pytest.fixture
def model():
    return dsv2.random_model(dsv2.ModelConfig.from_dict(hub_config("v2_like")), seed=0)


@pytest.fixture
def saved(model, tmp_path):
    dsv2.save_model(model, tmp_path)
    return tmp_path


def tokens(model):
    return torch.randint(0, model.config.vocab_size, (1, 50), generator=torch.Generator().manual_seed(0))


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k].to(sa[k].dtype), rtol=0, atol=0, msg=k)


def test_round_trip_uses_original_hub_names(model, saved):
    with safe_open(saved / SINGLE_FILE, framework="pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.15.gate_proj.weight" in names
    assert "model.layers.0.mlp.down_proj.weight" in names
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in names
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert_same_weights(model, dsv2.load_model(saved, progress=False))


def test_sharded_round_trip_and_bf16(model, tmp_path):
    dsv2.save_model(model, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / SINGLE_FILE).exists()
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    loaded = dsv2.load_model(tmp_path, progress=False)
    assert_same_weights(model, loaded)
    bf16 = dsv2.load_model(tmp_path, dtype=torch.bfloat16, progress=False)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    # saving again unsharded into the same folder removes the old shards and index
    dsv2.save_model(loaded, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [SINGLE_FILE]
    assert not (tmp_path / INDEX_FILE).exists()


def test_bf16_save_records_dtype(model, tmp_path):
    dsv2.save_model(model.to(torch.bfloat16), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(tmp_path / SINGLE_FILE, framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16


def test_fused_transformers5_expert_layout(model, saved):
    """transformers 5 state dicts stack experts: gate_up_proj [E, 2I, d] and down_proj [E, d, I]."""
    tensors = load_file(saved / SINGLE_FILE)
    for layer in (1, 2):
        p = f"model.layers.{layer}.mlp.experts"
        E = model.config.n_routed_experts
        gate = torch.stack([tensors.pop(f"{p}.{e}.gate_proj.weight") for e in range(E)])
        up = torch.stack([tensors.pop(f"{p}.{e}.up_proj.weight") for e in range(E)])
        tensors[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        tensors[f"{p}.down_proj"] = torch.stack([tensors.pop(f"{p}.{e}.down_proj.weight") for e in range(E)])
    save_file(tensors, saved / SINGLE_FILE)
    assert_same_weights(model, dsv2.load_model(saved, progress=False))


# ------------------------------------------------------------------------------------------ bad input
def rewrite(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor(saved):
    rewrite(saved / SINGLE_FILE, lambda t: t.pop("model.layers.2.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.2\.self_attn\.kv_b_proj\.weight"):
        dsv2.load_model(saved)


def test_unexpected_tensor(saved):
    rewrite(saved / SINGLE_FILE, lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor model\.layers\.9\.extra"):
        dsv2.load_model(saved)


def test_wrong_shape(saved):
    rewrite(saved / SINGLE_FILE, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.norm\.weight has shape \[65\]"):
        dsv2.load_model(saved)


def test_config_does_not_match_weights(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["kv_lora_rank"] = 40
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config does not match the weights"):
        dsv2.load_model(saved)


def test_truncated_file(saved):
    data = (saved / SINGLE_FILE).read_bytes()
    (saved / SINGLE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        dsv2.load_model(saved)


def test_corrupt_header(saved):
    data = bytearray((saved / SINGLE_FILE).read_bytes())
    data[8:40] = b"\xff" * 32
    (saved / SINGLE_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        dsv2.load_model(saved)


def test_index_points_at_missing_shard(model, tmp_path):
    dsv2.save_model(model, tmp_path, max_shard_bytes=100_000)
    second = sorted(tmp_path.glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json: tensor .* is in shard {second.name}, which does not"):
        dsv2.load_model(tmp_path)


def test_index_lists_tensor_not_in_shard(model, tmp_path):
    dsv2.save_model(model, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    wrong = next(s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"]["lm_head.weight"])
    index["weight_map"]["lm_head.weight"] = wrong
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{wrong}: the index lists tensor lm_head\.weight in this file"):
        dsv2.load_model(tmp_path)


def test_pickles_are_refused(saved):
    (saved / SINGLE_FILE).rename(saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        dsv2.load_model(saved)


def test_bad_config_in_checkpoint(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["topk_group"] = 9
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: config field `topk_group`: 9 exceeds n_group=4"):
        dsv2.load_model(saved)


def test_unknown_name(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a preset"):
        dsv2.load_model(tmp_path / "nope")
