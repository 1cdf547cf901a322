"""Latent-cache quantization (`kv_cache_dtype` "fp8" and "6bit"): bit packing, bytes per token from the layouts,
encode/decode error on realistic latents within stated bounds, the engine's greedy decoding and logits against
the unquantized cache (YaRN-scaled config included), more blocks for the same bytes, stats, `dsv2 info` and
validation.

Measured (torch 2.13 CPU) and asserted with a margin:
- round trip on latents of a randomised model with V2's latent dims (d_c 512, d_h^R 64), relative RMS error:
  fp8 c_KV 0.025, k^R 0.002 (bf16); 6bit c_KV 0.032, k^R 0.048.
- the engine on a randomised v2_like model, 8 prompts x 24 greedy tokens: the share of generated tokens that
  are the unquantized model's greedy choice on the same prefix, 0.90-0.97 for both dtypes over three seeds
  and three configs (a bf16-rounded cache: 0.99-1.00); the mean |log p| difference of the chosen tokens
  0.02-0.04 (bf16 cache: 0.002-0.004).
- teacher-forced logits through the cache (naive prefill chunk, absorbed decode), relative RMS error against
  the unquantized cache: 0.04-0.085.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROMPTS, random_model, randomize_

import dsv2
from dsv2 import LLM, SamplingParams
from dsv2.cli import main, parse_args
from dsv2.infer.cache import LatentCache, PagedLatentCache
from dsv2.infer.engine import LLMEngine
from dsv2.infer.kv_quant import FP8_MAX, cache_layout, pack_bits, unpack_bits


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).pow(2).mean() / b.float().pow(2).mean()).sqrt().item()


def dims(kv_lora_rank: int, rope: int) -> dsv2.ModelConfig:
    return dsv2.preset("nano").replace(kv_lora_rank=kv_lora_rank, qk_rope_head_dim=rope)


# ------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("bits", [4, 5, 6, 7])
@pytest.mark.parametrize("n", [8, 13, 64])
def test_pack_bits_round_trips_exactly(bits, n):
    codes = torch.randint(0, 1 << bits, (3, 5, n))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, -(-n // 8) * bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize(("d_c", "rope", "fp8", "sixbit"), [
    (512, 64, 512 + 4 * 4 + 64 * 2, 512 * 6 // 8 + 4 + 64 * 5 // 8 + 2),  # DeepSeek-V2: 656, 430
    (64, 16, 64 + 4 + 16 * 2, 48 + 1 + 10 + 1),  # nano
    (32, 8, 32 + 4 + 8 * 2, 24 + 1 + 5 + 1),  # the tests' configs
    (100, 12, 100 + 4 + 12 * 2, 13 * 6 + 1 + 2 * 5 + 1),  # groups and bit runs padded
])
def test_bytes_per_token_per_layer(d_c, rope, fp8, sixbit):
    cfg = dims(d_c, rope)
    assert cache_layout("fp8", cfg).bytes_per_token_per_layer() == fp8
    assert cache_layout("6bit", cfg).bytes_per_token_per_layer() == sixbit
    assert cache_layout("auto", cfg, torch.bfloat16).bytes_per_token_per_layer() == (d_c + rope) * 2
    if d_c == 512:
        assert fp8 == 656 and sixbit <= 576 * 6 // 8 == 432  # vLLM's fp8_ds_mla; the paper's 6 bits on average


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    """[N, 576] cache entries of every layer of a randomised model with V2's latent dims."""
    torch.manual_seed(0)
    cfg = dsv2.preset("nano").replace(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64)
    model = dsv2.random_model(cfg)
    randomize_(model)
    cache = LatentCache(cfg, 2, 128)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, 128)), cache=cache)
    return cache.kv.flatten(0, 2)


def groups(x: torch.Tensor, size: int) -> torch.Tensor:
    """Each element's group amax, [..., n]."""
    g = x.unflatten(-1, (-1, size)).abs().amax(-1, keepdim=True)
    return g.expand(*g.shape[:-1], size).flatten(-2)


def round_trip(latents: torch.Tensor, kv_cache_dtype: str, width: int) -> tuple[torch.Tensor, ...]:
    """Encode and decode V2-dim latents; checks the stored bytes; -> c_KV, k^R, and both decoded."""
    layout = cache_layout(kv_cache_dtype, dims(512, 64))
    stored = layout.encode(latents)
    assert stored.dtype == torch.uint8 and stored.shape == (latents.shape[0], width)
    return *latents.split([512, 64], -1), *layout.decode(stored).split([512, 64], -1)


def test_fp8_decodes_every_e4m3_code_as_torch_converts_it():
    """The bit-moving decode (kv_quant.Fp8Groups) against torch's own e4m3 -> fp32, on all 254 finite codes
    (subnormals and -0 included) at a scale of 1 and of 2^-7, through a layout's decode."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # 0x7F, 0xFF: e4m3fn's NaNs, which encode never writes
    layout = cache_layout("fp8", dims(254, 2))
    for scale in (1.0, 2.0**-7):
        stored = torch.cat([codes, torch.tensor([scale] * 2).view(torch.uint8), torch.zeros(4, dtype=torch.uint8)])
        decoded = layout.decode(stored[None])[0, :254]
        expected = codes.view(torch.float8_e4m3fn).float() * scale
        assert torch.equal(decoded, expected) and torch.equal(decoded.signbit(), expected.signbit())


def test_fp8_decodes_large_groups_without_overflow():
    """A group scale past 2^8 cannot take the decode's 2^120 re-bias in fp32; such groups still decode right."""
    layout = cache_layout("fp8", dims(128, 16))
    x = torch.randn(2, 3, 144) * torch.tensor([1e6] * 128 + [1.0] * 16)
    back = layout.decode(layout.encode(x))
    assert back.isfinite().all() and rel_rms(back[..., :128], x[..., :128]) <= 0.03


def test_fp8_round_trip_error(latents):
    c, k, c_back, k_back = round_trip(latents, "fp8", 656)
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 of the value, or 2^-10 of the scale below e4m3's normals
    scale = groups(c, 128) / FP8_MAX
    assert ((c_back - c).abs() <= 2**-4 * c.abs() + 2**-10 * scale + 1e-7).all()
    assert ((k_back - k).abs() <= 2**-8 * k.abs()).all()  # bf16: 7 stored mantissa bits
    assert rel_rms(c_back, c) <= 0.03 and rel_rms(k_back, k) <= 0.003


def test_6bit_round_trip_error(latents):
    c, k, c_back, k_back = round_trip(latents, "6bit", 430)
    # rounding to the nearest code costs at most half a step; a step is at most 2^(1/8) · amax / qmax
    assert ((c_back - c).abs() <= 2 ** (1 / 8) * groups(c, 128) / (2 * 31) + 1e-6).all()
    assert ((k_back - k).abs() <= 2 ** (1 / 8) * groups(k, 32) / (2 * 15) + 1e-6).all()
    assert rel_rms(c_back, c) <= 0.04 and rel_rms(k_back, k) <= 0.06


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "6bit"])
def test_round_trip_odd_dims_zeros_and_dtype(kv_cache_dtype):
    layout = cache_layout(kv_cache_dtype, dims(100, 12), torch.bfloat16)
    x = torch.randn(4, 7, 112)
    x[0] = 0.0  # an all-zero entry: every group's amax is 0
    back = layout.decode(layout.encode(x))
    assert back.dtype == torch.float32 and back.shape == x.shape  # quantized layouts decode to fp32
    assert torch.equal(back[0], x[0])
    assert rel_rms(back[1:], x[1:]) <= 0.06


# --------------------------------------------------------------------------------------------- model
def cached_logits(model, x: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    """Logits of x [B,S] through a LatentCache stored as `kv_cache_dtype`: a 70-token prefill chunk (naive
    path), a 3-token chunk, then single-token decode steps (absorbed path)."""
    cache = LatentCache(model.config, x.shape[0], x.shape[1], kv_cache_dtype=kv_cache_dtype)
    chunks = []
    for start, stop in [(0, 70), (70, 73), *((t, t + 1) for t in range(73, x.shape[1]))]:
        chunks.append(model(x[:, start:stop], cache=cache))
        cache.advance(stop - start)
    return torch.cat(chunks, 1)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "6bit"])
@torch.no_grad()
def test_paged_quantized_equals_contiguous_quantized(kv_cache_dtype):
    model = random_model("lite_like")
    x = torch.randint(0, model.config.vocab_size, (2, 80))
    contiguous = cached_logits(model, x, kv_cache_dtype)
    paged = PagedLatentCache(model.config, num_blocks=48, block_size=4, kv_cache_dtype=kv_cache_dtype)
    assert paged.pool.dtype == torch.uint8 and paged.pool.shape[-1] == paged.layout.width
    tables = [list(range(47, 27, -1)), list(range(20))]  # disjoint, one row's blocks in reverse
    chunks = []
    for start, stop in [(0, 70), (70, 73), *((t, t + 1) for t in range(73, 80))]:
        chunks.append(model(x[:, start:stop], cache=paged.view(tables, [start, start])))
    assert torch.equal(torch.cat(chunks, 1), contiguous)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "6bit"])
@torch.no_grad()
def test_yarn_config_logits_close_and_scale_from_the_model(kv_cache_dtype):
    """dense2_groups_yarn_ratio: YaRN with mscale != mscale_all_dim, 120 positions against an original context
    of 32. The softmax scale (with YaRN's mscale²) is the model's; the cache only stores latents, so the
    quantized logits stay close to the unquantized ones, and far closer than leaving mscale out would be
    (the TensorRT-LLM #3675 failure with fp8 KV)."""
    model = random_model("dense2_groups_yarn_ratio")
    cfg = model.config
    assert cfg.softmax_scale != pytest.approx(cfg.qk_head_dim**-0.5)  # mscale² ≈ 1.30 here
    x = torch.randint(0, cfg.vocab_size, (2, 120))
    auto = cached_logits(model, x, "auto")
    err = rel_rms(cached_logits(model, x, kv_cache_dtype), auto)
    assert err <= 0.1  # measured 0.044-0.059
    for layer in model.layers:
        layer.attn.softmax_scale = cfg.qk_head_dim**-0.5
    assert rel_rms(cached_logits(model, x, kv_cache_dtype), auto) > 3 * err


# -------------------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "6bit"])
@torch.no_grad()
def test_engine_greedy_agrees_with_the_unquantized_model(kv_cache_dtype):
    model = random_model("v2_like")
    prompts = [torch.randint(2, model.config.vocab_size, (n,)).tolist() for n in (5, 20, 40, 60, 9, 33, 17, 50)]
    engine = LLMEngine(model, max_running=8, kv_cache_dtype=kv_cache_dtype, cache_bytes=1 << 24)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    requests = [engine.make_request(p, params) for p in prompts]
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        engine.step()
    agree = total = 0
    logprob_diff = []
    for r in requests:  # score the engine's tokens under the uncached, unquantized model on the same prefix
        n = len(r.out.prompt_token_ids)
        ref = model(torch.tensor([r.out.prompt_token_ids + r.out.token_ids]))[0, n - 1 : -1].log_softmax(-1)
        generated = torch.tensor(r.out.token_ids)
        agree += int((ref.argmax(-1) == generated).sum())
        total += len(generated)
        logprob_diff.append((ref.gather(1, generated[:, None])[:, 0] - torch.tensor(r.out.logprobs)).abs())
    assert agree / total >= 0.85  # measured 0.90-0.97
    assert torch.cat(logprob_diff).mean() <= 0.06  # measured 0.02-0.04


def test_same_bytes_buy_more_blocks_and_hold_more_tokens():
    model = random_model("v2_like")  # fp32, 3 layers, d_c 32 + d_h^R 8: 160 B per entry unquantized
    budget = 3 * 160 * 4 * 12  # 12 blocks of 4 tokens unquantized: one 41-token prompt at a time
    per_entry = {"auto": 160, "fp8": 32 + 4 + 8 * 2, "6bit": 24 + 1 + 5 + 1}
    running = {}
    for kv, entry in per_entry.items():
        # four copies of one prompt: without prefix caching each holds its own blocks, which is what is counted
        engine = LLMEngine(model, max_running=4, cache_bytes=budget, block_size=4, kv_cache_dtype=kv,
                           prefix_caching=False)
        assert engine.cache.num_blocks == budget // (3 * entry * 4)  # 12, 36, 61
        assert engine.cache.bytes_per_token() == 3 * entry
        assert engine.cache.bytes_allocated() <= budget
        for _ in range(4):
            engine.add_request(engine.make_request(PROMPTS[1], SamplingParams(max_tokens=4, ignore_eos=True)))
        engine.step()
        running[kv] = engine.stats().step_cached_tokens
    assert running == {"auto": 41, "fp8": 3 * 41, "6bit": 4 * 41}


def test_stats_report_the_quantized_bytes():
    model = random_model("v2_like")
    llm = LLM(model, skip_tokenizer_init=True, max_batch_size=2, cache_bytes=1 << 16, block_size=8,
              kv_cache_dtype="6bit")
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    s = llm.stats()
    per_token = 3 * (24 + 1 + 5 + 1)
    assert s["kv_cache_bytes_per_token"] == per_token
    assert s["kv_cache_peak_bytes_in_use"] == (3 + 41 + 2 * 5 - 2) * per_token
    assert s["kv_cache_bytes_allocated"] == llm.engine.cache.num_blocks * 8 * per_token
    assert llm.engine.cache.num_blocks == (1 << 16) // (8 * per_token) == 88


def test_bad_kv_cache_dtype_is_a_clear_error():
    model = random_model("v2_like")
    for make in (lambda: LLMEngine(model, kv_cache_dtype="int4"), lambda: LLM(model, kv_cache_dtype="fp16"),
                 lambda: PagedLatentCache(model.config, 4, kv_cache_dtype="e4m3")):
        with pytest.raises(ValueError, match="kv_cache_dtype must be one of 'auto', 'fp8', '6bit'"):
            make()
    for argv in (["serve", "--kv-cache-dtype", "int4"], ["generate", "nano", "--kv-cache-dtype", "fp16"]):
        with pytest.raises(SystemExit) as exit_:  # argparse refuses it before anything loads
            parse_args(argv)
        assert exit_.value.code == 2
    assert parse_args(["serve", "--kv-cache-dtype", "6bit"]).kv_cache_dtype == "6bit"


# ---------------------------------------------------------------------------------------------- info
def test_info_kv_cache_dtype(capsys):
    assert main(["info", "deepseek-v2", "--kv-cache-dtype", "6bit"]) == 0
    out = capsys.readouterr().out
    assert "KV cache per token (6bit):     25,800 bytes (430 per layer): 2.68x smaller than the bf16 latent" in out
    assert "152.4x smaller than MHA" in out
    assert main(["info", "deepseek-v2", "--kv-cache-dtype", "fp8", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["kv_cache_dtype"] == "fp8" and s["kv_cache_dtype_bytes_per_token"] == 656 * 60 == 39_360
    assert s["kv_cache_bytes_per_token"] == 69_120  # the bf16 latent cache, as before
    assert s["kv_cache_dtype_reduction_vs_latent"] == pytest.approx(69_120 / 39_360)
    assert s["kv_cache_dtype_reduction_vs_mha"] == pytest.approx(2 * 128 * 128 * 60 * 2 / 39_360)
    assert main(["info", "deepseek-v2", "--kv-cache-dtype", "6bit", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache_dtype_bytes_per_token"] <= 25_920
