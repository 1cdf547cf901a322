"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): fine-tune a frozen model through
a trainable low-rank update of some of its weights.

A weight W [out, in] becomes

    W' = W + s · B A,    s = alpha / r,    A [r, in] ~ kaiming-uniform(a=√5) (PEFT's init),  B [out, r] = 0

so the adapted model starts exactly equal to the base one, and only r·(in + out) numbers per weight train.
The stacked routed experts get one pair of factors per expert e (A [E, r, in], B [E, out, r]).

What `LoraConfig.targets` adapts, per block (a group whose weights a block lacks is skipped there):
    attention        attn.wq (q_lora_rank None) | attn.wq_a, attn.wq_b; attn.wkv_a, attn.wkv_b, attn.wo (MLA);
                     attn.wq, attn.wk, attn.wv, attn.wo (the attention variants)
    shared_experts   ffn.shared_experts.w1 / w2 / w3
    routed_experts   ffn.experts.w1 / w3 / w2: gate and up share A_e,
                         W1'_e = W1_e + s·B1_e A_e,   W3'_e = W3_e + s·B3_e A_e,   W2'_e = W2_e + s·B2_e A2_e
                     which is one rank-r LoRA of transformers' fused gate_up_proj_e = [W1_e; W3_e] [2I, d]
    mlp              the dense layers' ffn.w1 / w2 / w3 (not a default target)

Each adapted weight is re-registered through `torch.nn.utils.parametrize`: reading it returns W + s·B A, so every
path that reads weights (grouped experts, absorbed MLA, ...) sees the adapted weight without a change to model code.
The factors are kept in fp32 whatever the model dtype (as PEFT does), the update cast to the weight's dtype.

On disk the adapter is PEFT's (peft 0.21 with transformers 5), so `PeftModel.from_pretrained(DeepseekV2ForCausalLM,
folder)` loads it: adapter_config.json and adapter_model.safetensors, keys under `base_model.model.<HF module>`:
    Linear (attention, MLPs)     <module>.lora_A.weight [r, in],  <module>.lora_B.weight [out, r]
    experts.gate_up_proj [E,2I,d] mlp.experts.base_layer.lora_A.weight [E·r, d]   row e·r + k    = A_e[k]
                                 mlp.experts.base_layer.lora_B.weight [2I, r·E]  column k·E + e = [B1_e; B3_e][:, k]
    experts.down_proj [E,d,I]    mlp.experts.lora_A.weight [E·r, I],  mlp.experts.lora_B.weight [d, r·E], same order
(PEFT wraps two parameters of one module by nesting: the first registered, gate_up_proj, is the inner wrapper,
hence `base_layer`.) Attention is named in `target_modules` by module, everything else in `target_parameters`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from dsv2.atomic import atomic_path, write_text_atomic
from dsv2.model import Transformer
from dsv2.model.moe import RoutedExperts
from dsv2.weights import hf_name

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix for the wrapped model's names

# group -> (our Linear inside a block, PEFT's target for it). Attention projections are PEFT `target_modules`
# (module names). The MLP projections must be `target_parameters` (their weight): with transformers 5, PEFT reads
# any target_modules entry ending in gate_proj / up_proj / down_proj as the fused routed experts and then leaves the
# Linear alone. The module names themselves come from `weights.hf_name`.
LINEAR_TARGETS: dict[str, tuple[tuple[str, str], ...]] = {
    "attention": (
        ("attn.wq", "q_proj"), ("attn.wq_a", "q_a_proj"), ("attn.wq_b", "q_b_proj"),
        ("attn.wkv_a", "kv_a_proj_with_mqa"), ("attn.wkv_b", "kv_b_proj"), ("attn.wo", "o_proj"),
        ("attn.wk", "k_proj"), ("attn.wv", "v_proj"),  # the attention variants' (model/attention_variants.py)
    ),
    "shared_experts": (
        ("ffn.shared_experts.w1", "shared_experts.gate_proj.weight"),
        ("ffn.shared_experts.w3", "shared_experts.up_proj.weight"),
        ("ffn.shared_experts.w2", "shared_experts.down_proj.weight"),
    ),
    # ".mlp." in front (PEFT matches whole dotted suffixes) keeps shared_experts.gate_proj out of these
    "mlp": (("ffn.w1", "mlp.gate_proj.weight"), ("ffn.w3", "mlp.up_proj.weight"), ("ffn.w2", "mlp.down_proj.weight")),
}
# routed experts: our stacked w1 + w3 are transformers' fused gate_up_proj (inner PEFT wrapper), w2 its down_proj
ROUTED_TARGETS = ("experts.gate_up_proj", "experts.down_proj")
GROUPS = (*LINEAR_TARGETS, "routed_experts")
DEFAULT_TARGETS = ("attention", "shared_experts", "routed_experts")


class LoraError(ValueError):
    """An adapter folder is unusable, or does not fit the model; the message names the file and tensor."""


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0  # scaling = alpha / rank (PEFT's rule, no rank-stabilised variant)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # groups of weights to adapt, from GROUPS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"LoraConfig.targets must be a non-empty tuple of groups from {GROUPS}, got "
                             f"{self.targets!r}")
        unknown = [t for t in self.targets if t not in GROUPS]
        if unknown:
            raise ValueError(f"LoraConfig.targets: unknown group(s) {unknown}; valid: {', '.join(GROUPS)}")


class LowRank(nn.Module):
    """The parametrization W -> W + s·B A (batched over experts when W is stacked [E, out, in])."""

    def __init__(self, lora_A: nn.Parameter, lora_B: nn.Parameter, scaling: float):
        super().__init__()
        self.lora_A, self.lora_B, self.scaling = lora_A, lora_B, scaling

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scaling * (self.lora_B @ self.lora_A)).to(weight.dtype)


def _factor_A(shape: tuple[int, ...], device: torch.device) -> nn.Parameter:
    """A [..., r, in] initialised like PEFT's nn.Linear(in, r): kaiming-uniform with fan_in = in for every expert."""
    a = torch.empty(shape, dtype=torch.float32, device=device)
    nn.init.kaiming_uniform_(a.view(-1, shape[-1]), a=math.sqrt(5))
    return nn.Parameter(a)


def _factor_B(shape: tuple[int, ...], device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))


def _lora_of(module: nn.Module, name: str) -> LowRank:
    if not parametrize.is_parametrized(module, name):
        raise ValueError(f"{name} of {type(module).__name__} has no LoRA factors: call Lora.apply(model) first")
    return module.parametrizations[name][0]


def _experts_to_peft(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ours A [E, r, in], B [E, out, r] -> PEFT's lora_A.weight [E·r, in], lora_B.weight [out, r·E]."""
    return A.reshape(-1, A.shape[-1]), B.permute(1, 2, 0).reshape(B.shape[1], -1)


def _experts_from_peft(A: torch.Tensor, B: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `_experts_to_peft`."""
    return A.view(n_experts, -1, A.shape[-1]), B.view(B.shape[0], -1, n_experts).permute(2, 0, 1)


class Lora:
    """LoRA adapters on a `Transformer`: `apply` them, train `parameters(model)`, then `merged` or `save`."""

    def __init__(self, config: LoraConfig):
        config.validate()
        self.config = config

    # -------------------------------------------------------------------------------------------- where
    def _linears(self, model: Transformer) -> list[tuple[str, nn.Linear, str]]:
        """Every targeted Linear: (our module name, the module, its PEFT target)."""
        found = []
        for i, block in enumerate(model.layers):
            for group in self.config.targets:
                for path, target in LINEAR_TARGETS.get(group, ()):
                    module = _submodule(block, path)
                    if isinstance(module, nn.Linear):
                        found.append((f"layers.{i}.{path}", module, target))
        return found

    def _experts(self, model: Transformer) -> list[tuple[int, RoutedExperts]]:
        """Every targeted stack of routed experts: (layer index, the module)."""
        if "routed_experts" not in self.config.targets:
            return []
        found = [(i, _submodule(block, "ffn.experts")) for i, block in enumerate(model.layers)]
        return [(i, experts) for i, experts in found if isinstance(experts, RoutedExperts)]

    # ------------------------------------------------------------------------------------------- apply
    def apply(self, model: Transformer) -> None:
        """In place: freeze every base parameter and add trainable LoRA factors on the targets (B = 0, so the
        adapted model starts equal to the base)."""
        if any(isinstance(m, LowRank) for m in model.modules()):
            raise ValueError("this model already has LoRA factors")
        r, s = self.config.rank, self.config.scaling
        for _, linear, _ in self._linears(model):
            out_f, in_f = linear.weight.shape
            dev = linear.weight.device
            parametrize.register_parametrization(
                linear, "weight", LowRank(_factor_A((r, in_f), dev), _factor_B((out_f, r), dev), s)
            )
        for _, experts in self._experts(model):
            n, inter, dim = experts.w1.shape
            dev = experts.w1.device
            # gate and up share A, tied like shared embeddings: one Parameter in two modules, listed once by
            # named_parameters; PEFT's gate_up_proj has a single A for both halves
            shared_A = _factor_A((n, r, dim), dev)
            parametrize.register_parametrization(experts, "w1", LowRank(shared_A, _factor_B((n, inter, r), dev), s))
            parametrize.register_parametrization(experts, "w3", LowRank(shared_A, _factor_B((n, inter, r), dev), s))
            parametrize.register_parametrization(
                experts, "w2", LowRank(_factor_A((n, r, inter), dev), _factor_B((n, dim, r), dev), s)
            )
        factors = {id(p) for p in self.parameters(model)}
        if not factors:
            raise ValueError(f"LoraConfig.targets {self.config.targets} select no weight of this model")
        for p in model.parameters():
            p.requires_grad_(id(p) in factors)

    def named_parameters(self, model: Transformer) -> dict[str, nn.Parameter]:
        """The trainable LoRA factors by their names in `model` (a tied A once)."""
        return {
            name: p for name, p in model.named_parameters()
            if isinstance(model.get_submodule(name.rpartition(".")[0]), LowRank)
        }

    def parameters(self, model: Transformer) -> list[nn.Parameter]:
        return list(self.named_parameters(model).values())

    # ------------------------------------------------------------------------------------------- merge
    @torch.no_grad()
    def merged(self, model: Transformer) -> Transformer:
        """A new plain Transformer with every W + s·B A folded in (all parameters trainable, the state dict of an
        unadapted model). `model` is left as it is."""
        weight = model.embed.weight
        with torch.device("meta"):
            plain = Transformer(model.config)
        plain = plain.to(dtype=weight.dtype).to_empty(device=weight.device)
        for name, p in plain.named_parameters():
            module, _, leaf = name.rpartition(".")
            p.copy_(getattr(model.get_submodule(module), leaf))  # a parametrized weight reads as W + s·B A
        return plain.train(model.training)

    # -------------------------------------------------------------------------------------- save, load
    def _peft_tensors(self, model: Transformer) -> dict[str, torch.Tensor]:
        """PEFT key -> tensor, for every factor of `model` (the layout in the module docstring)."""
        tensors = {}
        for name, linear, _ in self._linears(model):
            lora = _lora_of(linear, "weight")
            key = PREFIX + hf_name(name)
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = lora.lora_A, lora.lora_B
        for i, experts in self._experts(model):
            gate, up, down = (_lora_of(experts, w) for w in ("w1", "w3", "w2"))
            key = f"{PREFIX}model.layers.{i}.mlp.experts"
            gate_up = _experts_to_peft(gate.lora_A, torch.cat([gate.lora_B, up.lora_B], dim=1))
            tensors[f"{key}.base_layer.lora_A.weight"], tensors[f"{key}.base_layer.lora_B.weight"] = gate_up
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = _experts_to_peft(
                down.lora_A, down.lora_B
            )
        return tensors

    def _peft_config(self, model: Transformer, base_model_name_or_path: str) -> dict:
        linears = [target for _, _, target in self._linears(model)]
        by_weight = {t for t in linears if t.endswith(".weight")}
        if self._experts(model):
            by_weight |= set(ROUTED_TARGETS)
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path or None,
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "target_modules": sorted(set(linears) - by_weight),
            "target_parameters": sorted(by_weight),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
            "modules_to_save": None,
            "inference_mode": True,
        }

    @torch.no_grad()
    def save(self, model: Transformer, folder: str | os.PathLike, base_model_name_or_path: str = "") -> None:
        """Write the adapter in PEFT's layout (folder/adapter_config.json, folder/adapter_model.safetensors),
        each file atomically, the weights first."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self._peft_tensors(model).items()}
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        config = self._peft_config(model, base_model_name_or_path)
        write_text_atomic(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")

    @torch.no_grad()
    def load(self, model: Transformer, folder: str | os.PathLike) -> None:
        """Restore the factors of an `apply`ed model from a folder `save` wrote; raises `LoraError` naming the file
        and tensor when the folder does not fit (missing file or tensor, another rank or shape)."""
        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise LoraError(f"{path}: no such file (not an adapter folder written by Lora.save)")
        try:
            saved = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise LoraError(f"{config_path}: not valid JSON ({e})") from None
        if saved.get("r") != self.config.rank:
            raise LoraError(f"{config_path}: rank r={saved.get('r')!r}, but this Lora has rank {self.config.rank}")
        if saved.get("lora_alpha") != self.config.alpha:  # the factors only mean the same under the same scaling
            raise LoraError(f"{config_path}: lora_alpha={saved.get('lora_alpha')!r}, but this Lora has alpha "
                            f"{self.config.alpha}")
        targets = self._peft_tensors(model)
        try:
            with safe_open(weights_path, framework="pt") as f:
                present = set(f.keys())
                for key, target in targets.items():
                    if key not in present:
                        raise LoraError(f"{weights_path}: missing tensor {key} (expected shape {list(target.shape)})")
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != tuple(target.shape):
                        raise LoraError(f"{weights_path}: tensor {key} has shape {list(shape)}, expected "
                                        f"{list(target.shape)}")
                loaded = {key: f.get_tensor(key) for key in targets}
        except (SafetensorError, OSError) as e:
            raise LoraError(f"{weights_path}: not a readable safetensors file ({e})") from None
        unexpected = sorted(present - set(targets))
        if unexpected:
            raise LoraError(f"{weights_path}: unexpected tensor {unexpected[0]}, not a factor of this model's targets")
        self._copy_in(model, loaded)

    def _copy_in(self, model: Transformer, loaded: dict[str, torch.Tensor]) -> None:
        """Copy PEFT-layout tensors (already checked against `_peft_tensors`) into the factors."""
        for name, linear, _ in self._linears(model):
            lora = _lora_of(linear, "weight")
            key = PREFIX + hf_name(name)
            lora.lora_A.copy_(loaded[f"{key}.lora_A.weight"])
            lora.lora_B.copy_(loaded[f"{key}.lora_B.weight"])
        for i, experts in self._experts(model):
            gate, up, down = (_lora_of(experts, w) for w in ("w1", "w3", "w2"))
            key = f"{PREFIX}model.layers.{i}.mlp.experts"
            n = gate.lora_A.shape[0]
            A, B = _experts_from_peft(loaded[f"{key}.base_layer.lora_A.weight"],
                                      loaded[f"{key}.base_layer.lora_B.weight"], n)
            gate.lora_A.copy_(A)  # up's A is the same Parameter
            gate.lora_B.copy_(B[:, : gate.lora_B.shape[1]])
            up.lora_B.copy_(B[:, gate.lora_B.shape[1]:])
            A, B = _experts_from_peft(loaded[f"{key}.lora_A.weight"], loaded[f"{key}.lora_B.weight"], n)
            down.lora_A.copy_(A)
            down.lora_B.copy_(B)


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:  # not in this block: dense or MoE layer, q_lora_rank set or not, no shared experts
        return None
