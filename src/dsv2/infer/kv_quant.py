"""Latent-cache quantization: how one token's [c_KV | k^R] entry of one layer is stored (`kv_cache_dtype`).

A `CacheLayout` turns entries [..., D] (D = kv_lora_rank + qk_rope_head_dim) into what the cache pool stores
per token per layer and back. The pool holds `layout.width` elements of `layout.storage_dtype` per entry;
`write` encodes the new entries and `read` decodes the attended ones (into fp32 for a quantized layout), so
MLA (absorbed and naive paths alike) never sees the storage format. An attention variant's [keys | values] entries
(`model/attention_variants.py`) are stored as "auto" only.

    "auto"  the model dtype, unchanged: D values (bf16: 2·576 = 1152 B for DeepSeek-V2)
    "fp8"   vLLM's fp8_ds_mla: 656 B for V2's dims
    "6bit"  the paper's "6 bits per element on average" (§2.1.2): 430 B for V2's dims (≤ 576·6/8 = 432)

The bytes per token over V2's 60 layers: auto (bf16) 69,120; fp8 39,360; 6bit 25,800 (paper: 25,920).

Byte layouts per token per layer, V2's dims (kv_lora_rank d_c = 512, qk_rope_head_dim d_h^R = 64):

    fp8   | c_KV: 512 × e4m3 | 4 × fp32 scale | k^R: 64 × bf16 |                     = 512 + 16 + 128 = 656
            one scale per 128 values of c_KV, scale = amax / 448 (e4m3's largest value)

    6bit  | c_KV: 512 × int6 packed | 4 × scale byte | k^R: 64 × int5 packed | 2 × scale byte | = 384+4+40+2 = 430
            c_KV: symmetric ints in [-31, 31], one scale per 128 values
            k^R:  symmetric ints in [-15, 15], one scale per 32 values
            scale byte s: scale = 2^((s - 128)/8), a log-scale on a 1/8-octave grid (`IntGroups`)

Groups never straddle c_KV and k^R: the two differ in scale (c_KV is RMS-normalised, k^R a rotated
projection). Other dims get the same scheme: the last group of a part may be shorter (padded with zeros
when encoded), so bytes follow from the dims (`bytes_per_token_per_layer`).

Why this "6bit" layout: 432 B at 6 bits per value leaves nothing for scales, so k^R (1/9 of the entry)
drops to 5 bits, which frees 48 bits for scales. Candidates, all ≤ 432 B at V2's dims, relative RMS error
of c_KV / k^R on the cache entries of a randomised model with V2's latent dims (and, in brackets, the same
model with 1/32 of the kv_norm channels and 4 of the k^R rows scaled up 5-6x, as outlier channels):

    c_KV int6 per 128, e8m0 (power-of-two) scale + k^R int5 per 32, e8m0   430 B  0.043 / 0.065  (0.090 / 0.109)
    c_KV int6 per 256, fp16 scale            + k^R int5 per 64, fp16   430 B  0.034 / 0.050  (0.075 / 0.091)
    c_KV int6 per 256, fp16 scale            + k^R int5 per 32, fp16   432 B  0.034 / 0.045  (0.075 / 0.073)
    c_KV int6 per 128, 1/8-octave byte       + k^R int5 per 32, ditto  430 B  0.032 / 0.048  (0.064 / 0.077)  chosen
    (fp8, 656 B, for comparison:                                              0.025 / 0.002  (0.022 / 0.002))

A power-of-two scale wastes up to half the code range (0.5 bit on average); fp16 scales waste none but
cost two bytes, so groups must be twice as large; one byte on a 1/8-octave grid wastes at most 8% of the
range and keeps groups small, which matters most with outlier channels.

Packed ints are stored offset-binary (code + 2^(bits-1)), little-endian within each run of 8 codes: 8 codes
of b bits fill exactly b bytes. Packing and unpacking are shifts over whole tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv2.config import ModelConfig

KV_CACHE_DTYPES = ("auto", "fp8", "6bit")
FP8_MAX = 448.0  # largest float8_e4m3fn value
_FP8_IN_FP32_BITS = 0x87F00000 - (1 << 32)  # fp32's sign bit and the 7 bits below its exponent's top 4, as int32


def check_kv_cache_dtype(kv_cache_dtype: str) -> str:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                         f"got {kv_cache_dtype!r}")
    return kv_cache_dtype


# ------------------------------------------------------------------------------------------ bit packing
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., n] of unsigned `bits`-bit ints -> uint8 [..., ceil(n/8)·bits]: each run of 8 codes as one
    8·bits-bit little-endian number (≤ 64 bits: it fits an int64), cut into its bytes."""
    n = codes.shape[-1]
    codes = torch.nn.functional.pad(codes.to(torch.int64), (0, -n % 8)).unflatten(-1, (-1, 8))
    shifts = torch.arange(8, device=codes.device) * bits
    words = (codes << shifts).sum(-1, keepdim=True)  # disjoint bit ranges: the sum is an OR
    out = (words >> (torch.arange(bits, device=codes.device) * 8)) & 0xFF  # [..., n/8, bits]
    return out.to(torch.uint8).flatten(-2)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack_bits`: uint8 [..., ceil(n/8)·bits] -> integer codes [..., n].

    A run's first c codes are the little-endian number of its first c·bits/8 bytes whenever c·bits is a
    multiple of 8, so the bytes are read in the shortest such words (6 bits: 4 codes in 3 bytes), in int32
    where a word fits (every width but 5 and 7 bits), which reads the cache at a third of int64's cost."""
    codes_per_word = 8 // math.gcd(8, bits)
    word_bytes = codes_per_word * bits // 8
    dtype = torch.int32 if codes_per_word * bits < 32 else torch.int64
    runs = packed.unflatten(-1, (-1, word_bytes))
    words = runs[..., 0].to(dtype)
    for j in range(1, word_bytes):
        words |= runs[..., j].to(dtype) << (8 * j)
    shifts = torch.arange(codes_per_word, device=packed.device, dtype=dtype) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)[..., :n]


def packed_bytes(n: int, bits: int) -> int:
    return -(-n // 8) * bits


# --------------------------------------------------------------------------------------------- parts
def _bytes_as(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., k·itemsize] -> [..., k] of `dtype`: a view where the bytes are contiguous and aligned, else
    a copy (a part's bytes start wherever the parts before it end, and a slice of one row keeps that offset)."""
    if not data.is_contiguous() or data.storage_offset() % dtype.itemsize:
        data = data.clone(memory_format=torch.contiguous_format)
    return data.view(dtype)


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [..., n] (fp32) -> [..., ceil(n/group), group], the last group padded with zeros."""
    return torch.nn.functional.pad(x, (0, -x.shape[-1] % group)).unflatten(-1, (-1, group))


@dataclass(frozen=True)
class Raw:
    """Values stored as they are, in `dtype`."""

    dtype: torch.dtype

    def nbytes(self, n: int) -> int:
        return n * self.dtype.itemsize

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype).contiguous().view(torch.uint8)

    def decode_into(self, data: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(_bytes_as(data, self.dtype))


@dataclass(frozen=True)
class Fp8Groups:
    """| n × e4m3 | ceil(n/group) × fp32 scale |: x ≈ e4m3 · scale, scale = group amax / 448."""

    group: int = 128

    def nbytes(self, n: int) -> int:
        return n + 4 * -(-n // self.group)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        g = _grouped(x.float(), self.group)
        # an all-zero group gets scale 1, not 0: its values encode as zeros either way, and decoding never divides
        scale = g.abs().amax(-1, keepdim=True) / FP8_MAX
        scale = torch.where(scale > 0, scale, 1.0)
        values = (g / scale).to(torch.float8_e4m3fn).flatten(-2)[..., :n].view(torch.uint8)
        return torch.cat([values, scale.squeeze(-1).contiguous().view(torch.uint8)], dim=-1)

    def decode_into(self, data: torch.Tensor, out: torch.Tensor) -> None:
        n = out.shape[-1]
        scale = _bytes_as(data[..., n:], torch.float32)
        if out.device.type != "cpu":  # torch's own conversion: fast off the CPU, and no host sync below
            out.copy_(data[..., :n].view(torch.float8_e4m3fn))
        else:
            # e4m3 -> fp32 by moving bits, not by torch's conversion (4x slower on the CPU): the byte, sign-extended
            # to int32, shifted so that its sign and its 7 exponent and mantissa bits land on fp32's, is the fp32
            # of value·2^-120 (fp32's exponent bias is 127, e4m3's 7; e4m3's subnormals land on fp32's
            # subnormals, so they come out right too); the 2^120 goes into the group's scale
            bits = out.view(torch.int32)
            bits.copy_(data[..., :n].view(torch.int8))
            bits <<= 20
            bits &= _FP8_IN_FP32_BITS
            if bool((scale < 2.0**8).all()):
                scale = scale * 2.0**120
            else:  # a group scale past 2^8 (amax > ~1.1e5) would overflow with the re-bias: re-bias first
                out.mul_(2.0**120)
        full, tail = divmod(n, self.group)
        out[..., : full * self.group].unflatten(-1, (full, self.group)).mul_(scale[..., :full, None])
        if tail:
            out[..., full * self.group :].mul_(scale[..., full:])


@dataclass(frozen=True)
class IntGroups:
    """| n × `bits`-bit int, packed | ceil(n/group) × scale byte |: x ≈ code · 2^((s - 128)/8), code in
    [-(2^(bits-1) - 1), 2^(bits-1) - 1] (symmetric: zero is exact), s the byte of the smallest scale on that
    1/8-octave grid that keeps the group's amax in range (so a code uses at least 92% of its range, where a
    power-of-two scale can waste half of it). Scales span 2^-16 .. 2^15.9: group amax up to ~2·10^6 for
    6 bits; groups below 2^-16·qmax round to steps of 2^-16, far below what attention resolves."""

    bits: int
    group: int

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def nbytes(self, n: int) -> int:
        return packed_bytes(n, self.bits) + -(-n // self.group)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        g = _grouped(x.float(), self.group)
        amax = g.abs().amax(-1, keepdim=True).clamp_min(2.0**-20)  # an all-zero group: any scale encodes it
        eighths = torch.ceil(8 * torch.log2(amax / self.qmax)).clamp(-128, 127)
        # the clamp to ±qmax also covers log2 rounding the scale one step too low
        codes = torch.round(g / torch.exp2(eighths / 8)).clamp(-self.qmax, self.qmax).flatten(-2)[..., :n]
        packed = pack_bits(codes.to(torch.int64) + (1 << (self.bits - 1)), self.bits)
        return torch.cat([packed, (eighths.squeeze(-1) + 128).to(torch.uint8)], dim=-1)

    def decode_into(self, data: torch.Tensor, out: torch.Tensor) -> None:
        n = out.shape[-1]
        split = packed_bytes(n, self.bits)
        out.copy_(unpack_bits(data[..., :split], self.bits, n))
        out -= 1 << (self.bits - 1)
        scale = torch.exp2((data[..., split:].float() - 128) / 8)
        full, tail = divmod(n, self.group)
        out[..., : full * self.group].unflatten(-1, (full, self.group)).mul_(scale[..., :full, None])
        if tail:
            out[..., full * self.group :].mul_(scale[..., full:])


Part = Raw | Fp8Groups | IntGroups


# ------------------------------------------------------------------------------------------- layouts
class CacheLayout:
    """How a token's [c_KV | k^R] latent of one layer is stored: `width` elements of `storage_dtype`.

    The plain layout ("auto") stores the entry itself in the compute dtype, so it adds no copy or
    conversion; the quantized ones store bytes (uint8) made of one part for c_KV and one for k^R.
    """

    def __init__(self, name: str, config: ModelConfig, dtype: torch.dtype, parts: tuple[Part, Part] | None):
        self.name, self.dtype, self.parts = name, dtype, parts
        self.dims = config.kv_cache_parts  # MLA: (c_KV, k^R); an attention variant: (keys, values)
        if parts is None:
            self.storage_dtype, self.width = dtype, sum(self.dims)
        else:
            self.storage_dtype = torch.uint8
            self.sizes = tuple(p.nbytes(n) for p, n in zip(parts, self.dims, strict=True))
            self.width = sum(self.sizes)

    @property
    def quantized(self) -> bool:
        return self.parts is not None

    def bytes_per_token_per_layer(self) -> int:
        return self.width * self.storage_dtype.itemsize

    def encode(self, entries: torch.Tensor) -> torch.Tensor:
        """entries [..., D] -> [..., width] of storage_dtype."""
        if self.parts is None:
            return entries.to(self.dtype)
        pieces = entries.split(self.dims, dim=-1)
        return torch.cat([p.encode(x) for p, x in zip(self.parts, pieces, strict=True)], dim=-1)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """[..., width] of storage_dtype -> entries [..., D]: in the compute dtype for "auto", in fp32 for the
        quantized layouts (each part decoded straight into its slice of one fp32 tensor: on the CPU the
        absorbed path attends in fp32 anyway, so a round trip through bf16 would be two more passes)."""
        if self.parts is None:
            return stored
        out = torch.empty(*stored.shape[:-1], sum(self.dims), dtype=torch.float32, device=stored.device)
        for part, data, piece in zip(self.parts, stored.split(self.sizes, dim=-1), out.split(self.dims, dim=-1),
                                     strict=True):
            part.decode_into(data, piece)
        return out


FP8 = (Fp8Groups(128), Raw(torch.bfloat16))
SIXBIT = (IntGroups(bits=6, group=128), IntGroups(bits=5, group=32))


def cache_layout(kv_cache_dtype: str, config: ModelConfig, dtype: torch.dtype = torch.float32) -> CacheLayout:
    """The layout of `kv_cache_dtype` ("auto", "fp8", "6bit") for a model of `config` computing in `dtype`."""
    parts = {"auto": None, "fp8": FP8, "6bit": SIXBIT}[check_kv_cache_dtype(kv_cache_dtype)]
    if parts is not None and config.attention != "mla":
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is a layout of MLA's latents; a model with attention "
                         f"{config.attention!r} caches its keys and values as \"auto\" (the model dtype)")
    return CacheLayout(kv_cache_dtype, config, dtype, parts)
