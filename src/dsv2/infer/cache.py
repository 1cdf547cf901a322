"""The latent KV cache: all MLA needs to remember about a token (paper §2.1.2, Table 1).

Per layer, per sequence slot and per position it holds the normalised latent c_KV (kv_lora_rank values)
followed by the rotated shared RoPE key k^R (qk_rope_head_dim values): 576 numbers for DeepSeek-V2,
nothing per head. Keys and values are never stored decompressed.

The cache is owned by the caller (engine or generate loop) and passed to `Transformer.forward`, which
writes the new tokens' latents at their positions; the caller advances `lengths`.
"""

from __future__ import annotations

import torch

from dsv2.config import ModelConfig


class LatentCache:
    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int,
        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    ):
        self.config = config
        self.max_len = max_len
        # [layer, slot, position, c_KV | k^R]
        self.kv = torch.zeros(config.num_hidden_layers, batch_size, max_len, config.kv_cache_dim,
                              dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.kv.shape[1]

    def rows(self, start: int, stop: int) -> LatentCache:
        """A view of slots [start, stop): writes through it land in this cache."""
        view = LatentCache.__new__(LatentCache)
        view.config, view.max_len = self.config, self.max_len
        view.kv, view.lengths = self.kv[:, start:stop], self.lengths[start:stop]
        return view

    def layer(self, i: int) -> torch.Tensor:
        return self.kv[i]

    def positions(self, n_new: int) -> torch.Tensor:
        """Positions [B, n_new] of the next n_new tokens of every slot."""
        return self.lengths[:, None] + torch.arange(n_new, device=self.lengths.device)

    def advance(self, n: int | torch.Tensor) -> None:
        self.lengths += n

    def move(self, src: int, dst: int) -> None:
        """Copy slot src into slot dst (used to keep the active slots of a batch contiguous)."""
        self.kv[:, dst] = self.kv[:, src]
        self.lengths[dst] = self.lengths[src]

    def bytes_per_token(self) -> int:
        return self.kv.shape[0] * self.kv.shape[-1] * self.kv.element_size()

    def bytes_in_use(self) -> int:
        """layers × (kv_lora_rank + qk_rope_head_dim) × bytes per element × cached tokens."""
        return int(self.lengths.sum()) * self.bytes_per_token()

    def bytes_allocated(self) -> int:
        return self.kv.numel() * self.kv.element_size()
