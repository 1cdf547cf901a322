"""Weight-only int8 / int4 (dsv2.model.quant): the modules against dequantized F.linear and the fp32 original,
the quantized experts' grouped path, whole models, the engine, and the checkpoint round trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS, random_model
from safetensors.torch import load_file, save_file

from dsv2.infer.engine import LLMEngine
from dsv2.infer.generate import generate
from dsv2.infer.sampling import SamplingParams
from dsv2.model import cpu_kernels, quant
from dsv2.model.quant import Int4Linear, Int8Linear, QuantizedRoutedExperts
from dsv2.weights import CheckpointError


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def weight_like_a_layer(n: int, k: int) -> torch.Tensor:
    return torch.randn(n, k) * 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, quant.INT8_KERNEL_MAX_ROWS + 3])  # the kernel, and dequantize + F.linear
def test_int8_linear(dtype, rows):
    w = weight_like_a_layer(96, 256)
    x = torch.randn(rows, 256)
    layer = Int8Linear.quantize(w.to(dtype))
    assert layer.weight.dtype == torch.int8 and layer.scale.shape == (96,)
    assert layer.weight.abs().amax(dim=1).eq(127).all()  # s = amax / 127: every row uses the full range
    y = layer(x.to(dtype).view(1, rows, 256))
    assert y.shape == (1, rows, 96) and y.dtype == dtype
    exact = F.linear(x.to(dtype).float(), layer.dequantized().float())
    # fp32: 4e-7 measured; bf16 (and fp32's kernel rows on x86, run in bf16: the module docstring): the output's
    # rounding (2^-9) and bf16 partial sums, 3e-3 measured
    in_bf16 = dtype == torch.bfloat16 or (quant.X86 and rows <= quant.INT8_KERNEL_MAX_ROWS)
    assert rel_err(y[0], exact) <= (1e-2 if in_bf16 else 1e-5)
    assert rel_err(y[0], F.linear(x, w)) <= 1.5e-2  # against the fp32 original: 7e-3 fp32, 8e-3 bf16 measured


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_linear_quantizes_each_row_on_its_own(dtype):
    torch.manual_seed(0)
    w = weight_like_a_layer(96, 256)
    x = torch.randn(7, 256) * torch.logspace(-2, 2, 7)[:, None]  # rows far apart in scale
    layer = Int8Linear.quantize(w.to(dtype))
    layer.int8_activations = True
    y = layer(x.to(dtype))
    exact = F.linear(x.to(dtype).float(), layer.dequantized().float())
    # the activations' 8-bit rounding: 6e-3 measured on normal rows, whatever the row's scale; twice the step where
    # fbgemm runs it with 7-bit activations (no dsv2 kernel loaded, a CPU without VNNI)
    seven_bits = not cpu_kernels.takes_linear_int8(x) and quant._needs_reduce_range()
    for row, ref in zip(y, exact, strict=True):
        assert rel_err(row, ref) <= (3e-2 if seven_bits else 1.5e-2)
    # the anchor row fixes the grid: a row's result does not depend on the other rows of the batch
    assert torch.equal(torch.cat([layer(x[i : i + 1].to(dtype)) for i in range(7)]), y)
    assert torch.equal(layer(torch.zeros(2, 256, dtype=dtype)), torch.zeros(2, 96, dtype=dtype))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_linear(group_size):
    w = weight_like_a_layer(48, 256)
    x = torch.randn(3, 256)
    layer = Int4Linear.quantize(w, group_size)
    q, scale, zero = quant.quantize_int4(w, group_size, torch.float32)
    assert torch.equal(layer.nibbles(), q)  # the learnt CPU layout undoes the packing exactly
    assert q.max() <= 15 and zero.max() <= 15 and scale.shape == (48, 256 // group_size)
    # W ≈ (q - z)·s per group, which is what the kernel's (q - 8)·s + (8 - z)·s computes
    s, z = scale.repeat_interleave(group_size, 1), zero.float().repeat_interleave(group_size, 1)
    spelled = (q.float() - z) * s
    # with its scales in bf16 (x86, `Int4Linear.bf16_scales_and_zeros`) W is off by their rounding, 2^-9 of |s·q|
    off = 1e-7 if layer.bf16_scales_and_zeros is None else 2**-8 * spelled.abs().max().item()
    torch.testing.assert_close(layer.dequantized(), spelled, rtol=0, atol=off)
    y = layer(x)
    if layer.bf16_scales_and_zeros is None:
        assert rel_err(y, F.linear(x, layer.dequantized())) <= 1e-5  # 5e-7 measured
    else:  # x86: torch's kernel runs in bf16 (the module docstring), x rounded to bf16 and y too
        assert quant.X86 and y.dtype == torch.float32
        assert rel_err(y, F.linear(x.bfloat16().float(), layer.dequantized())) <= 4e-3
    # against the fp32 original (random normal weights: the worst case for 16 levels): 0.08-0.11 measured
    assert rel_err(y, F.linear(x, w)) <= {32: 0.11, 64: 0.13, 128: 0.15}[group_size]
    layer_bf16 = Int4Linear.quantize(w.bfloat16(), group_size)
    y_bf16 = layer_bf16(x.bfloat16())
    assert y_bf16.dtype == torch.bfloat16
    assert rel_err(y_bf16, F.linear(x.bfloat16().float(), layer_bf16.dequantized().float())) <= 1e-2
    assert rel_err(y_bf16, F.linear(x, w)) <= {32: 0.11, 64: 0.13, 128: 0.15}[group_size]


def test_int4_shapes_that_do_not_fit_stay_in_the_model_dtype():
    assert Int4Linear.fits(48, 256, 128) and not Int4Linear.fits(40, 256, 32) and not Int4Linear.fits(48, 96, 64)
    with pytest.raises(ValueError, match="group_size=64"):
        Int4Linear(96, 48, group_size=64)
    model = quant.quantize_model(random_model("v2_like"), "int4", group_size=32)
    attn = model.layers[0].attn
    assert isinstance(attn.wkv_a, torch.nn.Linear)  # N = 32 + 8 = 40: not a multiple of 16
    assert isinstance(attn.wq_b, torch.nn.Linear)  # K = q_lora_rank 48: not a multiple of 32
    assert isinstance(attn.wq_a, Int4Linear) and isinstance(model.head, Int4Linear)
    kept = model.config.quantization_config["modules_not_converted"]
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa" in kept and "model.layers.0.self_attn.q_b_proj" in kept
    assert {"model.embed_tokens", "model.layers.1.mlp.gate", "model.layers.1.self_attn.kv_b_proj"} <= set(kept)


def dequantized_twin(original: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """A copy of the float model whose weight matrices are the quantized model's dequantized ones."""
    twin = copy.deepcopy(original)
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, quant.QUANTIZED):
                m = quant._EXPERT.match(name)
                target = params[f"{m[1]}.{m[2]}"][int(m[3])] if m else params[f"{name}.weight"]
                target.copy_(module.dequantized())
    return twin


@pytest.fixture()
def fp32_kernels(monkeypatch):
    """torch's int8 and int4 kernels in fp32 on x86 too, where `Int8Linear` and `Int4Linear` otherwise run an fp32
    model's products in bf16 (x rounded: `test_int8_linear`, `test_int4_linear`), so a whole model equals its
    dequantized twin up to the sums' order."""
    monkeypatch.setattr(quant, "X86", False)


@pytest.mark.parametrize("method", ["int8", "int4"])
@torch.no_grad()
def test_quantized_experts_grouped_path_equals_a_loop_on_dequantized_weights(fp32_kernels, method):
    original = random_model("v2_like")
    model = quant.quantize_model(copy.deepcopy(original), method, group_size=32)
    experts = model.layers[1].ffn.experts
    assert isinstance(experts, QuantizedRoutedExperts) and experts.n_experts == 16
    twin = dequantized_twin(original, model).layers[1].ffn.experts
    x = torch.randn(40, 64)
    weights = torch.rand(40, 3)
    indices = torch.randint(0, 16, (40, 3))
    indices[5, 1] = -1  # a dropped slot: computed by no expert
    grouped = experts(x, weights, indices)
    assert rel_err(grouped, experts.loop_experts(x, weights, indices)) <= 1e-6
    assert rel_err(grouped, twin.loop_experts(x, weights, indices)) <= 1e-5  # 2e-7 measured


@torch.no_grad()
def test_int4_takes_a_smaller_group_where_k_is_not_a_multiple(tmp_path):
    assert quant.int4_group_size((2048, 10944), 128) == 64  # V2-Lite's dense down_proj: 10944 = 171 * 64
    assert quant.int4_group_size((48, 96), 128) == 32 and quant.int4_group_size((48, 96), 32) == 32
    assert quant.int4_group_size((48, 80), 128) is None and quant.int4_group_size((40, 256), 128) is None
    model = quant.quantize_model(random_model("lite_like"), "int4", group_size=128)
    groups = {name: m.group_size for name, m in model.named_modules() if isinstance(m, Int4Linear)}
    shapes = {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert groups == {name: quant.int4_group_size(shapes[name], 128) for name in groups}
    assert set(groups.values()) != {128}  # the case exercises the fallback: some K is not a multiple of 128
    tokens = torch.randint(0, 320, (2, 9))
    quant.save_quantized(model, tmp_path)
    loaded = quant.load_quantized(tmp_path, dtype=torch.float32)
    assert {n: m.group_size for n, m in loaded.named_modules() if isinstance(m, Int4Linear)} == groups
    assert torch.equal(loaded(tokens), model(tokens))


@pytest.mark.parametrize("case", ["v2_like", "lite_like"])
@pytest.mark.parametrize("method", ["int8", "int4"])
@torch.no_grad()
def test_whole_model(fp32_kernels, case, method):
    original = random_model(case)
    tokens = torch.randint(0, 320, (2, 24))
    model = quant.quantize_model(copy.deepcopy(original), method, group_size=32)
    logits = model(tokens)
    # exactly the float model with dequantized weights (every path, routing included)
    assert rel_err(logits, dequantized_twin(original, model)(tokens)) <= 1e-4  # 1e-6 measured
    # against the fp32 original; randomize_'s large weights make errors compound and flip routes.
    # Measured: int8 0.03-0.04, int4 0.23-0.28
    assert rel_err(logits, original(tokens)) <= {"int8": 0.08, "int4": 0.4}[method]
    qc = model.config.quantization_config
    assert qc["quant_method"] == f"dsv2_{method}" and qc["group_size"] == (32 if method == "int4" else None)


@pytest.mark.parametrize("case", ["v2_like", "lite_like"])
@torch.no_grad()
def test_w8a8_whole_model(case):
    original = random_model(case)
    tokens = torch.randint(0, 320, (2, 24))
    int8 = quant.for_inference(copy.deepcopy(original), "int8")
    model = quant.for_inference(copy.deepcopy(original), "w8a8")
    assert model.config.quantization_config["quant_method"] == "dsv2_int8"  # the same weights, stored as int8
    # activations' rounding on top of int8's; randomize_'s large weights compound it and flip routes.
    # Measured over 3 seeds: 0.028-0.058 against int8 (int8 itself: 0.023-0.058 against fp32), 0.035-0.061
    assert rel_err(model(tokens), int8(tokens)) <= 0.1
    assert rel_err(model(tokens), original(tokens)) <= 0.12


@pytest.mark.parametrize("case", ["v2_like", "lite_like"])
@torch.no_grad()
def test_bf16_weights_whole_model(case):
    """An fp32 model's weights stored in bf16: its logits are the fp32 model's whose weight matrices were rounded to
    bf16 (all but MLA's wkv_b, the router and the embedding, kept), with decode-sized rows on dsv2's kernel (where it
    builds) and a prefill's on F.linear."""
    original = random_model(case)
    rounded = copy.deepcopy(original)
    for name, p in rounded.named_parameters():
        if p.dim() >= 2 and not name.endswith(("wkv_b.weight", "ffn.gate.weight", "embed.weight")):
            p.copy_(p.bfloat16().float())
    model = quant.for_inference(copy.deepcopy(original), "bf16")
    assert isinstance(model.head, quant.Bf16Linear) and model.head.weight.dtype == torch.bfloat16
    assert model.layers[1].attn.wkv_b.weight.dtype == torch.float32
    for rows in (1, 40):  # one token a row (the kernel where it builds), then a prefill of 2 x 40 (F.linear)
        tokens = torch.randint(0, 320, (2, rows))
        assert rel_err(model(tokens), rounded(tokens)) <= 1e-5
    assert rel_err(model(tokens), original(tokens)) <= 0.05  # bf16's rounding of the weights


@torch.no_grad()
def test_bf16_weights_refuse_what_they_cannot_store():
    """The bf16 format stores an fp32 model's weights; a bf16 model's already are; fp16 and quantized models are
    refused, naming what they are."""
    model = random_model("v2_like").bfloat16()
    assert quant.for_inference(model, "bf16") is model
    with pytest.raises(ValueError, match="stores an fp32 model's weights in bf16; the model is torch.float16"):
        quant.for_inference(random_model("v2_like").half(), "bf16")
    with pytest.raises(ValueError, match="the model is dsv2_int8"):
        quant.for_inference(quant.quantize_model(random_model("v2_like"), "int8"), "bf16")


@torch.no_grad()
def test_w4a8_whole_model(tmp_path):
    """int4 weights with int8 activations: near int4; where dsv2's kernel is built the matrices whose K has groups
    of 64 run on it (the others round x to the same grid for torch's int4 kernel); a stored int4 checkpoint
    re-laid out for w4a8 gives the same logits as quantizing the float model for it."""
    original = random_model("v2_like")
    tokens = torch.randint(0, 320, (2, 24))
    int4 = quant.for_inference(copy.deepcopy(original), "int4", group_size=64)
    model = quant.for_inference(copy.deepcopy(original), "w4a8", group_size=64)
    assert model.config.quantization_config["quant_method"] == "dsv2_int4"  # the same weights, stored as int4
    layouts = {m.layout for m in model.modules() if isinstance(m, Int4Linear)}
    assert layouts == ({"w4a8", "cpu"} if cpu_kernels.loaded() else {"cpu"})
    assert all(m.int8_activations for m in model.modules() if isinstance(m, Int4Linear))
    # the activations' rounding on top of int4's; randomize_'s large weights compound it. Measured over 3 seeds:
    # 0.027-0.068 against int4
    assert rel_err(model(tokens), int4(tokens)) <= 0.12
    quant.save_quantized(int4, tmp_path)
    stored = quant.for_inference(quant.load_quantized(tmp_path, dtype=torch.float32), "w4a8")
    assert {m.layout for m in stored.modules() if isinstance(m, Int4Linear)} == layouts
    assert torch.equal(stored(tokens), model(tokens))


@pytest.mark.parametrize("method", ["int8", "int4"])
@torch.no_grad()
def test_absorbed_equals_naive_on_a_quantized_model(method):
    model = quant.quantize_model(random_model("v2_like"), method, group_size=32)
    model.prepare_for_inference()  # W_UK / W_UV come out of the kept float wkv_b
    cfg, attn = model.config, model.layers[1].attn
    B, T = 2, 40
    x = torch.randn(B, 1, cfg.hidden_size)
    positions = torch.full((B, 1), T - 1)
    cos, sin = model.rope(positions)
    q_nope, q_pe = attn.queries(x, cos, sin)
    history = torch.randn(B, T, cfg.kv_cache_dim)
    mask = torch.ones(B, 1, T, dtype=torch.bool)
    absorbed = attn.absorbed(q_nope, q_pe, history, mask)
    naive = attn.naive(q_nope, q_pe, *history.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1), mask)
    assert rel_err(absorbed, naive) <= 1e-5


@pytest.mark.parametrize("method", ["int8", "w8a8", "int4", "w4a8"])
def test_engine_greedy_equals_plain_loop(method):
    # w4a8 in groups of 64: the matrices of K = 64 on dsv2's kernel where it is built
    model = quant.for_inference(random_model("v2_like"), method, group_size=64 if method == "w4a8" else 32)
    engine = LLMEngine(model, max_running=3)  # 4 prompts through 3 slots
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    requests = [engine.make_request(p, params) for p in PROMPTS]
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        engine.step()
    assert [r.out.token_ids for r in requests] == [generate(model, p, params) for p in PROMPTS]


@pytest.mark.parametrize(("method", "dtype"), [("int8", torch.float32), ("int4", torch.float32),
                                               ("int4", torch.bfloat16)])
@torch.no_grad()
def test_checkpoint_round_trip(tmp_path, monkeypatch, method, dtype):
    model = quant.quantize_model(random_model("lite_like", dtype=dtype), method, group_size=32)
    tokens = torch.randint(0, 320, (2, 11))
    expected = model(tokens)
    quant.save_quantized(model, tmp_path, max_shard_bytes=60_000)  # several shards and an index
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == f"dsv2_{method}"
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")

    def no_quantizing(*args, **kwargs):
        raise AssertionError("load_quantized must not quantize")

    monkeypatch.setattr(quant, "quantize_int8", no_quantizing)
    monkeypatch.setattr(quant, "quantize_int4", no_quantizing)
    loaded = quant.load_quantized(tmp_path, dtype=dtype)
    assert torch.equal(loaded(tokens), expected)
    stored = quant.checkpoint_tensors(loaded)
    name = "model.layers.1.mlp.experts.3.gate_proj"
    if method == "int8":
        assert stored[f"{name}.weight"].dtype == torch.int8 and stored[f"{name}.weight_scale"].shape == (32,)
    else:  # unpacked nibble pairs, one scale and zero point per group of 32
        assert stored[f"{name}.weight"].shape == (32, 32) and stored[f"{name}.weight_zero_point"].shape == (32, 2)


def test_bad_arguments(tmp_path):
    model = random_model("lite_like")
    with pytest.raises(ValueError, match="method"):
        quant.quantize_model(model, "int3")
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize_model(model, "int4", group_size=48)
    with pytest.raises(ValueError, match="not quantized"):
        quant.save_quantized(model, tmp_path)
    quant.quantize_model(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_model(model, "int4")


def test_an_int8_checkpoint_holding_minus_128_is_refused(tmp_path):
    """dsv2's int8 is symmetric, [-127, 127] (what the AVX2 kernel's sign trick needs): a file holding -128 names the
    tensor instead of decoding wrongly."""
    model = quant.quantize_model(random_model("lite_like"), "int8")
    quant.save_quantized(model, tmp_path)
    quant.load_quantized(tmp_path, dtype=torch.float32)
    name = "model.layers.1.mlp.experts.3.gate_proj.weight"
    tensors = load_file(tmp_path / "model.safetensors")
    tensors[name][0, 0] = -128
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"{name} holds -128"):
        quant.load_quantized(tmp_path, dtype=torch.float32)
