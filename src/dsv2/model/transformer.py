"""The decoder: embedding -> N pre-norm blocks (MLA or an attention variant, then dense MLP or DeepSeekMoE)
-> norm -> LM head."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.attention_variants import GroupedQueryAttention
from dsv2.model.layers import MLP, Linear, RMSNorm
from dsv2.model.mla import MLA, CachedRows, LayerCache
from dsv2.model.moe import MoE, Routing
from dsv2.model.rope import RotaryEmbedding


class Cache(Protocol):
    """The caller's latent cache for a batch of rows (`dsv2.infer.cache`: contiguous or paged)."""

    lengths: torch.Tensor  # [B] tokens cached per row

    @property
    def capacity(self) -> int: ...  # positions a row can hold

    def positions(self, n_new: int) -> torch.Tensor: ...  # [B, n_new] next positions of every row

    def layer(self, i: int) -> LayerCache: ...

    def row(self, j: int) -> Cache: ...  # row j alone, on the same storage


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = MLA(config) if config.attention == "mla" else GroupedQueryAttention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: list[CachedRows] | None = None,
                replay: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing | None]:
        """-> (h after the block, the MoE layer's routing or None for a dense layer)."""
        h = h + self.attn(self.attn_norm(h), cos, sin, rows)
        x = self.ffn_norm(h)
        if isinstance(self.ffn, MoE):
            y, routing = self.ffn(x, replay)
            return h + y, routing
        return h + self.ffn(x), None


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = Linear(config.hidden_size, config.vocab_size)
        self.rope = RotaryEmbedding(config)
        self.inference_version = 0  # counts `prepare_for_inference` calls: cached latents older than it are stale

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: Cache | None = None,
        logits_index: torch.Tensor | None = None, return_routing: bool = False, replay: torch.Tensor | None = None,
        segments: Sequence[int] | None = None, span: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[Routing]]:
        """tokens [B,S] -> logits [B,S,vocab] in the model dtype.

        positions: [B,S] or [S]; default 0..S-1, or each slot's next positions when a cache is given.
        cache: the caller's latent cache (B rows); the tokens' latents are written into it at their
            positions and attention covers everything cached up to each query's position. The caller
            advances `cache.lengths`.
        segments: packing. tokens [1,N] are several sequences' next tokens end to end: the first
            segments[0] are row 0's of `cache`, the next segments[1] row 1's, and so on (sum = N). Every
            projection and expert runs once over all N tokens; attention runs per sequence over its own
            cache row. No padding, so nothing but real tokens reaches the cache or the experts. Equal parts
            (a batch of equal prompts' chunks) run as the batch [R, N/R] they are, so attention is one
            batched call per layer instead of R (nano, 8 x 128 tokens: 25.6 -> 22.3 ms); the result is the same.
        logits_index: the one position per row whose logits to return: [B] along S ([B,vocab]), or with
            `segments` [R] along the packed N ([R,vocab]); prefill needs only the last prompt token's, and
            the full [B,S,vocab] can be large.
        return_routing: also return each MoE layer's `Routing` (router scores and choices, and which
            slots token dropping kept), in layer order: what `dsv2.train.balance` computes its losses from.
        replay: [B,S,L,K] the experts each token is to be routed to in each of the L MoE layers (layer
            order), instead of the router's own top-k: routing replay for RL (`Gate.forward`).
        span: how many cached positions every row's attention reads, each query seeing those up to its own
            position (a mask). Default: the largest position + 1, which the host must read off `positions`;
            a compiled decode step (`dsv2.infer.compiled`) passes the cache's capacity, whatever the rows hold.
            Not with `segments`.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        B, S = tokens.shape
        packed = segments is not None
        as_rows = False  # equal packed parts run as the batch of rows they are
        if packed:
            if span is not None:
                raise ValueError("span is for a batch of rows; a packed forward's parts attend to their own rows")
            if cache is None or B != 1 or sum(segments) != S or len(segments) != len(cache.lengths):
                raise ValueError(f"segments {list(segments)} must split tokens [1, N] over the cache's rows, "
                                 f"got tokens {tuple(tokens.shape)}")
            if len(set(segments)) == 1:  # equal parts: the same forward as a batch of rows, attention batched too
                as_rows = True
                B, S = len(segments), segments[0]
                tokens = tokens.view(B, S)
                replay = None if replay is None else replay.view(B, S, *replay.shape[2:])
                segments = None
        if segments is not None:
            parts = [(cache.row(j), n) for j, n in enumerate(segments)]
            positions = torch.cat([row.positions(n) for row, n in parts], dim=1)  # [1,N]
        elif positions is None:
            positions = cache.positions(S) if cache is not None else torch.arange(S, device=tokens.device)
        cos, sin = self.rope(positions)
        attended = None  # per part of the tokens: (tokens, cache rows, positions, span, mask)
        if cache is not None:
            if segments is None:
                attended = [self._attended(slice(None), cache, positions.expand(B, S), span)]
            else:
                starts = [0, *itertools.accumulate(segments)]  # part j is tokens starts[j]:starts[j + 1]
                attended = [self._attended(slice(a, b), row, positions[:, a:b])
                            for (row, _), a, b in zip(parts, starts[:-1], starts[1:], strict=True)]
        h = self.embed(tokens)
        if replay is not None and replay.shape[:2] != (B, S):
            raise ValueError(f"replay must be [batch, seq, moe layers, k] = [{B}, {S}, ...], got {tuple(replay.shape)}")
        routings = []
        for i, layer in enumerate(self.layers):
            moe_replay = None if replay is None or not isinstance(layer.ffn, MoE) else replay[:, :, len(routings)]
            rows = None if attended is None else [
                CachedRows(part, rows_cache.layer(i), at, span, mask) for part, rows_cache, at, span, mask in attended]
            h, routing = layer(h, cos, sin, rows, moe_replay)
            if routing is not None:
                routings.append(routing)
        if as_rows:  # back to the packed layout [1, N]
            h = h.reshape(1, B * S, -1)
            routings = [Routing(r.scores.reshape(1, B * S, -1), r.indices.reshape(1, B * S, -1),
                                None if r.kept is None else r.kept.reshape(1, B * S, -1)) for r in routings]
        if logits_index is not None:
            h = h[0, logits_index] if packed else h[torch.arange(B, device=h.device), logits_index]
        logits = self.head(self.norm(h))
        return (logits, routings) if return_routing else logits

    @staticmethod
    def _attended(tokens: slice, cache: Cache, positions: torch.Tensor, span: int | None = None,
                  ) -> tuple[slice, Cache, torch.Tensor, int, torch.Tensor | None]:
        """What rows `cache` of the tokens at `positions` [B,S] attend to: the span of cached positions and
        the mask, None when every row's new tokens end the span (then causal masking is the same for all).
        A span given is taken as it is, with its mask, and nothing is read back from the device."""
        S = positions.shape[1]
        given = span is not None
        span = span if given else int(positions.max()) + 1
        if span > cache.capacity:
            raise ValueError(f"span {span} (the positions' or the one given) exceeds a cache of {cache.capacity}")
        mask = None
        if given or not bool((positions == torch.arange(span - S, span, device=positions.device)).all()):
            mask = torch.arange(span, device=positions.device) <= positions.unsqueeze(-1)  # [B,S,span]
        return tokens, cache, positions, span, mask

    def prepare_for_inference(self) -> None:
        """Make the inference-only layouts of the weights once, where they are: W_UK / W_UV split out of
        every wkv_b (absorbed attention), an fp32 copy of every router weight, quantized experts' operands
        stacked for the fused kernels (the modules then hold views of the stacks), and the RoPE frequencies
        on the model's device. The engine calls this once; without it the same layouts are computed on the
        fly, with the same values, and a forward that differentiates through a weight always computes them
        from it.

        They are plain attributes made from the weights as they are now: not parameters or buffers, never
        in the state dict or a checkpoint, and not kept in step with the weights. Whatever changes the
        weights afterwards (an optimizer step, `load_state_dict`, in-place edits, `.to()`) invalidates
        them: prepare again. Preparing again is always safe; it replaces them, and tells an engine caching
        prompt prefixes (`inference_version`) that latents computed before are stale.
        """
        self.inference_version += 1
        self.rope.prepare_for_inference(self.embed.weight.device)
        for block in self.layers:
            block.attn.prepare_for_inference()
            if isinstance(block.ffn, MoE):
                block.ffn.gate.prepare_for_inference()
                block.ffn.experts.prepare_for_inference()

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """The one place parameters are initialised: N(0, std) for matrices, ones for norms."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
