"""Model facts from the config alone: parameter counts (total and active per token), KV-cache size and
training FLOPs per token.

Counted on a model built on the meta device, so the full DeepSeek-V2 shape costs no memory or time.
"Active" follows the paper (§1 of paper-facts): everything a token touches, excluding the input
embedding (a lookup, not compute) and including the LM head; of the routed experts only K count.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from dsv2.config import ModelConfig
from dsv2.infer.kv_quant import cache_layout
from dsv2.model import Transformer

BF16_BYTES = 2


def _part(name: str, config: ModelConfig) -> str:
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("head."):
        return "lm_head"
    if ".attn." in name:
        return f"attention ({config.attention.upper()})"
    if ".ffn.experts." in name:
        return "routed experts"
    if ".ffn.shared_experts." in name:
        return "shared experts"
    if ".ffn.gate." in name:
        return "router"
    if ".ffn." in name:
        return "dense MLP"
    return "norms"


def summarize(config: ModelConfig, kv_cache_dtype: str = "auto") -> dict[str, Any]:
    """Counts and KV-cache bytes; `kv_cache_dtype` ("auto" = bf16, "fp8", "6bit") adds that cache's bytes
    per token and how many times smaller it is than the bf16 latent cache and than MHA's."""
    with torch.device("meta"):
        model = Transformer(config)
    parts: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        parts[_part(name, config)] += p.numel()
    total = sum(parts.values())
    # the norms' scales (every 1-D parameter): multiplied elementwise, not in a matmul
    elementwise = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    routed = parts.get("routed experts", 0)
    routed_active = routed * config.num_experts_per_tok // config.n_routed_experts if routed else 0
    active = total - parts["embedding"] - routed + routed_active
    layers = config.num_hidden_layers
    elements = config.kv_cache_dim * layers
    latent = elements * BF16_BYTES
    head_dim = config.qk_nope_head_dim if config.attention == "mla" else config.attention_head_dim
    mha = 2 * config.num_attention_heads * head_dim * layers * BF16_BYTES
    stored = cache_layout(kv_cache_dtype, config, torch.bfloat16).bytes_per_token_per_layer() * layers
    if config.attention == "mla":  # what the reference implementation caches: decompressed K (d_h + d_h^R), V per head
        reference = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * layers * BF16_BYTES
    else:
        reference = latent
    return {
        "total_params": total,
        "active_params": active,
        "params_by_part": dict(parts),
        "active_routed_expert_params": routed_active,
        "elementwise_params": elementwise,
        "moe_layers": sum(config.is_moe_layer(i) for i in range(layers)),
        # what the KV cache holds per token (paper Table 1): MLA's c_KV + k^R, or a variant's 2·n_kv·d_h, per layer
        "kv_cache_elements_per_token": elements,
        "kv_cache_bytes_per_token": latent,  # in bf16
        # MHA with the same heads: 2·n_h·d_h·l elements (paper Table 1)
        "mha_kv_cache_bytes_per_token": mha,
        # the cache stored as kv_cache_dtype (`infer/kv_quant.py`)
        "kv_cache_dtype": kv_cache_dtype,
        "kv_cache_dtype_bytes_per_token": stored,
        "kv_cache_dtype_reduction_vs_latent": latent / stored,
        "kv_cache_dtype_reduction_vs_mha": mha / stored,
        "reference_kv_cache_bytes_per_token": reference,
    }


def compare_kv_cache(config: ModelConfig, other: ModelConfig, kv_cache_dtype: str = "auto") -> dict[str, Any]:
    """KV cache per token of `config` against `other`'s in bf16, and how much less it is (1 - ours / theirs):
    by elements (Table 1's measure), in bf16 bytes, at 6 bits per element (V2's deployment, §3.2.3: the paper's
    93.3% against DeepSeek 67B, paper-facts §2), and as `config`'s cache stores it with `kv_cache_dtype`."""
    ours, theirs = summarize(config, kv_cache_dtype), summarize(other)
    elements, bf16 = theirs["kv_cache_elements_per_token"], theirs["kv_cache_bytes_per_token"]
    six_bit = ours["kv_cache_elements_per_token"] * 6 / 8
    return {
        "elements": [ours["kv_cache_elements_per_token"], elements],
        "elements_reduction": 1 - ours["kv_cache_elements_per_token"] / elements,
        "bf16_bytes": [ours["kv_cache_bytes_per_token"], bf16],
        "bf16_reduction": 1 - ours["kv_cache_bytes_per_token"] / bf16,
        "six_bit_bytes": [six_bit, bf16],
        "six_bit_reduction": 1 - six_bit / bf16,
        "kv_cache_dtype": kv_cache_dtype,
        "kv_cache_dtype_bytes": [ours["kv_cache_dtype_bytes_per_token"], bf16],
        "kv_cache_dtype_reduction": 1 - ours["kv_cache_dtype_bytes_per_token"] / bf16,
    }


def train_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward) at a context of `seq_len`, by PaLM's convention (its
    Appendix B): 6·N for the N matmul parameters a token activates (the active parameters less the norms'
    elementwise scales; the embedding is a lookup), plus 6·l·n_h·(d_qk + d_v)·S for the attention scores and
    the weighted values over the full window of S keys. Mixture-of-experts models pay only for their K routed
    experts, which is where DeepSeek-V2's lower cost per token against a dense model comes from (paper §3.2.3)."""
    s = summarize(config)
    matmul = s["active_params"] - s["elementwise_params"]
    # MLA's naive (training) path: queries of d_h + d_h^R against keys, values of d_h; a variant's head: d_h, d_h
    head = config.qk_head_dim + config.v_head_dim if config.attention == "mla" else 2 * config.attention_head_dim
    attention = config.num_hidden_layers * config.num_attention_heads * head
    return 6 * matmul + 6 * attention * seq_len
