"""MHA, GQA and MQA with RoPE: the attention MLA is measured against (paper §2.1.1, Table 1; Appendix D.1).

One module for the three, chosen by `ModelConfig.attention`: H query heads share n_kv key/value heads
(`num_key_value_heads`) in groups of H / n_kv; MHA is n_kv = H, MQA n_kv = 1, GQA anything between.
Llama's layout and conventions, so DeepSeek LLM's LlamaForCausalLM checkpoints load as they are:

    q = RoPE(W_Q x)  [B,S,H,d_h]     k = RoPE(W_K x), v = W_V x  [B,S,n_kv,d_h]   (wq, wk, wv = q/k/v_proj)
    o_h = softmax(q_h·k_g / sqrt(d_h)) v_g,   g = h // (H / n_kv)                   (§2.1.1's MHA, k, v shared)
    out = W_O [o_1 ; ... ; o_H]                                                   (wo = o_proj)

RoPE covers all d_h channels of a head and rotates halves (channel i with i + d_h/2, Llama's
`rotate_half`), not MLA's interleaved pairs. With YaRN in a DeepSeek-layout config the softmax scale gains
mscale² as MLA's does (`ModelConfig.softmax_scale`), so a variant differs from MLA in attention alone.

The KV cache holds per layer and token the n_kv rotated keys and the n_kv values, one entry
[k_1 .. k_n_kv | v_1 .. v_n_kv] of 2·n_kv·d_h values (Table 1's 2·n_g·d_h·l over l layers), behind the same
`LayerCache` interface as MLA's latents: the caches, the engine and packed prefill serve both unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.layers import Linear
from dsv2.model.mla import CachedRows
from dsv2.model.rope import apply_rope


class GroupedQueryAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.attention_head_dim
        self.softmax_scale = c.softmax_scale
        self.wq = Linear(c.hidden_size, self.n_heads * self.head_dim)
        self.wk = Linear(c.hidden_size, self.n_kv * self.head_dim)
        self.wv = Linear(c.hidden_size, self.n_kv * self.head_dim)
        self.wo = Linear(self.n_heads * self.head_dim, c.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                rows: list[CachedRows] | None = None) -> torch.Tensor:
        """Self-attention of x [B,S,d] (causal). Without a cache: over x itself.

        With `rows` (where this layer's cache keeps each part of x), every part's keys and values are
        written at its positions, then its queries attend to its cached prefix. W_O runs once over all parts.
        """
        q = apply_rope(self.wq(x).unflatten(-1, (self.n_heads, self.head_dim)), cos, sin, interleaved=False)
        k = apply_rope(self.wk(x).unflatten(-1, (self.n_kv, self.head_dim)), cos, sin, interleaved=False)
        v = self.wv(x).unflatten(-1, (self.n_kv, self.head_dim))
        if rows is None:
            return self.wo(self.attention(q, k, v, None))
        entries = torch.cat([k.flatten(2), v.flatten(2)], dim=-1)  # [B,S,2·n_kv·d_h]
        parts = [self.attend(q[:, r.tokens], entries[:, r.tokens], r) for r in rows]
        return self.wo(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))

    def attend(self, q: torch.Tensor, entries: torch.Tensor, rows: CachedRows) -> torch.Tensor:
        """Write one part's entries [B,S,2·n_kv·d_h] into its cache, attend over what the cache now holds
        -> [B,S,H·d_h], before W_O."""
        rows.cache.write(rows.positions, entries)
        B, S = q.shape[:2]
        T = rows.span
        k, v = rows.cache.read(T).unflatten(-1, (2, self.n_kv, self.head_dim)).unbind(2)  # [B,T,n_kv,d_h] each
        mask = rows.mask
        if mask is None and 1 < S < T:  # the shared causal mask, aligned to the span's end
            mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(T - S).expand(B, S, T)
        return self.attention(q, k, v, mask)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  ) -> torch.Tensor:
        """q [B,S,H,d_h], k and v [B,T,n_kv,d_h]; mask [B,S,T] (None: causal when S == T, all keys when S == 1),
        broadcast over the heads. -> [B,S,H·d_h].

        No key or value is repeated per query head. Causal self-attention uses SDPA's `enable_gqa`; against a
        cache (a mask, or one query) the G = H / n_kv query heads of a group become G·S queries of its one
        key/value head, as MLA's absorbed path does: one plain attention per key/value head (a decode step of
        8 rows over 8K cached tokens, 8 heads over 2, d_h 128, fp32, one CPU thread: 16 ms, `enable_gqa` 40 ms)."""
        B, S, H, d = q.shape
        if mask is None and S > 1:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                               scale=self.softmax_scale, enable_gqa=self.n_kv != H)  # [B,H,S,d_h]
            return o.transpose(1, 2).flatten(2)
        G = H // self.n_kv
        q = q.view(B, S, self.n_kv, G, d).permute(0, 2, 3, 1, 4).reshape(B, self.n_kv, G * S, d)
        if mask is not None:  # [B,S,T] -> [B,1,G·S,T]: the same rows for each query head of a group
            mask = mask[:, None, None].expand(B, 1, G, S, mask.shape[-1]).reshape(B, 1, G * S, -1)
        o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           scale=self.softmax_scale)  # [B,n_kv,G·S,d_h]
        return o.view(B, self.n_kv, G, S, d).permute(0, 3, 1, 2, 4).flatten(2)

    def prepare_for_inference(self) -> None:
        """Nothing to prepare: inference reads the weights as they are (`Transformer.prepare_for_inference`)."""
