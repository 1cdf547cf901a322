"""MHA / GQA / MQA (model/attention_variants.py): config, a textbook reference, cached = uncached (contiguous and
paged), packed prefill = rows alone, and the engine (paged, prefix caching, preemption) = the plain loop."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PROMPTS, drain, hub_config, randomize_

import dsv2
from dsv2.config import ConfigError, ModelConfig, preset
from dsv2.infer.cache import LatentCache, PagedLatentCache
from dsv2.infer.engine import LLMEngine
from dsv2.infer.generate import generate
from dsv2.infer.sampling import SamplingParams
from dsv2.info import summarize
from dsv2.model.attention_variants import GroupedQueryAttention
from dsv2.train.core import TrainConfig, model_config

# attention -> overrides of conftest's V2-like config (4 heads of hidden 64): gqa with a head_dim of its own
VARIANTS = {"mha": {}, "gqa": {"num_key_value_heads": 2, "head_dim": 24}, "mqa": {}}


def variant_config(attention: str) -> ModelConfig:
    return ModelConfig.from_dict({**hub_config("v2_like"), "attention": attention, **VARIANTS[attention]})


def variant_model(attention: str) -> dsv2.Transformer:
    model = dsv2.random_model(variant_config(attention))
    randomize_(model)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------------ config
def test_config_overrides_pick_the_variant_and_an_mla_config_writes_no_variant_field():
    kv = {}
    for attention, n_kv in [("mha", 8), ("gqa", 2), ("mqa", 1)]:
        overrides = {"attention": attention, **({"num_key_value_heads": 2} if attention == "gqa" else {})}
        config = model_config(TrainConfig(model="small", config_overrides=overrides))
        assert (config.num_key_value_heads, config.attention_head_dim) == (n_kv, 128)
        assert config.to_dict()["attention"] == attention
        assert ModelConfig.from_dict(config.to_dict()) == config
        kv[attention] = summarize(config)["kv_cache_bytes_per_token"]
        assert config.replace(attention="mla", num_key_value_heads=8) == preset("small")  # the rest: unchanged
    assert kv == {"mha": 2 * 8 * 128 * 8 * 2, "gqa": 2 * 2 * 128 * 8 * 2, "mqa": 2 * 1 * 128 * 8 * 2}
    for name in ("small", "deepseek-v2"):
        assert not {"attention", "head_dim"} & set(preset(name).to_dict())


@pytest.mark.parametrize(("overrides", "field"), [
    ({"attention": "gqa", "num_key_value_heads": 3}, "num_key_value_heads"),  # 4 heads
    ({"attention": "gqa", "num_key_value_heads": None}, "num_key_value_heads"),
    ({"attention": "mha", "head_dim": 15}, "head_dim"),
    ({"attention": "mha", "num_attention_heads": 3}, "head_dim"),  # 64 / 3
    ({"attention": "sliding"}, "attention"),
])
def test_invalid_variant_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        ModelConfig.from_dict({**hub_config("v2_like"), **overrides})


# --------------------------------------------------------------------------------------------- reference
def textbook_attention(attn: GroupedQueryAttention, x: torch.Tensor, positions: torch.Tensor,
                       theta: float) -> torch.Tensor:
    """Causal attention of x [S,d] written out head by head: Llama's rotate-half RoPE on q and k, query head h
    reading key/value head h // (H / n_kv), softmax(q·k / sqrt(d_h)) in float64."""
    H, n_kv, d = attn.n_heads, attn.n_kv, attn.head_dim
    x = x.double()
    q = (x @ attn.wq.weight.double().T).view(-1, H, d)
    k = (x @ attn.wk.weight.double().T).view(-1, n_kv, d)
    v = (x @ attn.wv.weight.double().T).view(-1, n_kv, d)
    inv_freq = theta ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]

    def rope(t):
        first, second = t[..., : d // 2], t[..., d // 2 :]
        return t * cos + torch.cat([-second, first], -1) * sin

    q, k = rope(q), rope(k)
    S = x.shape[0]
    heads = []
    for h in range(H):
        g = h // (H // n_kv)
        scores = q[:, h] @ k[:, g].T / math.sqrt(d)
        scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, g])
    return torch.cat(heads, -1) @ attn.wo.weight.double().T


@pytest.mark.parametrize("attention", sorted(VARIANTS))
@torch.no_grad()
def test_variant_equals_the_textbook_computation(attention):
    config = ModelConfig.from_dict({**hub_config("no_rope_scaling"), "attention": attention, **VARIANTS[attention]})
    model = dsv2.random_model(config)
    randomize_(model)
    attn = model.layers[0].attn
    assert isinstance(attn, GroupedQueryAttention) and attn.n_kv == {"mha": 4, "gqa": 2, "mqa": 1}[attention]
    x = torch.randn(1, 40, config.hidden_size)
    positions = torch.arange(40)
    cos, sin = model.rope(positions)
    ours = attn(x, cos, sin)[0]
    ref = textbook_attention(attn, x[0], positions, config.rope_theta)
    assert rel_err(ours.double(), ref) <= 1e-6


# ------------------------------------------------------------------------------------------------- caches
def chunks_through(model: dsv2.Transformer, x: torch.Tensor, cache) -> torch.Tensor:
    """Logits of x [B,S] through `cache`: a 70-token prefill chunk, a 3-token chunk, then decode steps."""
    out = []
    for start, stop in [(0, 70), (70, 73), *((t, t + 1) for t in range(73, x.shape[1]))]:
        out.append(model(x[:, start:stop], cache=cache))
        cache.lengths += stop - start
    return torch.cat(out, 1)


@pytest.mark.parametrize("attention", sorted(VARIANTS))
@pytest.mark.parametrize("paged", [False, True])
@torch.no_grad()
def test_cached_decoding_equals_full_forward(attention, paged):
    model = variant_model(attention)
    config = model.config
    x = torch.randint(0, config.vocab_size, (2, 100))
    if paged:  # blocks of 8 handed out out of order
        pool = PagedLatentCache(config, num_blocks=32, block_size=8)
        cache = pool.view([list(range(31, 18, -1)), list(range(13))], [0, 0])
        assert pool.bytes_per_token() == config.num_hidden_layers * config.kv_cache_dim * 4
    else:
        cache = LatentCache(config, 2, 128)
    assert config.kv_cache_dim == 2 * config.num_key_value_heads * config.attention_head_dim
    assert rel_err(chunks_through(model, x, cache), model(x)) <= 1e-5


@pytest.mark.parametrize("attention", sorted(VARIANTS))
@pytest.mark.parametrize("paged", [False, True])
@torch.no_grad()
def test_packed_prefill_equals_each_row_alone(attention, paged):
    """Three rows' chunks end to end in one forward (`segments`): 50 tokens from position 0, 3 after 30
    cached and 1 after 60, then a decode step of all three reading what the packed forward wrote."""
    model = variant_model(attention)
    x = torch.randint(0, model.config.vocab_size, (3, 62))
    full = model(x)
    parts = [(0, 0, 50), (1, 30, 33), (2, 60, 61)]
    if paged:
        cache = PagedLatentCache(model.config, num_blocks=32, block_size=8).view(
            [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))], [0, 0, 0])
    else:
        cache = LatentCache(model.config, 3, 64)
    for row, start, _ in parts[1:]:
        model(x[row : row + 1, :start], cache=cache.row(row))
        cache.row(row).lengths += start
    packed = torch.cat([x[row, start:stop] for row, start, stop in parts])[None]
    segments = [stop - start for _, start, stop in parts]
    logits = model(packed, cache=cache, segments=segments)
    assert rel_err(logits, torch.cat([full[row, start:stop] for row, start, stop in parts])[None]) <= 1e-5
    cache.lengths += torch.tensor(segments)
    nxt = torch.tensor([50, 33, 61])
    assert rel_err(model(x[torch.arange(3), nxt][:, None], cache=cache)[:, 0], full[torch.arange(3), nxt]) <= 1e-5


def test_quantized_cache_is_refused_for_a_variant():
    with pytest.raises(ValueError, match="'gqa'"):
        PagedLatentCache(variant_config("gqa"), num_blocks=4, kv_cache_dtype="6bit")


# ------------------------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("attention", sorted(VARIANTS))
@torch.no_grad()
def test_engine_greedy_equals_the_plain_loop_paged_with_prefix_caching(attention):
    """Prompts sharing a 24-token prefix and the mixed-length PROMPTS, through 8 blocks of 8 tokens (so
    sequences preempt one another) with prefix caching: each = the plain loop, and = itself run alone."""
    model = variant_model(attention)
    system = list(range(10, 34))
    prompts = [system + [200 + i] * (i + 1) for i in range(3)] + PROMPTS
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    def engine() -> LLMEngine:
        return LLMEngine(model, num_blocks=8, block_size=8, prefill_chunk=16, max_prefill_tokens=32, max_running=3)

    batched = engine()
    outs = drain(batched, prompts, params)
    s = batched.stats()
    assert s.totals["preemptions"] > 0 and s.totals["prefix_hit_tokens"] > 0
    assert outs == [generate(model, p, params) for p in prompts]
    assert outs == [drain(engine(), [p], params)[0] for p in prompts]
