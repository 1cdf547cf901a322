"""DeepSeek's block-FP8 checkpoints: the quantization math against a per-block loop, load dequantized or kept,
save back bit-identically, every malformed-scale error, and transformers reading our FP8 checkpoints."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import hub_config, randomize_, require
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv2
from dsv2.cli import main
from dsv2.model.fp8 import (
    FP8_DTYPE,
    FP8Linear,
    FP8RoutedExperts,
    dequantize_block_fp8,
    quantize_block_fp8,
)
from dsv2.model.moe import RoutedExperts
from dsv2.weights import INDEX_FILE, SINGLE_FILE, CheckpointError

BLOCK = (128, 128)


# ------------------------------------------------------------------------------ the math, by loop
def loop_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule written out block by block: S = amax / 448 (1 for an all-zero block), Q = e4m3(W / S)."""
    n, k = w.shape
    bn, bk = block
    scale = torch.empty(math.ceil(n / bn), math.ceil(k / bk))
    codes = torch.empty(n, k, dtype=FP8_DTYPE)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            b = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].float()
            amax = b.abs().max()
            s = amax / 448 if amax > 0 else torch.tensor(1.0)
            scale[i, j] = s
            codes[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (b / s).clamp(-448, 448).to(FP8_DTYPE)
    return codes, scale


def loop_dequantize(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = torch.empty(codes.shape)
    bn, bk = block
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * bn, (i + 1) * bn), slice(j * bk, (j + 1) * bk)
            out[rows, cols] = codes[rows, cols].float() * scale[i, j]
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("block", [(128, 128), (64, 96), (16, 16)])
def test_quantize_and_dequantize_match_the_block_loop(block):
    w = torch.randn(200, 300) * torch.logspace(-3, 1, 300)  # columns of very different magnitudes
    w[:block[0], :block[1]] = 0  # an all-zero block
    codes, scale = quantize_block_fp8(w, block)
    ref_codes, ref_scale = loop_quantize(w, block)
    assert codes.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert scale.shape == (math.ceil(200 / block[0]), math.ceil(300 / block[1]))
    assert torch.equal(bits(codes), bits(ref_codes)) and torch.equal(scale, ref_scale)
    assert scale[0, 0] == 1 and not codes.float().isnan().any()
    assert torch.equal(dequantize_block_fp8(codes, scale, block, torch.float32), loop_dequantize(codes, scale, block))
    # bf16: one rounding of the fp32 product
    assert torch.equal(dequantize_block_fp8(codes, scale, block), loop_dequantize(codes, scale, block).bfloat16())
    # stacked experts [E, N, K] are E independent matrices
    stacked = torch.randn(3, 70, 130)
    s_codes, s_scale = quantize_block_fp8(stacked, block)
    for e in range(3):
        c, s = quantize_block_fp8(stacked[e], block)
        assert torch.equal(bits(s_codes[e]), bits(c)) and torch.equal(s_scale[e], s)


def test_round_trip_error_bound():
    """e4m3 keeps 3 mantissa bits: |ŵ − w| ≤ 2^-4·|w| (normal range, half an ulp) + 2^-10·S (subnormals,
    half the smallest step), S the block's scale_inv; and each block's largest |w| is exact up to fp32 rounding."""
    w = torch.randn(300, 260) * 10 ** torch.empty(300, 260).uniform_(-5, 1)
    codes, scale = quantize_block_fp8(w, BLOCK)
    w_hat = dequantize_block_fp8(codes, scale, BLOCK, torch.float32)
    s = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    err = (w_hat - w).abs()
    assert (err <= 2**-4 * w.abs() * (1 + 1e-6) + 2**-10 * s).all()
    assert (err[w.abs() >= 2**-6 * s] <= 2**-4 * w.abs()[w.abs() >= 2**-6 * s] * (1 + 1e-6)).all()
    assert w_hat.abs().amax() == pytest.approx(w.abs().amax().item(), rel=1e-6)


# ------------------------------------------------------------------------------ checkpoints
def small_model(case: str) -> dsv2.Transformer:
    """A CASES model with hidden 200 and a 200-row q_lora: edge blocks of 72 rows / columns everywhere."""
    cfg = hub_config(case)
    cfg["hidden_size"] = 200
    model = dsv2.random_model(dsv2.ModelConfig.from_dict(cfg))
    randomize_(model)
    return model.eval()


@pytest.fixture(scope="module", params=["v2_like", "lite_like"])
def fp8_checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    model = small_model(request.param)
    folder = tmp_path_factory.mktemp(f"fp8_{request.param}")
    dsv2.save_model(model, folder, fp8_block=BLOCK, progress=False)
    return model, folder


def tokens(model, n: int = 40) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))


def test_saved_layout_follows_deepseek(fp8_checkpoint):
    model, folder = fp8_checkpoint
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
    }
    assert config["torch_dtype"] == "float32"
    tensors = load_file(folder / SINGLE_FILE)
    fp8 = {n for n, t in tensors.items() if t.dtype == FP8_DTYPE}
    assert fp8 == {n.removesuffix("_scale_inv") for n in tensors if n.endswith("_scale_inv")}
    expert = "model.layers.1.mlp.experts.3.down_proj.weight"  # [200, 32]: one partial block
    assert expert in fp8 and tensors[expert + "_scale_inv"].shape == (2, 1)
    assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in fp8
    assert "model.layers.0.mlp.up_proj.weight" in fp8 and "model.layers.0.self_attn.kv_b_proj.weight" in fp8
    for plain in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                  "model.norm.weight", "model.layers.0.self_attn.kv_a_layernorm.weight"):
        assert tensors[plain].dtype == torch.float32 and plain + "_scale_inv" not in tensors
    n_linear = sum(1 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "head")
    n_experts = 3 * model.config.n_routed_experts * sum(map(model.config.is_moe_layer, range(len(model.layers))))
    assert len(fp8) == n_linear + n_experts


def test_dequantize_load_is_the_reference_rule(fp8_checkpoint):
    model, folder = fp8_checkpoint
    tensors = load_file(folder / SINGLE_FILE)
    for dtype in (torch.float32, torch.bfloat16):
        loaded = dsv2.load_model(folder, dtype=dtype, progress=False)
        assert not any(isinstance(m, (FP8Linear, FP8RoutedExperts)) for m in loaded.modules())
        resaved = {}
        for name, param, expert, _ in dsv2.weights.hf_tensors(loaded):
            p = dict(loaded.named_parameters())[param]
            resaved[name] = p if expert is None else p[expert]
        for name, t in tensors.items():
            if name.endswith("_scale_inv"):
                continue
            expected = loop_dequantize(t, tensors[name + "_scale_inv"], BLOCK) if t.dtype == FP8_DTYPE else t
            assert torch.equal(resaved[name], expected.to(dtype)), name


def test_kept_model_matches_dequantized(fp8_checkpoint):
    model, folder = fp8_checkpoint
    dequantized = dsv2.load_model(folder, progress=False)
    kept = dsv2.load_model(folder, progress=False, fp8="keep")
    assert isinstance(kept.layers[0].attn.wkv_b, FP8Linear) and isinstance(kept.layers[1].ffn.experts, FP8RoutedExperts)
    assert isinstance(kept.head, torch.nn.Linear) and not isinstance(kept.head, FP8Linear)
    assert kept.layers[1].ffn.experts.w1.dtype == FP8_DTYPE
    x = tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(kept(x), dequantized(x), rtol=1e-6, atol=1e-6)
        kept.prepare_for_inference()  # splits the dequantized wkv_b for the absorbed path
        torch.testing.assert_close(kept(x), dequantized(x), rtol=1e-6, atol=1e-6)


def test_kept_absorbed_attention_matches_naive(fp8_checkpoint):
    model, folder = fp8_checkpoint
    kept = dsv2.load_model(folder, progress=False, fp8="keep")
    attn = kept.layers[0].attn
    x = torch.randn(2, 24, model.config.hidden_size)
    cos, sin = kept.rope(torch.arange(24))
    with torch.no_grad():
        q_nope, q_pe = attn.queries(x, cos, sin)
        c_kv, k_pe = attn.latents(x, cos, sin)
        naive = attn.naive(q_nope, q_pe, c_kv, k_pe, None)
        causal = torch.ones(24, 24, dtype=torch.bool).tril().expand(2, 24, 24)
        absorbed = attn.absorbed(q_nope, q_pe, torch.cat([c_kv, k_pe], dim=-1), causal)
    torch.testing.assert_close(absorbed, naive, rtol=1e-4, atol=1e-5)


def test_kept_model_saves_back_bit_identically(fp8_checkpoint, tmp_path):
    _, folder = fp8_checkpoint
    kept = dsv2.load_model(folder, progress=False, fp8="keep")
    dsv2.save_model(kept, tmp_path, progress=False)
    assert (tmp_path / SINGLE_FILE).read_bytes() == (folder / SINGLE_FILE).read_bytes()
    assert (tmp_path / "config.json").read_text() == (folder / "config.json").read_text()
    # sharded, with the scales in whichever shard they fall: the same again
    dsv2.save_model(kept, tmp_path / "a", max_shard_bytes=50_000, progress=False)
    index = json.loads((tmp_path / "a" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = dsv2.load_model(tmp_path / "a", progress=False, fp8="keep")
    dsv2.save_model(again, tmp_path / "b", max_shard_bytes=50_000, progress=False)
    for shard in sorted(set(index["weight_map"].values())) + [INDEX_FILE, "config.json"]:
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes(), shard
    # a dequantized model saves plain, without the quantization_config
    dsv2.save_model(dsv2.load_model(folder, progress=False), tmp_path / "plain", progress=False)
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_kept_model_survives_dtype_casts(fp8_checkpoint, monkeypatch):
    model, folder = fp8_checkpoint
    # kept FP8 experts never take grouped GEMMs (every expert would be dequantized per call); for bit equality the
    # reference runs the same per-expert kernels (grouped and per-expert GEMMs round differently on some CPUs)
    monkeypatch.setattr(RoutedExperts, "uses_grouped_mm", lambda self, x, n_slots: False)
    monkeypatch.setattr(RoutedExperts, "kernel_runs", lambda self, x, n_slots: False)  # nor dsv2's bf16 kernel
    kept = dsv2.load_model(folder, progress=False, fp8="keep")
    codes = bits(kept.layers[1].ffn.experts.w2).clone()
    scales = kept.layers[0].attn.wo.weight_scale_inv.clone()
    kept = kept.to(torch.bfloat16)
    assert torch.equal(bits(kept.layers[1].ffn.experts.w2), codes)
    assert torch.equal(kept.layers[0].attn.wo.weight_scale_inv, scales)  # still float32
    assert kept.layers[0].attn.wo.compute_dtype == torch.bfloat16
    bf16 = dsv2.load_model(folder, dtype=torch.bfloat16, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(kept(tokens(model)), bf16(tokens(model)), rtol=0, atol=0)


def test_info_and_config_with_quantization_config(fp8_checkpoint, capsys):
    model, folder = fp8_checkpoint
    config = dsv2.ModelConfig.from_json(folder / "config.json")
    assert config.quantization_config["weight_block_size"] == [128, 128]
    assert main(["info", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ malformed checkpoints
W = "model.layers.0.self_attn.kv_b_proj.weight"
EXPERT = "model.layers.1.mlp.experts.2.up_proj.weight"


def _pop(name):
    return lambda t: t.pop(name)


def _set(name, value):
    return lambda t: t.update({name: value})


def _dequantize(name):
    def edit(t):
        t[name] = loop_dequantize(t[name], t.pop(name + "_scale_inv"), BLOCK)
    return edit


def _quantize(name):
    def edit(t):
        t[name], t[name + "_scale_inv"] = quantize_block_fp8(t[name], BLOCK)
    return edit


BAD_TENSORS = {
    "missing scale": (_pop(W + "_scale_inv"), rf"tensor {W} is float8_e4m3fn but has no {W}_scale_inv"),
    "wrong block count": (
        _set(W + "_scale_inv", torch.ones(3, 2)),
        rf"tensor {W}_scale_inv has shape \[3, 2\], but {W} \[128, 32\] in 128x128 blocks .* has \[1, 1\]",
    ),
    "scale of a plain tensor": (
        _set("model.norm.weight_scale_inv", torch.ones(1, 1)),
        r"tensor model\.norm\.weight_scale_inv is a block-FP8 scale, but model\.norm\.weight is F32",
    ),
    "scale of nothing": (
        _set("model.layers.0.nope.weight_scale_inv", torch.ones(1, 1)),
        r"tensor model\.layers\.0\.nope\.weight_scale_inv is a block-FP8 scale, but model\.layers\.0\.nope\.weight is",
    ),
    "bf16 scale": (
        _set(W + "_scale_inv", torch.ones(1, 1, dtype=torch.bfloat16)),
        rf"tensor {W}_scale_inv is BF16; block-FP8 scales are float32",
    ),
    "e5m2": (_set(W, torch.zeros(128, 32, dtype=torch.float8_e5m2)), rf"tensor {W} is F8_E5M2"),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_malformed_tensors_are_named_before_allocation(case, fp8_checkpoint, tmp_path, monkeypatch):
    model, folder = fp8_checkpoint
    edit, message = BAD_TENSORS[case]
    tensors = load_file(folder / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, tmp_path / SINGLE_FILE)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    monkeypatch.setattr(dsv2.Transformer, "to_empty", lambda *a, **k: pytest.fail("allocated before checking"))
    for mode in ("dequantize", "keep"):
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path / SINGLE_FILE))}: {message}"):
            dsv2.load_model(tmp_path, fp8=mode)


@pytest.mark.parametrize("block", [[128], [0, 128], "128", [128.0, 128]])
def test_unsupported_block_size(block, fp8_checkpoint, tmp_path):
    _, folder = fp8_checkpoint
    (tmp_path / SINGLE_FILE).write_bytes((folder / SINGLE_FILE).read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = block
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported quantization_config\.weight_block_size"):
        dsv2.load_model(tmp_path)


def test_fp8_tensors_need_the_quantization_config(fp8_checkpoint, tmp_path):
    _, folder = fp8_checkpoint
    (tmp_path / SINGLE_FILE).write_bytes((folder / SINGLE_FILE).read_bytes())
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"is block FP8 .* has no quantization_config with quant_method"):
        dsv2.load_model(tmp_path)


@pytest.mark.parametrize("tensor", [EXPERT, "model.embed_tokens.weight"])
def test_what_keep_refuses_dequantize_loads(tensor, fp8_checkpoint, tmp_path):
    """A routed expert stored plain among FP8 ones, an FP8 embedding: "keep" refuses, "dequantize" loads them."""
    _, folder = fp8_checkpoint
    tensors = load_file(folder / SINGLE_FILE)
    expected = dict(dsv2.load_model(folder, progress=False).named_parameters())
    if tensor == EXPERT:
        tensors[EXPERT] = loop_dequantize(tensors[EXPERT], tensors.pop(EXPERT + "_scale_inv"), BLOCK)
        message = rf"tensor {EXPERT} is not block FP8 while other experts of its layer are"
    else:
        tensors[tensor], tensors[tensor + "_scale_inv"] = quantize_block_fp8(tensors[tensor], BLOCK)
        expected["embed.weight"] = loop_dequantize(tensors[tensor], tensors[tensor + "_scale_inv"], BLOCK)
        message = rf"tensor {tensor} is block FP8, which dsv2 keeps only for Linear and routed-expert weights"
    save_file(tensors, tmp_path / SINGLE_FILE)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path / SINGLE_FILE))}: {message}"):
        dsv2.load_model(tmp_path, fp8="keep")
    for name, p in dsv2.load_model(tmp_path, progress=False).named_parameters():
        assert torch.equal(p, expected[name]), name


# ------------------------------------------------------------------------------ transformers
def test_transformers_loads_our_fp8_checkpoint(tmp_path):
    """transformers 5 reads block FP8 on CPU by dequantizing (FineGrainedFP8Config(dequantize=True), also what it
    falls back to without a GPU). It derives the block size from the scale grid (rows // grid rows), so it
    misreads partial edge blocks: only shapes that are whole blocks compare, here every dim a multiple of 8."""
    transformers = require("transformers")
    model = dsv2.random_model(dsv2.ModelConfig.from_dict(hub_config("v2_like")))
    randomize_(model)
    dsv2.save_model(model, tmp_path, fp8_block=(8, 8), progress=False)
    with safe_open(tmp_path / SINGLE_FILE, framework="pt") as f:
        assert f.get_tensor(W).dtype == FP8_DTYPE
    theirs = transformers.DeepseekV2ForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32,
        quantization_config=transformers.FineGrainedFP8Config(dequantize=True, weight_block_size=(8, 8)),
    ).eval()
    ours = dsv2.load_model(tmp_path, progress=False)
    x = torch.randint(0, 320, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = theirs(x).logits, ours(x)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5  # test_hf_parity's fp32 tolerance
