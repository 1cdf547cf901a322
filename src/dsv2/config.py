"""ModelConfig: the fields of a DeepSeek-V2 Hugging Face `config.json`, validated, plus presets.

One source of truth for the architecture. The field names are exactly those of DeepSeek's released
`config.json` files (DeepSeek-V2 and DeepSeek-V2-Lite), so a config read from disk and written back
is unchanged: keys we do not know (e.g. `auto_map`) are kept in `extra`, and known keys that the
source file did not have are not added on the way out.

Transformers 5.x writes the rotary settings as `rope_parameters` instead of `rope_theta` +
`rope_scaling`; both spellings are read, and whichever the file used is written back.

The same class reads DeepSeek LLM's LlamaForCausalLM `config.json` (model_type "llama"): a dense model whose
attention is the variant its `num_key_value_heads` says (model/attention_variants.py); it writes Llama's keys
only (LLAMA_FIELDS), so transformers' Llama reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv2.atomic import write_text_atomic

TOPK_METHODS = ("greedy", "group_limited_greedy")
# DeepSeek's own V2 remote code spells the greedy method "gready" (reference-spec §13 #12).
TOPK_METHOD_ALIASES = {"gready": "greedy"}
SCORING_FUNCS = ("softmax",)
ROPE_SCALING_TYPES = ("yarn",)
# "mla": Multi-head Latent Attention (model/mla.py); the others are the baselines it is compared with
# (model/attention_variants.py): n_kv = num_key_value_heads key/value heads shared by groups of query heads
ATTENTIONS = ("mla", "mha", "gqa", "mqa")
# The keys of a LlamaForCausalLM config.json (DeepSeek LLM's layout) that ModelConfig models: a "llama" config
# writes only these (plus the file's unknown keys), none of the MLA or MoE fields
LLAMA_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_scaling",
    "original_max_position_embeddings", "hidden_act", "rms_norm_eps", "initializer_range", "attention_bias",
    "attention_dropout", "tie_word_embeddings", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
    "pretraining_tp", "model_type", "architectures", "torch_dtype", "transformers_version", "quantization_config",
})
# fields only the attention variants read: an MLA config never writes them while they hold their defaults,
# so DeepSeek's config.json round trip stays exact
VARIANT_FIELDS = ("attention", "head_dim")


class ConfigError(ValueError):
    """A config.json field is missing, malformed or inconsistent; the message names it."""


@dataclass(frozen=True)
class ModelConfig:
    # vocabulary and width
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008  # inner width of the dense SwiGLU MLP (first_k_dense_replace layers)
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32  # unused by MLA (kept for file fidelity); n_kv of the variants
    # which attention every layer has (ATTENTIONS). "mha" and "mqa" fix num_key_value_heads (to
    # num_attention_heads, to 1); a "llama" config's is read off num_key_value_heads
    attention: str = "mla"
    head_dim: int | None = None  # d_h of the variants (HF Llama's name); None: hidden_size // num_attention_heads
    # mla (paper §2.1): latent ranks and per-head dims
    q_lora_rank: int | None = 1536  # d'_c; None = plain q_proj (V2-Lite)
    kv_lora_rank: int = 512  # d_c: the only per-head-independent thing the KV cache holds
    qk_nope_head_dim: int = 128  # d_h
    qk_rope_head_dim: int = 64  # d_h^R, the decoupled RoPE part
    v_head_dim: int = 128
    # moe (paper §2.2)
    moe_intermediate_size: int = 1407
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None  # None = dense model (every layer a plain MLP)
    num_experts_per_tok: int | None = None  # K_r
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int | None = None  # expert groups = devices D for device-limited routing
    topk_group: int | None = None  # groups kept per token = M
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    ep_size: int = 1
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    # rope / yarn (paper §3.1.4)
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    # the sequence length a plain-RoPE model was pretrained at (`dsv2 train --seq-len` records it), L0 of a
    # later YaRN extension (`dsv2 extend`); transformers reads the same top-level key (Phi-3's spelling) and
    # puts it in the YaRN parameters, so an extended config keeps it equal to rope_scaling's
    original_max_position_embeddings: int | None = None
    # misc
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pretraining_tp: int = 1
    model_type: str = "deepseek_v2"
    architectures: list[str] = field(default_factory=lambda: ["DeepseekV2ForCausalLM"])
    torch_dtype: str | None = None
    transformers_version: str | None = None
    # how the checkpoint's weights are stored when not in torch_dtype: DeepSeek's block FP8 ({"quant_method":
    # "fp8", "weight_block_size": [128, 128], ...}) or dsv2's weight-only int8 / int4 (`dsv2 quantize`)
    quantization_config: dict[str, Any] | None = None
    # keys of config.json this class does not model, kept verbatim for the round trip
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # known keys that the source file lacked: not written back unless their value changed
    absent_keys: frozenset[str] = field(default_factory=frozenset, compare=False, repr=False)

    def __post_init__(self) -> None:
        # transformers' strict config rejects ints in float fields (e.g. routed_scaling_factor: 16)
        for name in ("routed_scaling_factor", "rms_norm_eps", "initializer_range", "aux_loss_alpha",
                     "attention_dropout"):
            v = getattr(self, name)
            if isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, name, float(v))
        if self.model_type == "llama" and self.attention == "mla":
            # a LlamaForCausalLM file names no attention: its key/value heads say which variant it is
            heads, kv = self.num_attention_heads, self.num_key_value_heads
            object.__setattr__(self, "attention", "mha" if kv in (None, heads) else "mqa" if kv == 1 else "gqa")
        if self.attention == "mha":
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        elif self.attention == "mqa":
            object.__setattr__(self, "num_key_value_heads", 1)
        self.validate()

    # ----------------------------------------------------------------------------- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attention_head_dim(self) -> int:
        """d_h of the attention variants: `head_dim`, or hidden_size // num_attention_heads as in HF Llama."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """Channels RoPE rotates per head: MLA's decoupled d_h^R, a variant's whole head."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.attention_head_dim

    @property
    def kv_cache_parts(self) -> tuple[int, int]:
        """The two parts of a token's cache entry per layer (Table 1): MLA's c_KV and shared k^R; a variant's
        n_kv keys and n_kv values."""
        if self.attention == "mla":
            return self.kv_lora_rank, self.qk_rope_head_dim
        kv = self.num_key_value_heads * self.attention_head_dim
        return kv, kv

    @property
    def kv_cache_dim(self) -> int:
        """Elements per token per layer in the KV cache: c_KV plus the shared RoPE key (MLA), 2·n_kv·d_h (variants)."""
        return sum(self.kv_cache_parts)

    @property
    def routing_method(self) -> str:
        return TOPK_METHOD_ALIASES.get(self.topk_method, self.topk_method)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule (modeling_deepseek.py): MoE from `first_k_dense_replace` on, every
        `moe_layer_freq`-th layer, and never in a model without routed experts."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R) (Eq. 18; a variant's 1/sqrt(d_h)), times YaRN's mscale² when YaRN is on
        (reference-spec §6). Not for a "llama" config: transformers' Llama puts YaRN's factor on cos/sin only."""
        scale = (self.qk_head_dim if self.attention == "mla" else self.attention_head_dim) ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.get("mscale_all_dim") and self.model_type != "llama":
            m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    # ------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"config field `{name}`: {msg}")

        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
            "moe_layer_freq",
        ]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(name, f"must be a positive integer, got {v!r}")
        for name in ["q_lora_rank", "n_shared_experts"]:
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                fail(name, f"must be null or a non-negative integer, got {v!r}")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if not isinstance(self.first_k_dense_replace, int) or self.first_k_dense_replace < 0:
            fail("first_k_dense_replace", f"must be a non-negative integer, got {self.first_k_dense_replace!r}")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", f"must be positive, got {self.rms_norm_eps!r}")
        if self.rope_theta <= 0:
            fail("rope_theta", f"must be positive, got {self.rope_theta!r}")
        if self.hidden_act != "silu":
            fail("hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.attention_bias:
            fail("attention_bias", "biased attention projections are not supported (DeepSeek-V2 has none)")
        if self.tie_word_embeddings:
            fail("tie_word_embeddings", "tied embeddings are not supported (DeepSeek-V2 unties them)")
        self._validate_attention(fail)
        self._validate_moe(fail)
        self._validate_rope_scaling(fail)

    def _validate_attention(self, fail) -> None:
        if self.attention not in ATTENTIONS:
            fail("attention", f"unknown value {self.attention!r}; supported: {', '.join(ATTENTIONS)}")
        if self.model_type == "llama":
            if self.n_routed_experts is not None:
                fail("n_routed_experts", "a \"llama\" (LlamaForCausalLM) model is dense: must be null")
            if self.extra.get("mlp_bias"):
                fail("mlp_bias", "biased MLP projections are not supported")
        if self.attention == "mla":
            return
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool)
                                          or self.head_dim <= 0):
            fail("head_dim", f"must be null or a positive integer, got {self.head_dim!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            fail("head_dim", f"null means hidden_size // num_attention_heads, but hidden_size={self.hidden_size} "
                 f"is not divisible by num_attention_heads={self.num_attention_heads}")
        if self.attention_head_dim % 2:
            fail("head_dim", f"must be even (RoPE rotates pairs), got {self.attention_head_dim}")
        kv = self.num_key_value_heads
        if not isinstance(kv, int) or isinstance(kv, bool) or kv <= 0:
            fail("num_key_value_heads", f"must be a positive integer for attention {self.attention!r}, got {kv!r}")
        if self.num_attention_heads % kv:
            fail("num_key_value_heads", f"num_attention_heads={self.num_attention_heads} is not divisible by {kv} "
                 f"key/value heads")

    def _validate_moe(self, fail) -> None:
        if self.n_routed_experts is None:
            return
        E = self.n_routed_experts
        if not isinstance(E, int) or E <= 0:
            fail("n_routed_experts", f"must be null or a positive integer, got {E!r}")
        if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
            fail("moe_intermediate_size", f"must be a positive integer, got {self.moe_intermediate_size!r}")
        k = self.num_experts_per_tok
        if not isinstance(k, int) or not 0 < k <= E:
            fail("num_experts_per_tok", f"must be an integer in [1, n_routed_experts={E}], got {k!r}")
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"unknown value {self.scoring_func!r}; supported: {', '.join(SCORING_FUNCS)}")
        method = self.routing_method
        if method not in TOPK_METHODS:
            fail("topk_method", f"unknown value {self.topk_method!r}; supported: {', '.join(TOPK_METHODS)}")
        if method == "group_limited_greedy":
            g, m = self.n_group, self.topk_group
            if not isinstance(g, int) or g <= 0:
                fail("n_group", f"must be a positive integer for group_limited_greedy, got {g!r}")
            if E % g:
                fail("n_routed_experts", f"{E} is not divisible by n_group={g}")
            if not isinstance(m, int) or m <= 0:
                fail("topk_group", f"must be a positive integer for group_limited_greedy, got {m!r}")
            if m > g:
                fail("topk_group", f"{m} exceeds n_group={g}")
            if k > m * (E // g):
                fail("num_experts_per_tok", f"{k} exceeds the {m * (E // g)} experts in topk_group={m} groups")

    def _validate_rope_scaling(self, fail) -> None:
        top = self.original_max_position_embeddings
        if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top <= 0):
            fail("original_max_position_embeddings", f"must be null or a positive integer, got {top!r}")
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            fail("rope_scaling", f"must be an object or null, got {rs!r}")
        kind = rs.get("type", rs.get("rope_type"))
        if kind not in ROPE_SCALING_TYPES:
            fail("rope_scaling.type", f"unsupported value {kind!r}; supported: {', '.join(ROPE_SCALING_TYPES)}")
        factor = rs.get("factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
            fail("rope_scaling.factor", f"must be a positive number, got {factor!r}")
        orig = rs.get("original_max_position_embeddings", self.max_position_embeddings)
        if not isinstance(orig, int) or orig <= 0:
            fail("rope_scaling.original_max_position_embeddings", f"must be a positive integer, got {orig!r}")
        if top is not None and "original_max_position_embeddings" in rs and top != orig:
            # transformers would take the top-level value, dsv2's rope the nested one: refuse the ambiguity
            fail("original_max_position_embeddings", f"{top} (the length the model was pretrained at) disagrees "
                 f"with rope_scaling's {orig}")
        for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            v = rs.get(name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
                fail(f"rope_scaling.{name}", f"must be a non-negative number, got {v!r}")

    # ---------------------------------------------------------------------------- (de)serialise
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "absent_keys"}
        kwargs = {k: d[k] for k in known if k in d}
        present = set(d)
        if "rope_parameters" in d and "rope_scaling" not in d and "rope_theta" not in d:
            kwargs["rope_theta"], kwargs["rope_scaling"] = _rope_from_parameters(d["rope_parameters"])
        extra = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra, absent_keys=frozenset(known - present))
        except TypeError as e:  # pragma: no cover - dataclass signature errors
            raise ConfigError(str(e)) from e

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict: the source file's keys (plus any known field changed since), current values."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "absent_keys"):
                continue
            v = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name in self.absent_keys and v == default:
                continue
            if self.attention == "mla" and f.name in VARIANT_FIELDS and v == default:
                continue
            if self.model_type == "llama" and f.name not in LLAMA_FIELDS:
                continue
            if f.name == "original_max_position_embeddings" and v is None:
                continue  # transformers takes a present key, null too, as the pretraining length of YaRN
            out[f.name] = v
        if "rope_parameters" in self.extra and {"rope_theta", "rope_scaling"} <= self.absent_keys:
            # the file used the transformers-5 spelling: write it back verbatim unless the values changed
            out.pop("rope_theta", None)
            out.pop("rope_scaling", None)
            rp = self.extra["rope_parameters"]
            if _rope_from_parameters(rp) != (self.rope_theta, self.rope_scaling):
                scaling = {k: v for k, v in (self.rope_scaling or {"type": "default"}).items() if k != "type"}
                kind = (self.rope_scaling or {}).get("type", "default")
                rp = {"rope_theta": self.rope_theta, "rope_type": kind, **scaling}
            return {**out, **self.extra, "rope_parameters": rp}
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_json(self, path: str | os.PathLike) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _rope_from_parameters(rp: Any) -> tuple[float, dict[str, Any] | None]:
    """transformers-5 `rope_parameters` -> (rope_theta, rope_scaling) in DeepSeek's spelling."""
    if not isinstance(rp, dict):
        raise ConfigError(f"config field `rope_parameters`: must be an object, got {rp!r}")
    rest = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type", "type")}
    kind = rp.get("rope_type", rp.get("type", "default"))
    return rp.get("rope_theta", 10000.0), (None if kind == "default" else {"type": kind, **rest})


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1·m·ln(s) + 1 (1 when not extending), reference-spec §8."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ---------------------------------------------------------------------------------------- presets
_YARN_V2 = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

def yarn_v2(factor: float, original_max_position_embeddings: int) -> dict[str, Any]:
    """DeepSeek-V2's YaRN settings (paper §3.1.4: α = 1, β = 32, mscale 0.707 on both sides, so the softmax
    scale gains (0.0707 ln s + 1)²) for an extension by `factor` from a pretraining length."""
    return dict(_YARN_V2, factor=factor, original_max_position_embeddings=original_max_position_embeddings)


_V2_COMMON = dict(
    vocab_size=102400, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
    scoring_func="softmax", norm_topk_prob=False, aux_loss_alpha=0.001, seq_aux=True,
    max_position_embeddings=163840, rope_theta=10000, rope_scaling=_YARN_V2,
    bos_token_id=100000, eos_token_id=100001, torch_dtype="bfloat16",
)

_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"])

PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeek-V2 (236B): paper §3.1.2, values of the released config.json (reference-spec §2)
    "deepseek-v2": dict(
        _V2_COMMON, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
        n_routed_experts=160, routed_scaling_factor=16.0, topk_method="group_limited_greedy",
        n_group=8, topk_group=3,
    ),
    # DeepSeek-V2-Lite (15.7B): paper appendix B
    "deepseek-v2-lite": dict(
        _V2_COMMON, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
        n_routed_experts=64, routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1,
    ),
    # The two small presets have plain RoPE, as V2 before its extension (paper §3.1.4): they pretrain at a
    # length L0 (recorded as original_max_position_embeddings) and `dsv2 extend` adds YaRN afterwards.
    # ~200M total: big enough for meaningful CPU benchmarks, same structure as V2
    "small": dict(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=512,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_shared_experts=2, n_routed_experts=32, num_experts_per_tok=4, routed_scaling_factor=2.0,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, first_k_dense_replace=1,
        max_position_embeddings=16384, bos_token_id=0, eos_token_id=1,
    ),
    # a few million parameters: tests and demos
    "nano": dict(
        vocab_size=1024, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=1.0,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, first_k_dense_replace=1,
        max_position_embeddings=2048, bos_token_id=0, eos_token_id=1,
    ),
    # DeepSeek LLM 67B, the dense model V2 is measured against (paper §1: 93.3% less KV cache, 5.76x the generation
    # throughput): LLaMA-style, dense, GQA with 8 key/value heads; the released config.json's values (paper-facts
    # §2), in its LlamaForCausalLM layout
    "deepseek-llm-67b": dict(
        _LLAMA, vocab_size=102400, hidden_size=8192, intermediate_size=22016, num_hidden_layers=95,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001, torch_dtype="bfloat16",
    ),
    # the same architecture scaled down, with the MoE presets' width, depth, heads and vocabulary: GQA with 2 key/
    # value heads (67B's 8 query heads per key/value head would be MQA at these head counts), the MLP sized so the
    # active parameters per token match (llm-small 91.5M / small 90.7M; llm-nano 0.82M / nano 0.80M): dense GQA against
    # MLA + DeepSeekMoE at equal compute per token
    "llm-small": dict(
        _LLAMA, vocab_size=32000, hidden_size=1024, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=16384, bos_token_id=0, eos_token_id=1,
    ),
    "llm-nano": dict(
        _LLAMA, vocab_size=1024, hidden_size=128, intermediate_size=320, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=0, eos_token_id=1,
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[name])


def resolve_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """The config of a checkpoint folder, a config.json file or a preset name."""
    path = Path(name_or_path)
    if path.is_dir():
        return ModelConfig.from_json(path / "config.json")
    if path.suffix == ".json" and path.is_file():
        return ModelConfig.from_json(path)
    if str(name_or_path) in PRESETS:
        return preset(str(name_or_path))
    raise ConfigError(
        f"{str(name_or_path)!r} is not a preset ({', '.join(PRESETS)}), a checkpoint folder or a config.json"
    )
