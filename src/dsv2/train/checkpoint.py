"""Training checkpoints: atomic, resumable, the model in the Hugging Face layout.

    RUN/checkpoints/step_000100/
        config.json, model.safetensors     the model, loadable by dsv2.load_model and transformers
        trainer.pt                          optimizer state and RNG states (tensors only: loaded with
                                            weights_only=True, so nothing arbitrary is unpickled)
        state.json                          step, number of processes, data-loader position, anything else JSON

A run on W > 1 processes (torchrun) writes the same folder: the model gathered into full tensors by rank 0,
and one `trainer.rank{r}.pt` per rank with that rank's shard of the optimizer state and its RNG states, so it
resumes on W processes only (`check_world_size` says so before any work starts).

A checkpoint is written into a hidden temporary folder, every file fsync'ed, then renamed into place:
the rename is the commit, so a crash mid-write leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dsv2.atomic import fsync_dir, fsync_file, write_text_atomic
from dsv2.model import Transformer
from dsv2.train import parallel
from dsv2.train.distributed import Distributed
from dsv2.weights import load_model, save_model

CHECKPOINTS = "checkpoints"
PREFIX = "step_"
ADAPTER_DIR = "adapter"  # an adapter run's adapter alone (PEFT's layout), in checkpoints and as RUN/adapter


def _fsync_tree(folder: Path) -> None:
    """fsync the files directly in `folder`, then the folder itself (its entries)."""
    for path in folder.iterdir():
        if path.is_file():
            fsync_file(path)
    fsync_dir(folder)


def trainer_file(rank: int, world: int) -> str:
    return "trainer.pt" if world == 1 else f"trainer.rank{rank}.pt"


def save_checkpoint(
    run_dir: str | os.PathLike, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
    state: dict[str, Any], keep_last: int = 2, dist: Distributed | None = None, adapter=None,
) -> Path:
    """Write checkpoint `step`; with several processes every rank calls it (the weights are gathered). With an
    `adapter` (`train.core.Adapter`, one process) the model files hold the merged weights, loadable like any
    model, and `adapter/` the adapter, which is what a resumed run restores."""
    dist = dist or Distributed()
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".{final.name}.tmp"
    full = parallel.full_model(model)  # collective; None on ranks other than 0
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()  # the folder exists before any rank writes into it
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    trainer = {"optimizer": parallel.local_optimizer_state(optimizer), "rng": rng}
    torch.save(trainer, tmp / trainer_file(dist.rank, dist.world))
    if dist.is_main:
        if adapter is not None:
            adapter.save(full, tmp / ADAPTER_DIR)
            full = adapter.merged(full)
        save_model(full, tmp, progress=False)
        write_text_atomic(tmp / "state.json", json.dumps({"step": step, "world_size": dist.world, **state}, indent=1))
    dist.barrier()  # every rank's file is written before rank 0 commits
    if dist.is_main:
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_tree(root)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()  # committed before any rank goes on
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def check_world_size(path: str | os.PathLike, world: int) -> None:
    """A checkpoint resumes on the number of processes that wrote it: its optimizer state is sharded by rank."""
    state_file = Path(path) / "state.json"
    saved = json.loads(state_file.read_text()).get("world_size", 1)
    if saved != world:
        raise ValueError(f"{state_file}: world_size is {saved} but this run has {world} process(es); resume with "
                         f"the same number (torchrun --nproc-per-node {saved}), or start a new run from "
                         f"{path} with --model {path}")


def load_checkpoint(
    path: str | os.PathLike, optimizer_factory, device: str | torch.device = "cpu",
    prepare=None, dist: Distributed | None = None, model: Transformer | None = None,
) -> tuple[Transformer, torch.optim.Optimizer, dict[str, Any]]:
    """Model, optimizer (built by `optimizer_factory(model)` then restored) and state.json of a checkpoint;
    the RNG states are restored as a side effect, so the run continues exactly. `prepare(model)` (e.g.
    `parallel.parallelize`) is applied to the loaded model before the optimizer is built. `model`: the model
    to continue instead of the checkpoint's weights (an adapter run, whose adapter its caller restored)."""
    path = Path(path)
    dist = dist or Distributed()
    check_world_size(path, dist.world)
    if model is None:
        model = load_model(path, dtype=torch.float32, device=device, progress=False).train()
    if prepare is not None:
        model = prepare(model)
    optimizer = optimizer_factory(model)
    trainer = torch.load(path / trainer_file(dist.rank, dist.world), map_location="cpu", weights_only=True)
    parallel.load_local_optimizer_state(optimizer, trainer["optimizer"])
    torch.set_rng_state(trainer["rng"]["torch"])
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
    state = json.loads((path / "state.json").read_text())
    return model, optimizer, state
