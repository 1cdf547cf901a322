"""Plots (matplotlib, written as PNG files) of a training run: losses, learning rate, expert load, and for a GRPO
run the reward curve; of the long-context evaluations: loss by position, the needle heatmap; and of an ablation
study: curves with their spread over seeds, bars with error bars."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training box
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dsv2.atomic import atomic_path  # noqa: E402


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics; is {run_dir} a training run folder?")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON line") from None
    if not rows:
        raise ValueError(f"{path}: empty")
    return rows


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write loss.png, lr.png, expert_load.png and, for a GRPO run, reward.png; returns their paths."""
    rows = read_metrics(run_dir)
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], label="train", lw=1)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set(xlabel="step", ylabel="next-token loss (nats)", title="loss")
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(_save(fig, out / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [r["lr"] for r in rows])
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate (warmup, then ×0.316 at 60% and 90%)")
    ax.grid(alpha=0.3)
    written.append(_save(fig, out / "lr.png"))

    if "reward" in rows[0]:
        written.append(_reward_plot(steps, rows, out / "reward.png"))

    layers = rows[-1].get("layers") or []
    if layers:
        recent = [r["layers"] for r in rows[-max(1, len(rows) // 10):]]  # the last 10% of steps
        load = np.mean([[layer["load"] for layer in step] for step in recent], axis=0)  # [moe layer, expert]
        fig, ax = plt.subplots(figsize=(max(6, load.shape[1] * 0.25), 1 + 0.4 * load.shape[0]))
        im = ax.imshow(load * load.shape[1], aspect="auto", cmap="viridis")  # 1.0 = perfectly balanced
        ax.set(xlabel="expert", ylabel="MoE layer", title="expert load (× fair share), last 10% of steps")
        fig.colorbar(im, ax=ax)
        written.append(_save(fig, out / "expert_load.png"))
    return written


def _reward_plot(steps: list[int], rows: list[dict], path: Path) -> Path:
    """Mean reward of each step's rollouts and its moving average (a step samples only a few prompts), and the KL
    to the reference beside it."""
    reward = np.array([r["reward"] for r in rows])
    window = max(1, len(rows) // 10)
    smooth = np.convolve(reward, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, reward, lw=0.8, alpha=0.5, label="mean reward of the step")
    ax.plot(steps[window - 1 :], smooth, lw=2, color="tab:blue", label=f"moving average ({window} steps)")
    ax.set(xlabel="step", ylabel="reward", title="GRPO: reward of the sampled completions")
    ax.grid(alpha=0.3)
    if "kl" in rows[0]:
        kl_ax = ax.twinx()
        kl_ax.plot(steps, [r["kl"] for r in rows], color="tab:red", lw=0.8, alpha=0.6)
        kl_ax.set_ylabel("KL to the reference (k3)", color="tab:red")
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_loss_by_position(curves: dict[str, list[dict]], path: str | os.PathLike,
                          marks: dict[str, int] | None = None) -> Path:
    """Validation loss against token position, one line per model (`eval.long_context.position_bins` of
    each), with vertical lines at `marks` (e.g. {"L0": 128}: the length a model was pretrained at)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, bins in curves.items():
        ax.plot([(b["start"] + b["end"]) / 2 for b in bins], [b["loss"] for b in bins], "o-", ms=3, label=label)
    for name, at in (marks or {}).items():
        ax.axvline(at, color="grey", ls="--", lw=1)
        ax.annotate(name, (at, 1), xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points")
    ax.set(xlabel="token position", ylabel="next-token loss (nats)", title="validation loss by position")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_needle(result: dict, path: str | os.PathLike, title: str = "pass-key retrieval") -> Path:
    """The needle-in-a-haystack heatmap in the style of the paper's Figure 4: context length across, the
    needle's depth down, exact-match accuracy from red (0) to green (1)."""
    acc = np.array(result["accuracy"]).T  # [depth, length]
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * acc.shape[1], 1 + 0.35 * acc.shape[0]))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(acc.shape[1]), [str(n) for n in result["lengths"]])
    ax.set_yticks(range(acc.shape[0]), [f"{d:.0%}" for d in result["depths"]])
    ax.set(xlabel="context length (tokens)", ylabel="needle depth", title=title)
    for (i, j), v in np.ndenumerate(acc):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="accuracy")
    return _save(fig, Path(path))


def plot_seed_curves(curves: dict[str, list[list[list[float]]]], path: str | os.PathLike, xlabel: str, ylabel: str,
                     title: str) -> Path:
    """One line per variant: the mean over its seeds' curves ([[x, y], ...] each, at the same x), in a band from
    the lowest to the highest seed."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, seeds in curves.items():
        points = np.array(seeds)  # [seed, point, (x, y)]
        x, y = points[0, :, 0], points[:, :, 1]
        (line,) = ax.plot(x, y.mean(axis=0), lw=1.5, label=f"{label} ({len(seeds)} seeds)")
        ax.fill_between(x, y.min(axis=0), y.max(axis=0), color=line.get_color(), alpha=0.2, lw=0)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_bars(values: dict[str, tuple[float, float]], path: str | os.PathLike, ylabel: str, title: str,
              notes: dict[str, str] | None = None) -> Path:
    """A bar per label at its (mean, spread) with the spread as an error bar; the axis starts near the lowest bar,
    since the differences an ablation looks at are small against the values; `notes` are written under the names."""
    labels = list(values)
    means = np.array([values[k][0] for k in labels])
    errors = np.array([values[k][1] for k in labels])
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 1.3 * len(labels)), 4))
    ax.bar(range(len(labels)), means, yerr=errors, capsize=6, color=[f"C{i}" for i in range(len(labels))])
    ticks = [f"{k}\n{notes[k]}" if notes and k in notes else k for k in labels]
    ax.set_xticks(range(len(labels)), ticks)
    span = float((means + errors).max() - (means - errors).min()) or float(abs(means).max()) or 1.0
    ax.set_ylim(float((means - errors).min()) - span, float((means + errors).max()) + 0.5 * span)
    for i, (m, e) in enumerate(zip(means, errors, strict=True)):
        ax.annotate(f"{m:.3f}", (i, m + e), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, Path(path))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
