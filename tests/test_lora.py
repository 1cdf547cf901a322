"""LoRA adapters (dsv2.align.lora): frozen base, exact merge, gradients only to the factors, save/load, and parity
with PEFT loading our adapter onto transformers' DeepseekV2ForCausalLM."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import hf_model_from, hub_config, random_model, require
from safetensors.torch import load_file, save_file

import dsv2
from dsv2.align.lora import CONFIG_FILE, GROUPS, WEIGHTS_FILE, Lora, LoraConfig, LoraError, LowRank

ALL_GROUPS = ("attention", "shared_experts", "routed_experts", "mlp")


def randomize_factors_(lora: Lora, model: dsv2.Transformer, std: float = 0.05) -> None:
    """Nonzero B (and a fresh A), so the adapter changes the model."""
    with torch.no_grad():
        for p in lora.parameters(model):
            p.normal_(0.0, std)


def factor(module: torch.nn.Module, name: str) -> LowRank:
    return module.parametrizations[name][0]


def tokens(n: int = 24) -> torch.Tensor:
    return torch.randint(0, hub_config("v2_like")["vocab_size"], (2, n), generator=torch.Generator().manual_seed(1))


def adapted(case: str = "v2_like", targets: tuple[str, ...] = ALL_GROUPS, rank: int = 4):
    """(base model, a copy of it with LoRA applied and random factors, the Lora)."""
    base = random_model(case)
    model = copy.deepcopy(base)
    lora = Lora(LoraConfig(rank=rank, alpha=2.0 * rank + 1, targets=targets))
    lora.apply(model)
    randomize_factors_(lora, model)
    return base, model, lora


def test_apply_freezes_base_and_starts_equal():
    base = random_model("v2_like")
    x = tokens()
    with torch.no_grad():
        expected = base(x)
    lora = Lora(LoraConfig(rank=4, targets=ALL_GROUPS))
    lora.apply(base)
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable == set(lora.named_parameters(base))
    assert all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # v2_like: layer 0 dense (wq_a, wq_b, wkv_a, wkv_b, wo + w1..w3), layers 1-2 MoE (5 attention + 3 shared
    # Linears, and the experts' 3 B with gate/up sharing one A, so 2 A): 2 factors per Linear
    assert len(trainable) == 2 * (5 + 3) + 2 * (2 * (5 + 3) + 3 + 2)
    assert all(torch.count_nonzero(p) == 0 for n, p in lora.named_parameters(base).items() if n.endswith("lora_B"))
    with torch.no_grad():
        assert torch.equal(base(x), expected)  # B = 0: exactly the base model
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply(base)


def test_merged_weights_are_base_plus_scaled_BA():
    base, model, lora = adapted()
    merged = lora.merged(model)
    weights, s = dict(merged.named_parameters()), lora.config.scaling
    original = dict(base.named_parameters())
    block = model.layers[1]
    for name, module in [("layers.0.attn.wq_a", model.layers[0].attn.wq_a), ("layers.0.ffn.w2", model.layers[0].ffn.w2),
                         ("layers.1.attn.wkv_b", block.attn.wkv_b), ("layers.1.ffn.shared_experts.w3",
                                                                     block.ffn.shared_experts.w3)]:
        lr = factor(module, "weight")
        assert lr.lora_A.shape == (4, module.in_features) and lr.lora_B.shape == (module.out_features, 4)
        torch.testing.assert_close(weights[f"{name}.weight"], original[f"{name}.weight"] + s * lr.lora_B @ lr.lora_A,
                                   rtol=1e-6, atol=1e-7)
    experts = block.ffn.experts
    gate, up, down = factor(experts, "w1"), factor(experts, "w3"), factor(experts, "w2")
    assert gate.lora_A is up.lora_A and gate.lora_B is not up.lora_B  # gate and up share A
    for e in range(experts.parametrizations.w1.original.shape[0]):
        for w, lr in [("w1", gate), ("w3", up), ("w2", down)]:
            name = f"layers.1.ffn.experts.{w}"
            torch.testing.assert_close(weights[name][e], original[name][e] + s * lr.lora_B[e] @ lr.lora_A[e],
                                       rtol=1e-6, atol=1e-7)


def test_merged_is_a_plain_model_with_the_adapted_logits():
    _, model, lora = adapted()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = lora.merged(model)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=1e-6, atol=1e-6)
    assert type(merged) is dsv2.Transformer and not any(hasattr(m, "parametrizations") for m in merged.modules())
    assert list(merged.state_dict()) == list(random_model("v2_like").state_dict())
    assert all(p.requires_grad for p in merged.parameters())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert lora.parameters(model)  # still adapted


def test_backward_reaches_only_the_factors():
    _, model, lora = adapted("lite_like")
    logits = model(tokens())
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens().flatten()).backward()
    factors = {id(p) for p in lora.parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in factors:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name


def test_save_load_round_trip(tmp_path):
    base, model, lora = adapted()
    lora.save(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files
    restored = random_model("v2_like")
    restored.load_state_dict(base.state_dict())
    lora.apply(restored)  # fresh random A, B = 0
    lora.load(restored, tmp_path / "adapter")
    saved, loaded = lora.named_parameters(model), lora.named_parameters(restored)
    assert list(saved) == list(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))


def test_load_errors_name_the_file_and_tensor(tmp_path):
    _, model, lora = adapted("lite_like")
    folder = tmp_path / "adapter"
    lora.save(model, folder)
    with pytest.raises(LoraError, match=re.escape(f"{tmp_path / 'nowhere' / CONFIG_FILE}: no such file")):
        lora.load(model, tmp_path / "nowhere")
    with pytest.raises(LoraError, match=re.escape(f"{folder / CONFIG_FILE}: rank r=4, but this Lora has rank 2")):
        Lora(LoraConfig(rank=2, targets=ALL_GROUPS)).load(model, folder)
    wrong_alpha = f"{folder / CONFIG_FILE}: lora_alpha=9.0, but this Lora has alpha 8"
    with pytest.raises(LoraError, match=re.escape(wrong_alpha)):
        Lora(LoraConfig(rank=4, alpha=8, targets=ALL_GROUPS)).load(model, folder)
    tensors = load_file(folder / WEIGHTS_FILE)
    key = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, folder / WEIGHTS_FILE)
    with pytest.raises(LoraError, match=re.escape(f"{folder / WEIGHTS_FILE}: missing tensor {key}")):
        lora.load(model, folder)
    save_file({**tensors, key: tensors[key][:-1]}, folder / WEIGHTS_FILE)
    with pytest.raises(LoraError, match=re.escape(f"tensor {key} has shape [63, 32], expected [64, 32]")):
        lora.load(model, folder)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(LoraError, match=re.escape(f"{folder / WEIGHTS_FILE}: no such file")):
        lora.load(model, folder)


def test_config_validation_and_targets():
    for bad, field in [(dict(rank=0), "rank"), (dict(rank=2.0), "rank"), (dict(alpha=0.0), "alpha"),
                       (dict(targets=()), "targets"), (dict(targets="attention"), "targets")]:
        with pytest.raises(ValueError, match=f"LoraConfig.{field}"):
            LoraConfig(**bad).validate()
    with pytest.raises(ValueError, match="unknown group.*'experts'.*valid: " + ", ".join(GROUPS)):
        Lora(LoraConfig(targets=("attention", "experts")))
    dense = dsv2.random_model(dsv2.ModelConfig.from_dict({**hub_config("lite_like"), "first_k_dense_replace": 3}))
    lora = Lora(LoraConfig(rank=2))  # default targets: no shared or routed experts in a dense model, skipped
    lora.apply(dense)
    assert {n.split(".")[3] for n in lora.named_parameters(dense)} == {"wq", "wkv_a", "wkv_b", "wo"}
    with pytest.raises(ValueError, match="select no weight"):
        Lora(LoraConfig(targets=("routed_experts",))).apply(dsv2.random_model(dense.config))


@pytest.mark.parametrize(("case", "targets"), [("v2_like", ALL_GROUPS), ("lite_like", LoraConfig().targets)])
def test_peft_loads_our_adapter(case, targets, tmp_path):
    """Our checkpoint + our adapter -> transformers + PEFT: the same logits; and PEFT's own save of it loads back
    into our factors exactly."""
    peft = require("peft")
    base, model, lora = adapted(case, targets)
    dsv2.save_model(base, tmp_path / "base", progress=False)
    lora.save(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    theirs = peft.PeftModel.from_pretrained(hf_model_from(tmp_path / "base"), tmp_path / "adapter").eval()
    x = tokens(40)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x), rtol=0, atol=1e-4)
    theirs.save_pretrained(tmp_path / "resaved")
    restored = random_model(case)
    lora.apply(restored)
    lora.load(restored, tmp_path / "resaved")
    ours, back = lora.named_parameters(model), lora.named_parameters(restored)
    assert all(torch.equal(ours[k], back[k]) for k in ours)
