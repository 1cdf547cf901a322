"""The latent KV cache: all MLA needs to remember about a token (paper §2.1.2, Table 1).

Per layer and per cached token it holds the normalised latent c_KV (kv_lora_rank values) followed by the
rotated shared RoPE key k^R (qk_rope_head_dim values): 576 numbers for DeepSeek-V2, nothing per head. Keys
and values are never stored decompressed. A model with an attention variant (`model/attention_variants.py`)
stores its entries in the same caches: [n_kv rotated keys | n_kv values], 2·n_kv·d_h numbers
(`ModelConfig.kv_cache_dim`; 2,048 for DeepSeek 67B).

Two layouts, one interface (what `Transformer.forward` and `MLA.forward` use):

    cache.lengths [B]            tokens already cached per row; the new tokens go at lengths..lengths+S-1
    cache.capacity               positions a row can hold
    cache.layer(i).write(positions [B,S], entries [B,S,D])   store the new tokens' latents
    cache.layer(i).read(span) -> [B,span,D]                  latents of positions 0..span-1
    cache.row(j)                 row j alone, on the same storage (a packed forward attends row by row)

- `LatentCache`: one contiguous [layer, row, position, D] tensor; simple, the slow twin.
- `PagedLatentCache`: a pool of fixed-size blocks [layer, block, slot, D] shared by all sequences, each
  sequence owning a list of blocks (its block table), so memory is taken as sequences grow and given back
  the moment they finish; `PagedLatentCache.view(tables, lengths)` is the batch the model sees. Which
  block belongs to whom is decided by the scheduler (`infer/scheduler.py`), not here.

Both store each entry through a `CacheLayout` (`infer/kv_quant.py`, chosen by `kv_cache_dtype`): "auto"
keeps the entries in the compute dtype; "fp8" and "6bit" keep quantized bytes (the pool is uint8 [..., bytes
per entry]), encoded by `write` and decoded by `read` into the compute dtype, so the model is unchanged.

The cache is owned by the caller (engine or generate loop); the model writes into it and the caller
advances `lengths`.
"""

from __future__ import annotations

import torch

from dsv2.config import ModelConfig
from dsv2.infer.kv_quant import CacheLayout, cache_layout


class _ContiguousLayer:
    def __init__(self, kv: torch.Tensor, layout: CacheLayout):
        self.kv, self.layout = kv, layout  # [B, max_len, layout.width]

    def write(self, positions: torch.Tensor, entries: torch.Tensor) -> None:
        rows = torch.arange(entries.shape[0], device=entries.device)[:, None]
        self.kv[rows, positions] = self.layout.encode(entries)

    def read(self, span: int) -> torch.Tensor:
        return self.layout.decode(self.kv[:, :span])


class LatentCache:
    """Contiguous: row b's position p of layer l lives at kv[l, b, p]."""

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int,
        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", kv_cache_dtype: str = "auto",
    ):
        self.layout = cache_layout(kv_cache_dtype, config, dtype)
        self.kv = torch.zeros(config.num_hidden_layers, batch_size, max_len, self.layout.width,
                              dtype=self.layout.storage_dtype, device=device)  # [layer, row, position, c_KV | k^R]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self.kv.shape[2]

    def layer(self, i: int) -> _ContiguousLayer:
        return _ContiguousLayer(self.kv[i], self.layout)

    def row(self, j: int) -> LatentCache:
        row = object.__new__(LatentCache)
        row.layout, row.kv, row.lengths = self.layout, self.kv[:, j : j + 1], self.lengths[j : j + 1]
        return row

    def positions(self, n_new: int) -> torch.Tensor:
        """Positions [B, n_new] of the next n_new tokens of every row."""
        return self.lengths[:, None] + torch.arange(n_new, device=self.lengths.device)

    def advance(self, n: int | torch.Tensor) -> None:
        self.lengths += n

    def bytes_per_token(self) -> int:
        return self.kv.shape[0] * self.kv.shape[-1] * self.kv.element_size()

    def bytes_in_use(self) -> int:
        """layers × bytes per entry (auto: (kv_lora_rank + qk_rope_head_dim) × bytes per element) × cached tokens."""
        return int(self.lengths.sum()) * self.bytes_per_token()

    def bytes_allocated(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class _PagedLayer:
    def __init__(self, pool: torch.Tensor, index: int, tables: torch.Tensor, layout: CacheLayout):
        # the whole pool [layer, n_blocks, block_size, layout.width] and this layer's index; tables [B, blocks per row]
        self.pool, self.index, self.tables = pool, index, tables
        self.layout = layout

    def write(self, positions: torch.Tensor, entries: torch.Tensor) -> None:
        # indexed on the whole pool, not on the view pool[index]: a compiled graph (`infer/compiled.py`) writes
        # into its input in place only so; through the view it copies the layer (torch 2.13)
        block_size = self.pool.shape[2]
        blocks = self.tables.gather(1, positions // block_size)
        self.pool.index_put_((torch.full_like(blocks, self.index), blocks, positions % block_size),
                             self.layout.encode(entries))

    def read(self, span: int) -> torch.Tensor:
        # one gather of the rows' blocks in order: positions 0..span-1 become contiguous again. Table
        # entries past a row's own blocks are padding (block 0) and only reach masked-out positions.
        block_size = self.pool.shape[2]
        n_blocks = -(-span // block_size)
        gathered = self.pool[self.index][self.tables[:, :n_blocks]]  # [B, n_blocks, block_size, width]
        return self.layout.decode(gathered.flatten(1, 2)[:, :span])


class PagedLatentCache:
    """A pool of `num_blocks` blocks of `block_size` token slots per layer, each slot one entry stored
    as `kv_cache_dtype`'s layout says: [layer, block, slot, layout.width] of `layout.storage_dtype`."""

    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int = 16,
        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", kv_cache_dtype: str = "auto",
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a paged cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.layout = cache_layout(kv_cache_dtype, config, dtype)
        self.pool = torch.zeros(config.num_hidden_layers, num_blocks, block_size, self.layout.width,
                                dtype=self.layout.storage_dtype, device=device)

    @property
    def num_blocks(self) -> int:
        return self.pool.shape[1]

    def view(self, tables: list[list[int]], lengths: list[int], min_width: int = 1) -> PagedBatch:
        """The batch of rows whose blocks are `tables` (in position order) with `lengths` tokens cached, the
        tables padded with block 0 to the longest of them, and to at least `min_width` blocks."""
        width = max(min_width, *(len(t) for t in tables))
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        device = self.pool.device
        return PagedBatch(self.pool, padded.to(device), torch.tensor(lengths, dtype=torch.long, device=device),
                          self.layout)

    def bytes_per_token(self) -> int:
        return self.pool.shape[0] * self.pool.shape[-1] * self.pool.element_size()

    def bytes_per_block(self) -> int:
        return self.bytes_per_token() * self.block_size

    def bytes_allocated(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    @staticmethod
    def blocks_for(config: ModelConfig, cache_bytes: int, block_size: int, dtype: torch.dtype,
                   kv_cache_dtype: str = "auto") -> int:
        """How many blocks a memory budget of `cache_bytes` buys with entries stored as `kv_cache_dtype`."""
        per_entry = cache_layout(kv_cache_dtype, config, dtype).bytes_per_token_per_layer()
        return cache_bytes // (config.num_hidden_layers * per_entry * block_size)


class PagedBatch:
    """Rows of a `PagedLatentCache`, as `Transformer.forward` sees them."""

    def __init__(self, pool: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor, layout: CacheLayout):
        self.pool, self.tables, self.lengths, self.layout = pool, tables, lengths, layout

    @property
    def capacity(self) -> int:
        return self.tables.shape[1] * self.pool.shape[2]

    def layer(self, i: int) -> _PagedLayer:
        return _PagedLayer(self.pool, i, self.tables, self.layout)

    def row(self, j: int) -> PagedBatch:
        return PagedBatch(self.pool, self.tables[j : j + 1], self.lengths[j : j + 1], self.layout)

    def positions(self, n_new: int) -> torch.Tensor:
        return self.lengths[:, None] + torch.arange(n_new, device=self.lengths.device)
