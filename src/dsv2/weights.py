"""Hugging Face checkpoints: the one name map between HF tensors and ours, safetensors load and save.

A checkpoint folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`, with DeepSeek's original tensor names (one tensor per routed expert).
Loading builds the model on the meta device, allocates it once in the target dtype and copies every
tensor in from the memory-mapped files, so peak memory stays near one copy of the weights. Everything
is checked before anything is allocated: a bad folder raises `CheckpointError` naming the file and
tensor and leaves nothing half-loaded. Only safetensors are read; pickles are never opened.

DeepSeek's block-FP8 checkpoints (`dsv2.model.fp8`: float8_e4m3fn weights, each with a float32
`<name>_scale_inv` per weight_block_size block; config.json `quantization_config.quant_method` "fp8")
load either dequantized into a plain model (`fp8="dequantize"`, the reference rule, exact) or kept in
FP8 (`fp8="keep"`: those Linears and routed experts become `FP8Linear` / `FP8RoutedExperts`, which
save back bit-identically). `save_model(..., fp8_block=(128, 128))` writes a plain model in that format.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dsv2.atomic import atomic_path, write_text_atomic
from dsv2.config import PRESETS, ConfigError, ModelConfig, preset
from dsv2.model import Transformer
from dsv2.model.fp8 import (
    FP8_DTYPE,
    SCALE_SUFFIX,
    FP8Linear,
    FP8RoutedExperts,
    can_keep_fp8,
    dequantize_block_fp8,
    is_deepseek_fp8_target,
    quantization_config,
    quantize_block_fp8,
    scale_shape,
)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
REOPEN_BYTES = 128 * 1024**2

# HF module name -> ours (DeepSeek-V3 inference naming), applied per dotted segment. The same map serves
# DeepSeek-V2's layout and Llama's (DeepSeek LLM: k_proj / v_proj of the attention variants, dense MLPs).
HF_TO_DSV2 = {
    "embed_tokens": "embed",
    "lm_head": "head",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn": "attn",
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
    "mlp": "ffn",
    "gate_proj": "w1",
    "down_proj": "w2",
    "up_proj": "w3",
}
DSV2_TO_HF = {ours: hf for hf, ours in HF_TO_DSV2.items()}
_ROUTED = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(w[123])(_scale_inv)?$")  # FP8 scales of FP8RoutedExperts too
SAFETENSORS_FP8 = "F8_E4M3"  # float8_e4m3fn in a safetensors header


class CheckpointError(ValueError):
    """A checkpoint folder is unusable; the message names the file and tensor."""


def hf_name(name: str) -> str:
    """Our parameter name -> its HF name (not for the stacked routed-expert tensors). An FP8Linear's
    `weight_scale_inv` maps to the checkpoint's `...weight_scale_inv` like any other segment."""
    hf = ".".join(DSV2_TO_HF.get(part, part) for part in name.split("."))
    return hf if hf.startswith("lm_head") else f"model.{hf}"


@dataclass(frozen=True)
class Source:
    """Where one HF tensor's data goes: our parameter `param`, at `expert` (stacked experts); `scale`: the
    block-FP8 scales to dequantize it with on the way in (None: copied as stored)."""

    hf_name: str
    param: str
    expert: int | None = None
    scale: str | None = None


def hf_tensors(model: Transformer) -> Iterator[tuple[str, str, int | None, tuple[int, ...]]]:
    """Every HF tensor of the original layout: (hf name, our param, expert index or None, shape)."""
    for name, p in model.named_parameters():
        m = _ROUTED.match(name)
        if m is None:
            yield hf_name(name), name, None, tuple(p.shape)
            continue
        layer, w, scale = m.groups()
        for e in range(p.shape[0]):
            hf = f"model.layers.{layer}.mlp.experts.{e}.{DSV2_TO_HF[w]}.weight{scale or ''}"
            yield hf, name, e, tuple(p.shape[1:])


# ------------------------------------------------------------------------------------------ load
def weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> file, from the index or the single file; checks that every file exists."""
    index_path, single = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: `weight_map` must be an object")
        files = {}
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str) or "/" in shard or "\\" in shard:
                raise CheckpointError(f"{index_path}: tensor {tensor} maps to an invalid file name {shard!r}")
            if not (folder / shard).is_file():
                raise CheckpointError(f"{index_path}: tensor {tensor} is in shard {shard}, which does not exist")
            files[tensor] = folder / shard
        return files
    if single.exists():
        return {name: single for name in _tensor_names(single)}
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {', '.join(found)}: pickle checkpoints are never loaded; convert to safetensors)" if found else ""
    raise CheckpointError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found{hint}")


def _tensor_names(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _headers(files: dict[str, Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Every tensor's shape and safetensors dtype ("BF16", "F8_E4M3", ...) from the headers, checking each
    file opens and holds what the index says."""
    by_file: dict[Path, list[str]] = {}
    for tensor, path in files.items():
        by_file.setdefault(path, []).append(tensor)
    shapes, dtypes = {}, {}
    for path, tensors in by_file.items():
        try:
            with safe_open(path, framework="pt") as f:
                present = set(f.keys())
                for t in tensors:
                    if t not in present:
                        raise CheckpointError(f"{path}: the index lists tensor {t} in this file, but it is not there")
                    header = f.get_slice(t)
                    shapes[t], dtypes[t] = tuple(header.get_shape()), header.get_dtype()
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return shapes, dtypes


def _plan(
    model: Transformer, folder: Path, files: dict[str, Path], shapes: dict[str, tuple[int, ...]],
) -> list[tuple[Source, Path]]:
    """Match the files' tensors against the model's, by name and shape; raise on any difference."""
    plan: list[tuple[Source, Path]] = []
    wanted = set()
    params = dict(model.named_parameters())
    for name, param, expert, shape in hf_tensors(model):
        if name not in files:
            fused = _fused_source(name, param, expert, params, shapes)
            if fused is None:
                raise CheckpointError(f"{folder}: missing tensor {name} (expected shape {list(shape)})")
            wanted.add(fused.hf_name)
            plan.append((fused, files[fused.hf_name]))
            continue
        wanted.add(name)
        if shapes[name] != shape:
            raise CheckpointError(
                f"{files[name]}: tensor {name} has shape {list(shapes[name])} but {folder / CONFIG_FILE} "
                f"implies {list(shape)}: the config does not match the weights"
            )
        plan.append((Source(name, param, expert), files[name]))
    unexpected = sorted(set(files) - wanted)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]}{more}, not part of the model that "
            f"{folder / CONFIG_FILE} describes"
        )
    return plan


def _fused_source(name, param, expert, params, shapes) -> Source | None:
    """transformers-5 layout: `experts.gate_up_proj` [E, 2I, d] and `experts.down_proj` [E, d, I]."""
    if expert is None:
        return None
    prefix = name.split(".experts.")[0]
    n_experts, rows, cols = params[param].shape
    if param.endswith("w2"):
        fused, expected = f"{prefix}.experts.down_proj", (n_experts, rows, cols)
    else:
        fused, expected = f"{prefix}.experts.gate_up_proj", (n_experts, 2 * rows, cols)
    if shapes.get(fused) != expected:
        return None
    return Source(fused, param, expert)


# --------------------------------------------------------------------------------- block FP8 checks
def _fp8_block(folder: Path, config: ModelConfig, dtypes: dict[str, str]) -> tuple[int, int] | None:
    """The checkpoint's FP8 block size from config.json, or None for a checkpoint without block-FP8 tensors."""
    qc = config.quantization_config or {}
    if qc.get("quant_method") != "fp8":
        # only float8 tensors mark a block-FP8 checkpoint: other quant_methods' scale tensors are theirs to check
        fp8_tensor = next((t for t, d in dtypes.items() if d.startswith("F8_")), None)
        if fp8_tensor is not None:
            raise CheckpointError(
                f"{folder}: tensor {fp8_tensor} is block FP8 ({dtypes[fp8_tensor]}), but {folder / CONFIG_FILE} "
                f"has no quantization_config with quant_method \"fp8\""
            )
        return None
    block = qc.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: unsupported quantization_config.weight_block_size {block!r}: block FP8 needs "
            f"two positive integers [rows, columns], e.g. [128, 128]"
        )
    if qc.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{folder / CONFIG_FILE}: unsupported quantization_config.fmt {qc['fmt']!r} (only e4m3)")
    return block[0], block[1]


def _fp8_scales(
    files: dict[str, Path], shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], block: tuple[int, int],
) -> dict[str, str]:
    """FP8 weight -> its scale tensor; raises unless every float8 tensor has exactly its scale grid."""
    for t, dtype in dtypes.items():
        if dtype.startswith("F8_") and dtype != SAFETENSORS_FP8:
            raise CheckpointError(f"{files[t]}: tensor {t} is {dtype}; block FP8 is float8_e4m3fn (F8_E4M3)")
        if dtype == SAFETENSORS_FP8 and len(shapes[t]) != 2:
            raise CheckpointError(
                f"{files[t]}: tensor {t} has shape {list(shapes[t])}; block-FP8 weights are matrices "
                f"(routed experts one tensor per expert)"
            )
    scales = {}
    for t in dtypes:
        if not t.endswith(SCALE_SUFFIX):
            continue
        weight = t.removesuffix(SCALE_SUFFIX)
        if dtypes.get(weight) != SAFETENSORS_FP8:
            what = "is not in the checkpoint" if weight not in dtypes else f"is {dtypes[weight]}, not float8_e4m3fn"
            raise CheckpointError(f"{files[t]}: tensor {t} is a block-FP8 scale, but {weight} {what}")
        if dtypes[t] != "F32":
            raise CheckpointError(f"{files[t]}: tensor {t} is {dtypes[t]}; block-FP8 scales are float32")
        expected = scale_shape(shapes[weight], block)
        if shapes[t] != expected:
            raise CheckpointError(
                f"{files[t]}: tensor {t} has shape {list(shapes[t])}, but {weight} {list(shapes[weight])} in "
                f"{block[0]}x{block[1]} blocks (weight_block_size) has {list(expected)}"
            )
        scales[weight] = t
    missing = next((t for t, dtype in dtypes.items() if dtype == SAFETENSORS_FP8 and t not in scales), None)
    if missing is not None:
        raise CheckpointError(
            f"{files[missing]}: tensor {missing} is float8_e4m3fn but has no {missing}{SCALE_SUFFIX} (its scales)"
        )
    return scales


def _keep_fp8(
    model: Transformer, plan: list[tuple[Source, Path]], scales: dict[str, str], block: tuple[int, int],
) -> None:
    """Swap in FP8Linear / FP8RoutedExperts (on the meta device) for the modules whose weights are FP8 on disk.

    A stack of routed experts is kept only whole: w1, w2 and w3 of every expert in FP8."""
    fp8 = {(src.param, src.expert): (src, path) for src, path in plan if src.hf_name in scales}
    stacks: dict[str, list[tuple[Source, Path]]] = {}
    for src, path in plan:
        if src.expert is not None:
            stacks.setdefault(src.param.rpartition(".")[0], []).append((src, path))
    dtype = model.embed.weight.dtype
    for (param, expert), (src, path) in fp8.items():
        if not can_keep_fp8(model, param):
            raise CheckpointError(
                f"{path}: tensor {src.hf_name} is block FP8, which dsv2 keeps only for Linear and routed-expert "
                f"weights; load with fp8=\"dequantize\""
            )
        if expert is None:
            linear = model.get_submodule(param.removesuffix(".weight"))
            with torch.device("meta"):
                swapped = FP8Linear(linear.in_features, linear.out_features, block, dtype)
            model.set_submodule(param.removesuffix(".weight"), swapped)
    for name, sources in stacks.items():
        plain = [(src, path) for src, path in sources if (src.param, src.expert) not in fp8]
        if len(plain) == len(sources):
            continue
        if plain:
            src, path = plain[0]
            raise CheckpointError(
                f"{path}: tensor {src.hf_name} is not block FP8 while other experts of its layer are; fp8=\"keep\" "
                f"needs every routed expert in FP8 (load with fp8=\"dequantize\")"
            )
        n_experts, inter, dim = model.get_submodule(name).w1.shape
        with torch.device("meta"):
            model.set_submodule(name, FP8RoutedExperts(n_experts, dim, inter, block, dtype))


def _read(f, src: Source, target: torch.Tensor) -> torch.Tensor:
    """The data of `src` for `target`, read from the open safetensors file `f`."""
    if src.hf_name.endswith("gate_up_proj"):  # fused [E, 2I, d]: gate rows, then up rows
        rows = f.get_slice(src.hf_name)[src.expert]
        inter = target.shape[0]
        return rows[:inter] if src.param.endswith("w1") else rows[inter:]
    if src.hf_name.endswith("experts.down_proj"):
        return f.get_slice(src.hf_name)[src.expert]
    return f.get_tensor(src.hf_name)


def _copy_in(
    model: Transformer, plan: list[tuple[Source, Path]], progress: bool, files: dict[str, Path],
    block: tuple[int, int] | None,
) -> None:
    """Copy every planned tensor into its parameter, file by file.

    Pages of a memory-mapped file count as resident while mapped, so each file is closed and reopened
    every REOPEN_BYTES read: peak memory stays near the model itself plus that window.
    """
    params = dict(model.named_parameters())
    by_file: dict[Path, list[Source]] = {}
    for src, path in plan:
        by_file.setdefault(path, []).append(src)
    bar = tqdm(total=len(plan), desc="loading weights", unit="tensor", disable=not progress)
    for path, sources in by_file.items():
        pending = iter(sources)
        while batch := _take_bytes(pending, params, REOPEN_BYTES):
            with safe_open(path, framework="pt") as f:
                for src in batch:
                    target = params[src.param] if src.expert is None else params[src.param][src.expert]
                    if src.scale is None:
                        target.copy_(_read(f, src, target))
                    else:
                        scale = _read_scale(f, path, src.scale, files[src.scale])
                        target.copy_(dequantize_block_fp8(f.get_tensor(src.hf_name), scale, block, target.dtype))
                    bar.update()
    bar.close()


def _read_scale(f, path: Path, name: str, scale_path: Path) -> torch.Tensor:
    """A scale tensor, from the open file when it is there, else from its own shard."""
    if scale_path == path:
        return f.get_tensor(name)
    with safe_open(scale_path, framework="pt") as g:
        return g.get_tensor(name)


def _take_bytes(sources: Iterator[Source], params: dict[str, torch.Tensor], limit: int) -> list[Source]:
    """The next sources from the iterator, up to about `limit` bytes of parameters (at least one)."""
    batch, size = [], 0
    for src in sources:
        p = params[src.param]
        batch.append(src)
        size += (p.nbytes if src.expert is None else p[0].nbytes)
        if size >= limit:
            break
    return batch


FP8Mode = Literal["dequantize", "keep"]


@torch.no_grad()
def load_checkpoint(
    folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    progress: bool = True, fp8: FP8Mode = "dequantize",
) -> Transformer:
    """A checkpoint folder -> its model in `dtype`. Block-FP8 weights are dequantized into `dtype`
    (fp8="dequantize") or kept as stored (fp8="keep"); either way every tensor is checked first. A checkpoint
    written by `dsv2 quantize --format int8|int4` loads as it was saved (`model.quant.load_quantized`)."""
    if fp8 not in ("dequantize", "keep"):
        raise ValueError(f"fp8 must be \"dequantize\" or \"keep\", got {fp8!r}")
    folder = Path(folder)
    try:
        config = ModelConfig.from_json(folder / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if str((config.quantization_config or {}).get("quant_method", "")).startswith("dsv2_int"):
        from dsv2.model import quant  # imports this module

        return quant.load_quantized(folder, dtype=dtype, device=device)
    files = weight_files(folder)
    shapes, dtypes = _headers(files)
    block = _fp8_block(folder, config, dtypes)
    scales = {} if block is None else _fp8_scales(files, shapes, dtypes, block)
    with torch.device("meta"):
        model = Transformer(config).to(dtype=dtype)
    weights = {t: path for t, path in files.items() if t not in set(scales.values())}
    plan = _plan(model, folder, weights, shapes)
    if scales and fp8 == "keep":
        _keep_fp8(model, plan, scales, block)
        plan = _plan(model, folder, files, shapes)  # the kept scales are parameters now
    else:
        plan = [(replace(src, scale=scales.get(src.hf_name)), path) for src, path in plan]
    model = model.to_empty(device=device)
    _copy_in(model, plan, progress, files, block)
    if block is not None and fp8 == "dequantize":  # a plain model now: nothing of it is stored in FP8
        absent = config.absent_keys | {"quantization_config"}
        model.config = config.replace(quantization_config=None, absent_keys=absent)
    return model.eval()


# ------------------------------------------------------------------------------------------ save
@dataclass(frozen=True)
class _Out:
    """One HF tensor to write: our parameter `param` (at `expert`), block-FP8 quantized on the way out or not."""

    hf_name: str
    param: str
    expert: int | None
    nbytes: int
    quantize: bool


def _outputs(model: Transformer, fp8_block: tuple[int, int] | None) -> list[_Out]:
    """What `save_model` writes, in order. With `fp8_block`, DeepSeek's FP8 targets that are still plain get
    quantized (kept FP8 modules are written as they are, scales included, like every other parameter)."""
    params = dict(model.named_parameters())
    outs = []
    for name, param, expert, shape in hf_tensors(model):
        p = params[param]
        quantize = fp8_block is not None and p.dtype != FP8_DTYPE and is_deepseek_fp8_target(model, param)
        numel = int(torch.Size(shape).numel())
        if quantize:  # one byte per weight and a float32 scale per block
            nbytes = numel + 4 * int(torch.Size(scale_shape(shape, fp8_block)).numel())
        else:
            nbytes = numel * p.element_size()
        outs.append(_Out(name, param, expert, nbytes, quantize))
    return outs


def _shards(outs: list[_Out], max_shard_bytes: int) -> list[list[_Out]]:
    shards: list[list[_Out]] = [[]]
    size = 0
    for out in outs:
        if shards[-1] and size + out.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(out)
        size += out.nbytes
    return shards


def _kept_fp8_block(model: Transformer) -> tuple[int, int] | None:
    blocks = {m.block for m in model.modules() if isinstance(m, (FP8Linear, FP8RoutedExperts))}
    if len(blocks) > 1:
        raise ValueError(f"the model's FP8 modules use different block sizes {sorted(blocks)}; one checkpoint has one")
    return next(iter(blocks), None)


def finish_shards(folder: Path, names: list[str], weight_map: dict[str, str], total: int) -> None:
    """Once the shard files `names` are written: remove the shards of an earlier save that these replace, and
    write the index (tensor -> file; total bytes) for several shards, or remove a stale one for a single file."""
    for stale in folder.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_text_atomic(folder / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    elif (folder / INDEX_FILE).exists():
        (folder / INDEX_FILE).unlink()


def _saved_config(model: Transformer, block: tuple[int, int] | None) -> ModelConfig:
    """The model's config with the dtype of its plain weights and the quantization_config of what was written."""
    dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
    config = model.config
    if "torch_dtype" in config.absent_keys and "dtype" in config.extra:
        config = config.replace(extra={**config.extra, "dtype": dtype_name})
    else:
        config = config.replace(torch_dtype=dtype_name)
    qc = config.quantization_config
    is_fp8 = qc is not None and qc.get("quant_method") == "fp8"
    if block is not None and not (is_fp8 and list(qc.get("weight_block_size", ())) == list(block)):
        config = config.replace(quantization_config=quantization_config(block))
    elif block is None and qc is None:
        # no quantized weights: no key, since transformers reads even a null one as quantized
        config = config.replace(absent_keys=config.absent_keys | {"quantization_config"})
    return config


@torch.no_grad()
def save_model(
    model: Transformer, folder: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True, fp8_block: tuple[int, int] | None = None,
) -> None:
    """Write config.json and safetensors in DeepSeek's original layout, sharded above `max_shard_bytes`.

    fp8_block: also quantize, tensor by tensor as it is written, DeepSeek's FP8 targets (`dsv2.model.fp8`)
    to block FP8 with that block size, e.g. (128, 128). A model loaded with fp8="keep" writes its FP8
    weights as they are, with or without this, and so saves back bit-identically.

    Each file is written to a temporary name and renamed, the index and config last; stale shards of an
    earlier save into the same folder are removed.
    """
    kept = _kept_fp8_block(model)
    if fp8_block is not None:
        fp8_block = (int(fp8_block[0]), int(fp8_block[1]))
        if kept is not None and kept != fp8_block:
            raise ValueError(f"the model is kept in FP8 blocks of {list(kept)}, not {list(fp8_block)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    shards = _shards(_outputs(model, fp8_block), max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map, total = {}, 0
    shard_files = list(zip(names, shards, strict=True))
    for file, shard in tqdm(shard_files, desc="saving weights", unit="shard", disable=not progress):
        tensors = {}
        for out in shard:
            t = params[out.param] if out.expert is None else params[out.param][out.expert]
            t = t.detach().to("cpu")
            if out.quantize:
                tensors[out.hf_name], tensors[out.hf_name + SCALE_SUFFIX] = quantize_block_fp8(t, fp8_block)
            else:
                tensors[out.hf_name] = t.contiguous().clone()
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.nbytes
        with atomic_path(folder / file) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    finish_shards(folder, names, weight_map, total)
    _saved_config(model, fp8_block or kept).to_json(folder / CONFIG_FILE)


# ----------------------------------------------------------------------------------- public API
def load_model(
    path_or_preset: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    seed: int | None = None, progress: bool = True, fp8: FP8Mode = "dequantize",
) -> Transformer:
    """A checkpoint folder -> its model; a preset name -> a randomly initialised model (std = initializer_range).

    fp8: for a block-FP8 checkpoint, "dequantize" its weights into `dtype` (a plain model) or "keep" them
    in FP8 (FP8Linear / FP8RoutedExperts, dequantized at use into the activations' dtype)."""
    path = Path(path_or_preset)
    if path.is_dir():
        return load_checkpoint(path, dtype=dtype, device=device, progress=progress, fp8=fp8)
    try:
        config = preset(str(path_or_preset))
    except ConfigError:
        raise CheckpointError(
            f"{path_or_preset!r} is neither a checkpoint folder nor a preset "
            f"(presets: {', '.join(PRESETS)})"
        ) from None
    return random_model(config, dtype=dtype, device=device, seed=seed)


def random_model(
    config: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    seed: int | None = None,
) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    return model.eval()
