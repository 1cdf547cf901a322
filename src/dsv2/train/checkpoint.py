"""Training checkpoints: atomic, resumable, the model in the Hugging Face layout.

    RUN/checkpoints/step_000100/
        config.json, model.safetensors     the model, loadable by dsv2.load_model and transformers
        trainer.pt                          optimizer state and RNG states (tensors only: loaded with
                                            weights_only=True, so nothing arbitrary is unpickled)
        state.json                          step, data-loader position, anything else JSON

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

from dsv2.model import Transformer
from dsv2.weights import load_model, save_model

CHECKPOINTS = "checkpoints"
PREFIX = "step_"


def _fsync_tree(folder: Path) -> None:
    """fsync the files directly in `folder`, then the folder itself (its entries)."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | os.PathLike, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
    state: dict[str, Any], keep_last: int = 2,
) -> Path:
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, tmp, progress=False)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_tree(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
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


def load_checkpoint(
    path: str | os.PathLike, optimizer_factory, device: str | torch.device = "cpu",
) -> tuple[Transformer, torch.optim.Optimizer, dict[str, Any]]:
    """Model, optimizer (built by `optimizer_factory(model)` then restored) and state.json of a checkpoint;
    the RNG states are restored as a side effect, so the run continues exactly."""
    path = Path(path)
    model = load_model(path, dtype=torch.float32, device=device, progress=False).train()
    optimizer = optimizer_factory(model)
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    torch.set_rng_state(trainer["rng"]["torch"])
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
    state = json.loads((path / "state.json").read_text())
    return model, optimizer, state
