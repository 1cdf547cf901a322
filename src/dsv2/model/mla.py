"""Multi-head Latent Attention (paper §2.1, Eqs. 9-19).

Symbols (shapes use B batch, S new tokens, T attended tokens, H heads):
    d      hidden_size                 d_c    kv_lora_rank (latent that the KV cache holds)
    d_h    qk_nope_head_dim            d'_c   q_lora_rank (None: queries are not compressed)
    d_h^R  qk_rope_head_dim            d_v    v_head_dim

    c_Q     = q_norm(W_DQ x)                          [B,S,d'_c]     Eq. 12 (wq_a, q_norm)
    q^C,q^R = split(W_UQ c_Q), q^R = RoPE(q^R)        [B,S,H,d_h|d_h^R]  Eqs. 13, 15 (wq_b)
    c_KV    = kv_norm(W_DKV x)                        [B,S,d_c]      Eq. 9 (wkv_a rows [:d_c], kv_norm)
    k^R     = RoPE(W_KR x)                            [B,S,d_h^R]    Eq. 17 (wkv_a rows [d_c:]), shared by heads
    k^C,v^C = split(W_UK c_KV | W_UV c_KV)            [B,S,H,d_h|d_v]  Eqs. 10-11 (wkv_b)
    o_h     = softmax(q_h·k_h / sqrt(d_h + d_h^R) · mscale²) v^C_h,  k_h = [k^C_h ; k^R]   Eqs. 18-19
    out     = W_O [o_1 ; ... ; o_H]                   (wo)

The naive path below decompresses k^C and v^C for every attended token: it is the path for training and
the reference the absorbed decode path is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.layers import RMSNorm
from dsv2.model.rope import apply_rope


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads = c.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_rank = c.kv_lora_rank
        self.softmax_scale = c.softmax_scale
        q_out = self.n_heads * c.qk_head_dim
        if c.q_lora_rank:
            self.wq_a = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(c.q_lora_rank, eps=1e-6)  # reference builds latent norms with eps 1e-6
            self.wq_b = nn.Linear(c.q_lora_rank, q_out, bias=False)
        else:
            self.wq = nn.Linear(c.hidden_size, q_out, bias=False)
        self.wkv_a = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(c.kv_lora_rank, eps=1e-6)
        self.wkv_b = nn.Linear(c.kv_lora_rank, self.n_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * c.v_head_dim, c.hidden_size, bias=False)

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,S,d] -> q^C [B,S,H,d_h], rotated q^R [B,S,H,d_h^R]."""
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q_nope, q_pe = q.unflatten(-1, (self.n_heads, -1)).split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,S,d] -> normalised c_KV [B,S,d_c], rotated k^R [B,S,d_h^R]: all a token's KV state."""
        c_kv, k_pe = self.wkv_a(x).split([self.kv_rank, self.rope_dim], dim=-1)
        return self.kv_norm(c_kv), apply_rope(k_pe, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over the S tokens of x [B,S,d] (naive: decompress K and V)."""
        q_nope, q_pe = self.queries(x, cos, sin)
        c_kv, k_pe = self.latents(x, cos, sin)
        k_nope, v = self.wkv_b(c_kv).unflatten(-1, (self.n_heads, -1)).split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=x.shape[1] > 1, scale=self.softmax_scale,
        )  # [B,H,S,d_v]
        return self.wo(o.transpose(1, 2).flatten(2))
