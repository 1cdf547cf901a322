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

Two paths, side by side below. `naive` decompresses k^C and v^C for every attended token: the path for
training and long prefill chunks, and the reference. `absorbed` never decompresses: it folds W_UK into
the query and applies W_UV after attention, so a decode step reads only the latent cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv2 import hardware
from dsv2.config import ModelConfig
from dsv2.model.layers import Linear, RMSNorm, differentiating
from dsv2.model.rope import apply_rope

# Keys per tile when a prefill chunk attends to a long cached prefix (`MLA.attend_in_key_tiles`): past it,
# the chunk's scores would grow with the context (512 queries x 8 heads x 32K keys in fp32 = 512 MiB)
KEY_TILE = 4096
# How many times naive's multiply-adds one of absorbed's costs on a CPU computing in bf16 (`absorbed_is_cheaper`):
# absorbed attends in fp32 there, naive in bf16 through AMX / AVX-512 BF16; measured 3.4-5.5x on V2-Lite's and
# small's shapes (2-core AMX Xeon, torch 2.13: Lite, 128 queries over 640 keys, absorbed 13.9 ms, naive 3.9)
CPU_BF16_ABSORBED_COST = 3


class LayerCache(Protocol):
    """One layer of the caller's latent cache (contiguous or paged: `dsv2.infer.cache`)."""

    def write(self, positions: torch.Tensor, entries: torch.Tensor) -> None: ...  # [B,S], [B,S,D]

    def read(self, span: int) -> torch.Tensor: ...  # latents of positions 0..span-1: [B,span,D]


@dataclass
class CachedRows:
    """Queries x[:, tokens] of a forward and the cache rows they belong to: written at `positions` [B,S],
    attending to cached positions 0..span-1 where `mask` [B,S,span] is true. None: in every row the new
    tokens are the last S of the span, so causal masking is the same for all rows (plain causal from
    position 0, no mask at all for one new token).

    A forward over a batch of rows is one `CachedRows` covering all its tokens; a packed forward (several
    sequences' prefill chunks in one row of tokens, `Transformer.forward(segments=...)`) is one per sequence,
    so the projections and experts run once over all the tokens and only attention runs per sequence."""

    tokens: slice
    cache: LayerCache
    positions: torch.Tensor
    span: int
    mask: torch.Tensor | None


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
            self.wq_a = Linear(c.hidden_size, c.q_lora_rank)
            self.q_norm = RMSNorm(c.q_lora_rank, eps=1e-6)  # reference builds latent norms with eps 1e-6
            self.wq_b = Linear(c.q_lora_rank, q_out)
        else:
            self.wq = Linear(c.hidden_size, q_out)
        self.wkv_a = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim)
        self.kv_norm = RMSNorm(c.kv_lora_rank, eps=1e-6)
        self.wkv_b = nn.Linear(c.kv_lora_rank, self.n_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.wo = Linear(self.n_heads * c.v_head_dim, c.hidden_size)
        # W_UK, W_UV kept by `prepare_for_inference`: a plain attribute, so never a parameter, a buffer or
        # part of the state dict; a copy of wkv_b as it was then, so stale once wkv_b changes
        self.prepared_absorbed: tuple[torch.Tensor, torch.Tensor] | None = None

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,S,d] -> q^C [B,S,H,d_h], rotated q^R [B,S,H,d_h^R]."""
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q_nope, q_pe = q.unflatten(-1, (self.n_heads, -1)).split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,S,d] -> normalised c_KV [B,S,d_c], rotated k^R [B,S,d_h^R]: all a token's KV state."""
        c_kv, k_pe = self.wkv_a(x).split([self.kv_rank, self.rope_dim], dim=-1)
        return self.kv_norm(c_kv), apply_rope(k_pe, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                rows: list[CachedRows] | None = None) -> torch.Tensor:
        """Self-attention of x [B,S,d] (causal). Without a cache: over x itself, naive path.

        With `rows` (where this layer's latent cache keeps each part of x), every part's new latents are
        written at its positions, then its queries attend to its cached prefix through whichever path is
        cheaper for that many queries (`absorbed_is_cheaper`). W_O runs once over all the parts.
        """
        q_nope, q_pe = self.queries(x, cos, sin)
        c_kv, k_pe = self.latents(x, cos, sin)
        if rows is None:
            return self.wo(self.naive(q_nope, q_pe, c_kv, k_pe, None))
        entries = torch.cat([c_kv, k_pe], dim=-1)
        parts = [self.attend(q_nope[:, r.tokens], q_pe[:, r.tokens], entries[:, r.tokens], r) for r in rows]
        return self.wo(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, entries: torch.Tensor, rows: CachedRows,
               ) -> torch.Tensor:
        """Write one part's latents `entries` [B,S,d_c + d_h^R] into its cache, attend over what the cache
        now holds -> [B,S,H·d_v], before W_O."""
        rows.cache.write(rows.positions, entries)
        B, S = q_nope.shape[:2]
        T = rows.span
        history = rows.cache.read(T)  # [B,T,d_c + d_h^R]
        cpu_bf16 = q_nope.device.type == "cpu" and q_nope.dtype == torch.bfloat16
        absorbed, mask = self.absorbed_is_cheaper(S, T, cpu_bf16), rows.mask
        if mask is None and S > 1 and (absorbed or T > S):  # the shared causal mask, aligned to the span's end
            mask = torch.ones(S, T, dtype=torch.bool, device=q_nope.device).tril(T - S).expand(B, S, T)
        if absorbed:
            return self.absorbed(q_nope, q_pe, history, mask)
        # a quantized cache reads back in fp32 (infer/kv_quant.py); decompressing runs in the weights' dtype
        c_kv, k_pe = history.to(q_nope.dtype).split([self.kv_rank, self.rope_dim], dim=-1)
        return self.naive(q_nope, q_pe, c_kv, k_pe, mask)

    def naive(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Decompress k^C, v^C for every attended token (Eqs. 10-11), then ordinary attention (Eqs. 17-19).

        q_* [B,S,H,·]; c_kv [B,T,d_c], k_pe [B,T,d_h^R]; mask [B,S,T] (None: causal with S == T).
        -> the heads' outputs [B,S,H·d_v], before W_O.
        """
        if mask is not None and c_kv.shape[1] > KEY_TILE:
            return self.attend_in_key_tiles(q_nope, q_pe, c_kv, k_pe, mask).flatten(2)
        k_nope, v = self.wkv_b(c_kv).unflatten(-1, (self.n_heads, -1)).split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        # The CPU's flash-attention kernel takes only d_v = d_h + d_h^R; else SDPA falls to its math path, 7-10x
        # slower for a 512-token bf16 chunk (1.6-1.9x in fp32). So v gets zero columns up to q's width there,
        # which add nothing to o, and are cut off after.
        if q.device.type == "cpu" and q.shape[-1] > self.v_dim:
            v = F.pad(v, (0, q.shape[-1] - self.v_dim))
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask.unsqueeze(1),
            is_causal=mask is None and q.shape[1] > 1, scale=self.softmax_scale,
        )  # [B,H,S,v's width]
        return o[..., : self.v_dim].transpose(1, 2).flatten(2)

    def attend_in_key_tiles(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, mask: torch.Tensor,
    ) -> torch.Tensor:
        """The naive path's attention over a long cached prefix, KEY_TILE keys at a time: each tile is
        decompressed, scored and folded into a running softmax (max, sum, weighted values, in fp32), so a
        prefill chunk's memory is bounded by chunk x tile, not chunk x context. -> o [B,S,H,d_v]."""
        q = torch.cat([q_nope, q_pe], dim=-1).float().transpose(1, 2)  # [B,H,S,d_h + d_h^R]
        B, H, S, _ = q.shape
        top = torch.full((B, H, S, 1), float("-inf"), device=q.device)
        total = torch.zeros(B, H, S, 1, device=q.device)
        acc = torch.zeros(B, H, S, self.v_dim, device=q.device)
        for t in range(0, c_kv.shape[1], KEY_TILE):
            tile = slice(t, t + KEY_TILE)
            k_nope, v = self.wkv_b(c_kv[:, tile]).unflatten(-1, (H, -1)).split([self.nope_dim, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_pe[:, tile].unsqueeze(2).expand(-1, -1, H, -1)], dim=-1)
            scores = torch.matmul(q, k.float().permute(0, 2, 3, 1)) * self.softmax_scale  # [B,H,S,tile]
            scores = scores.masked_fill(~mask[:, None, :, tile], float("-inf"))
            new_top = torch.maximum(top, scores.amax(-1, keepdim=True))
            # a row with no visible key yet keeps -inf: exp(-inf - -inf) would be nan, so shift by 0 there
            shift = torch.where(torch.isinf(new_top), torch.zeros_like(new_top), new_top)
            probs = (scores - shift).exp()
            keep = (top - shift).exp()
            total = total * keep + probs.sum(-1, keepdim=True)
            acc = acc * keep + torch.matmul(probs, v.float().transpose(1, 2))
            top = new_top
        return (acc / total).transpose(1, 2).to(q_nope.dtype)

    def absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, history: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        """Attend in latent space (paper appendix C, reference-spec §10): never decompress the cache.

        q^C_h·k^C_h = q^C_h·(W_UK_h c) = (W_UK_hᵀ q^C_h)·c, so W_UK folds into the query; and
        Σ_t p_t W_UV_h c_t = W_UV_h Σ_t p_t c_t, so W_UV applies after attending over the latents.
        All H·S queries then share one key/value "head" of width d_c + d_h^R: multi-query attention,
        written out as two batched matmuls (the cache slices are strided; SDPA would copy them).
        mask [B,S,T] (None: every query sees every key), shared by the H heads of a query.
        -> the heads' outputs [B,S,H·d_v], before W_O.
        """
        B, S, H, _ = q_nope.shape
        w_uk, w_uv = self.absorbed_weights()
        dtype = q_nope.dtype
        q_latent = torch.einsum("bshd,hcd->bshc", q_nope.to(w_uk.dtype), w_uk)
        q = torch.cat([q_latent, q_pe], dim=-1).flatten(1, 2)  # [B,S·H,d_c + d_h^R]
        if history.device.type == "cpu":
            # On CPUs without native bf16 (AVX2) half-precision GEMMs that reduce over the T cached tokens
            # are very slow (torch 2.13: 132 ms for 16 heads x 8K tokens in bf16 against 5 ms in fp32,
            # upcast included), so attend in fp32: one upcast of the latents read (none for a quantized
            # cache, which decodes to fp32), and more accurate too.
            q, history = q.float(), history.float()
        else:
            history = history.to(q.dtype)
        scores = torch.matmul(q, history.transpose(1, 2)) * self.softmax_scale  # [B,S·H,T]
        if mask is not None:  # broadcast over the heads, never copied per head
            scores = scores.view(B, S, H, -1).masked_fill(~mask.unsqueeze(2), float("-inf")).flatten(1, 2)
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        o_latent = torch.matmul(probs, history[..., : self.kv_rank]).to(w_uv.dtype)  # [B,S·H,d_c]
        o = torch.einsum("bshc,hvc->bshv", o_latent.view(B, S, H, self.kv_rank), w_uv)
        return o.flatten(2).to(dtype)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK, W_UV: the copies `prepare_for_inference` made, unless there are none or this forward
        differentiates through wkv_b; then split out of it now (one copy of wkv_b per call)."""
        if self.prepared_absorbed is not None and not differentiating(self.wkv_b.weight):
            return self.prepared_absorbed
        return self.split_wkv_b()

    def split_wkv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UKᵀ [H,d_c,d_h] and W_UV [H,d_v,d_c] out of wkv_b, as contiguous tensors (as strided views of
        wkv_b the CPU batched matmuls of `absorbed` run 3-30x slower). Both are laid out as a GEMV's rows, an
        output's d_h or d_c inputs side by side, so a decode step's batched GEMV per head (B·S rows) reads them
        front to back: with W_UK as wkv_b holds it, [H,d_h,d_c], the graph's reduction over d_h strode 2 KiB
        a step and read it at a third of the rate (V2-Lite-4 w4a8 compiled, batch 1, 2-core Zen 4: 16.2 ->
        14.7 ms a step). They keep the weight's dtype, except bf16 on a CPU without native bf16, where they
        are fp32 (bf16 GEMMs there are several times slower; `dsv2.hardware`): in bf16 rather than fp32 the
        same step is 14.0 ms, and the eager one 38.9 -> 34.2."""
        # a block-FP8 or int4/int8 wkv_b is dequantized here, once per split
        weight = self.wkv_b.dequantized() if hasattr(self.wkv_b, "dequantized") else self.wkv_b.weight
        w_ukv = weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        dtype = weight.dtype
        if dtype == torch.bfloat16 and weight.device.type == "cpu" and not hardware.has_native_bf16():
            dtype = torch.float32
        w_uk, w_uv = w_ukv[:, : self.nope_dim].transpose(1, 2), w_ukv[:, self.nope_dim :]
        return w_uk.to(dtype).contiguous(), w_uv.to(dtype).contiguous()

    @torch.no_grad()
    def prepare_for_inference(self) -> None:
        """Split wkv_b once for every later absorbed step (see `Transformer.prepare_for_inference`)."""
        self.prepared_absorbed = self.split_wkv_b()

    def absorbed_is_cheaper(self, n_queries: int, n_keys: int, cpu_bf16: bool = False) -> bool:
        """Which path costs fewer multiply-adds for S = n_queries queries over T = n_keys keys, per head:

            absorbed  S·d_c·(d_h + d_v)   W_UK into the queries, W_UV onto the outputs  + S·T·(2·d_c + d_h^R)
            naive     T·d_c·(d_h + d_v)   every key decompressed                       + S·T·(d_h + d_h^R + d_v)

        So a decode step (S = 1) absorbs, a fresh prefill (T = S) never does (its first terms are equal and
        2·d_c > d_h + d_v), and a short chunk over a long cached prefix does. `cpu_bf16`: on a CPU computing
        in bf16, absorbed runs in fp32 (`absorbed`) while naive decompresses and attends in bf16 at the matrix
        units' speed, so for S > 1 absorbed's count weighs CPU_BF16_ABSORBED_COST times."""
        S, T = n_queries, n_keys
        if S == 1:
            return True
        up = self.kv_rank * (self.nope_dim + self.v_dim)
        absorbed = S * up + S * T * (2 * self.kv_rank + self.rope_dim)
        naive = T * up + S * T * (self.nope_dim + self.rope_dim + self.v_dim)
        return absorbed * (CPU_BF16_ABSORBED_COST if cpu_bf16 else 1) < naive
