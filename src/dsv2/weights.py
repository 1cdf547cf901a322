"""Hugging Face checkpoints: the one name map between HF tensors and ours, safetensors load and save.

A checkpoint folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`, with DeepSeek's original tensor names (one tensor per routed expert).
Loading builds the model on the meta device, allocates it once in the target dtype and copies every
tensor in from the memory-mapped files, so peak memory stays near one copy of the weights. Everything
is checked before anything is allocated: a bad folder raises `CheckpointError` naming the file and
tensor and leaves nothing half-loaded. Only safetensors are read; pickles are never opened.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dsv2.atomic import atomic_path, write_text_atomic
from dsv2.config import PRESETS, ConfigError, ModelConfig, preset
from dsv2.model import Transformer

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
REOPEN_BYTES = 128 * 1024**2

# HF module name -> ours (DeepSeek-V3 inference naming), applied per dotted segment.
HF_TO_DSV2 = {
    "embed_tokens": "embed",
    "lm_head": "head",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn": "attn",
    "q_proj": "wq",
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
_ROUTED = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(w[123])$")


class CheckpointError(ValueError):
    """A checkpoint folder is unusable; the message names the file and tensor."""


def hf_name(name: str) -> str:
    """Our parameter name -> its HF name (not for the stacked routed-expert tensors)."""
    hf = ".".join(DSV2_TO_HF.get(part, part) for part in name.split("."))
    return hf if hf.startswith("lm_head") else f"model.{hf}"


@dataclass(frozen=True)
class Source:
    """Where one HF tensor's data goes: our parameter `param`, at `expert` (stacked experts) and, for
    transformers-5 fused tensors, rows `rows` of the HF tensor."""

    hf_name: str
    param: str
    expert: int | None = None


def hf_tensors(model: Transformer) -> Iterator[tuple[str, str, int | None, tuple[int, ...]]]:
    """Every HF tensor of the original layout: (hf name, our param, expert index or None, shape)."""
    for name, p in model.named_parameters():
        m = _ROUTED.match(name)
        if m is None:
            yield hf_name(name), name, None, tuple(p.shape)
            continue
        layer, w = m.groups()
        for e in range(p.shape[0]):
            yield f"model.layers.{layer}.mlp.experts.{e}.{DSV2_TO_HF[w]}.weight", name, e, tuple(p.shape[1:])


# ------------------------------------------------------------------------------------------ load
def _weight_files(folder: Path) -> dict[str, Path]:
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


def _shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Read every tensor's shape from the headers, checking each file opens and holds what the index says."""
    by_file: dict[Path, list[str]] = {}
    for tensor, path in files.items():
        by_file.setdefault(path, []).append(tensor)
    shapes = {}
    for path, tensors in by_file.items():
        try:
            with safe_open(path, framework="pt") as f:
                present = set(f.keys())
                for t in tensors:
                    if t not in present:
                        raise CheckpointError(f"{path}: the index lists tensor {t} in this file, but it is not there")
                    shapes[t] = tuple(f.get_slice(t).get_shape())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return shapes


def _plan(model: Transformer, folder: Path, files: dict[str, Path]) -> list[tuple[Source, Path]]:
    """Match the files' tensors against the model's, by name and shape; raise on any difference."""
    shapes = _shapes(files)
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


def _read(f, src: Source, target: torch.Tensor) -> torch.Tensor:
    """The data of `src` for `target`, read from the open safetensors file `f`."""
    if src.hf_name.endswith("gate_up_proj"):  # fused [E, 2I, d]: gate rows, then up rows
        rows = f.get_slice(src.hf_name)[src.expert]
        inter = target.shape[0]
        return rows[:inter] if src.param.endswith("w1") else rows[inter:]
    if src.hf_name.endswith("experts.down_proj"):
        return f.get_slice(src.hf_name)[src.expert]
    return f.get_tensor(src.hf_name)


def _copy_in(model: Transformer, plan: list[tuple[Source, Path]], progress: bool) -> None:
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
                    target.copy_(_read(f, src, target))
                    bar.update()
    bar.close()


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


@torch.no_grad()
def load_checkpoint(
    folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    progress: bool = True,
) -> Transformer:
    folder = Path(folder)
    try:
        config = ModelConfig.from_json(folder / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = _weight_files(folder)
    with torch.device("meta"):
        model = Transformer(config)
    plan = _plan(model, folder, files)
    model = model.to(dtype=dtype).to_empty(device=device)
    _copy_in(model, plan, progress)
    return model.eval()


# ------------------------------------------------------------------------------------------ save
def _shard_names(model: Transformer, max_shard_bytes: int) -> list[list[tuple[str, str, int | None]]]:
    shards: list[list[tuple[str, str, int | None]]] = [[]]
    size = 0
    elt = next(model.parameters()).element_size()
    for name, param, expert, shape in hf_tensors(model):
        nbytes = elt * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, param, expert))
        size += nbytes
    return shards


@torch.no_grad()
def save_model(
    model: Transformer, folder: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> None:
    """Write config.json and safetensors in DeepSeek's original layout, sharded above `max_shard_bytes`.

    Each file is written to a temporary name and renamed, the index and config last; stale shards of an
    earlier save into the same folder are removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    shards = _shard_names(model, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map = {}
    shard_files = list(zip(names, shards, strict=True))
    for file, shard in tqdm(shard_files, desc="saving weights", unit="shard", disable=not progress):
        tensors = {}
        for name, param, expert in shard:
            t = params[param] if expert is None else params[param][expert]
            tensors[name] = t.detach().to("cpu").contiguous().clone()
            weight_map[name] = file
        with atomic_path(folder / file) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    for stale in folder.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    if len(shards) > 1:
        total = sum(p.numel() * p.element_size() for p in params.values() if p is not None)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_text_atomic(folder / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    elif (folder / INDEX_FILE).exists():
        (folder / INDEX_FILE).unlink()
    dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
    config = model.config
    if "torch_dtype" in config.absent_keys and "dtype" in config.extra:
        config = config.replace(extra={**config.extra, "dtype": dtype_name})
    else:
        config = config.replace(torch_dtype=dtype_name)
    config.to_json(folder / CONFIG_FILE)


# ----------------------------------------------------------------------------------- public API
def load_model(
    path_or_preset: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    seed: int | None = None, progress: bool = True,
) -> Transformer:
    """A checkpoint folder -> its model; a preset name -> a randomly initialised model (std = initializer_range)."""
    path = Path(path_or_preset)
    if path.is_dir():
        return load_checkpoint(path, dtype=dtype, device=device, progress=progress)
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
