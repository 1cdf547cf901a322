"""Ablation studies at small scale (paper Appendix D, §2.2.1): every variant of a study trained on the same
tokens, several seeds each, and compared by validation loss, KV cache, training speed and parameters.

    run_study(AblateConfig(study="moe"))   # what `dsv2 ablate moe` runs

The studies (`STUDIES`):

    attention  MLA vs MHA / GQA / MQA at equal total parameters (Appendix D.1-D.2, Tables 8-9)
    moe        DeepSeekMoE vs GShard-style top-2 MoE vs dense at equal active parameters (§2.2.1)
    cost       the V2-shaped base vs 67B-shaped dense GQA models of 1-3x its active parameters: which dense model
               matches its loss, at what training FLOPs and time per token (§3.2.3's 42.5%)

Each run is the pretraining stage (`train/pretrain.py`) on `core.run`, with the variant's `config_overrides`
on the base model (nano by default) and the study's shared tokenizer and shards: the same steps, batch,
sequence length, schedule and validation batches for every run, so the training tokens are equal by
construction (and checked from each run's metrics). Seeds change the initial weights and the data order.

OUT (default runs/ablate/STUDY) holds:

    tokenizer.json, data/              one BPE and one set of shards for every run of the study
    runs/VARIANT/seed_N/               a pretraining run folder (metrics.jsonl, model/), result.json once done
    results.json, results.md           per variant: parameters, KV bytes, FLOPs, tokens/s, val loss mean ± std
    loss_curves.png, val_loss.png      validation loss against tokens (mean, min-max band over the seeds);
                                       the final validation loss of each variant with its spread

A finished run (its result.json, written atomically last) is reused when the study is run again with the same
settings, an interrupted one resumes from its latest checkpoint, and a run folder trained with other settings
is refused, naming the first setting that differs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv2.atomic import write_text_atomic
from dsv2.config import ModelConfig
from dsv2.hardware import describe
from dsv2.info import summarize, train_flops_per_token
from dsv2.plots import plot_bars, plot_seed_curves, read_metrics
from dsv2.train import checkpoint, core, pretrain
from dsv2.train.distributed import Distributed

RESULT_FILE = "result.json"


# ------------------------------------------------------------------------------------------ studies
@dataclass(frozen=True)
class Variant:
    name: str  # short id: the run folder's name and the key in results.json
    label: str  # what it is, for tables and plots
    overrides: dict[str, Any]  # ModelConfig fields changed on the study's base config


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    matched: str | None  # the summarize() count the variants are sized to share (total_params, active_params), or
    #                      None when they differ by design
    variants: Callable[[ModelConfig], list[Variant]]  # sized against the base config
    paper_order: tuple[str, ...]  # the paper's ranking, best (lowest loss) first
    paper_claim: str


# MLA against the attention it replaces (Appendix D.1-D.2): the variants keep the base's query heads and every
# other part of the model, and get the head dim d_h that brings their total parameters closest to MLA's, so a
# variant that caches less spends the parameters on wider heads. GQA shares a key/value head between two query
# heads. (The paper instead matched ~7B by the layer count, too coarse a knob at four layers.)
def attention_variants(base: ModelConfig) -> list[Variant]:
    heads = base.num_attention_heads
    if heads < 4 or heads % 2:
        raise ValueError(f"num_attention_heads: the attention study needs an even number >= 4 (so that GQA lies "
                         f"between MHA and MQA), got {heads}")
    mla = {"attention": "mla"}
    target = _count(base, mla)
    variants = [Variant("mla", f"MLA: {heads} heads, latent d_c {base.kv_lora_rank}, d_h {base.qk_nope_head_dim} + "
                        f"RoPE d_h^R {base.qk_rope_head_dim}", mla)]
    for name, kv in (("mha", heads), ("gqa", heads // 2), ("mqa", 1)):
        fixed = {"attention": name, "num_key_value_heads": kv}
        head_dim = _closest(base, fixed, "head_dim", target)  # even: RoPE rotates pairs
        variants.append(Variant(name, f"{name.upper()}: {heads} query heads, {kv} key/value head{'s' * (kv > 1)}, "
                                f"d_h {head_dim}", {**fixed, "head_dim": head_dim}))
    return variants


def _count(base: ModelConfig, overrides: dict[str, Any], count: str = "total_params") -> int:
    return summarize(ModelConfig.from_dict({**base.to_dict(), **overrides}))[count]


def _closest(base: ModelConfig, overrides: dict[str, Any], field: str, target: int, count: str = "total_params",
             multiple: int = 2) -> int:
    """The multiple of `multiple` for `field` whose model's `count` of parameters is closest to `target`. The count
    is linear in a head dim or an MLP width, so two sizes give the line and the two multiples around its
    solution decide."""
    def at(x: int) -> int:
        return _count(base, {**overrides, field: x}, count)

    one, two = at(multiple), at(2 * multiple)
    exact = multiple + multiple * (target - one) / (two - one)
    low = max(multiple, multiple * math.floor(exact / multiple))
    return min((low, low + multiple), key=lambda x: abs(at(x) - target))


# DeepSeekMoE against its baselines (paper §2.2.1; DeepSeekMoE, Dai et al. 2024, §3): the GShard-style layer has
# COARSE_EXPERTS experts of width w and routes each token to the top COARSE_TOP_K; DeepSeekMoE cuts every
# coarse expert into SEGMENTS experts of width w / SEGMENTS (fine-grained segmentation) and isolates SHARED of
# them as shared experts, so both hold the same expert parameters and every token passes through the same
# COARSE_TOP_K · w intermediate width, as does the dense model's MLP. Routing is plain greedy top-k (no device
# groups) for both: the study compares the layer, not device-limited routing.
COARSE_EXPERTS, COARSE_TOP_K, SEGMENTS, SHARED = 8, 2, 4, 2


def moe_variants(base: ModelConfig) -> list[Variant]:
    fine = max(1, base.moe_intermediate_size // 2)
    coarse = SEGMENTS * fine
    # every layer's FFN, dense or MoE, has the same active width; no device groups
    common = dict(intermediate_size=COARSE_TOP_K * coarse, topk_method="greedy", n_group=1, topk_group=1,
                  routed_scaling_factor=1.0)
    routed, k = SEGMENTS * COARSE_EXPERTS - SHARED, SEGMENTS * COARSE_TOP_K - SHARED
    return [
        Variant("deepseekmoe", f"{SHARED} shared + top-{k} of {routed} routed experts of width {fine}",
                dict(common, n_shared_experts=SHARED, n_routed_experts=routed, num_experts_per_tok=k,
                     moe_intermediate_size=fine, norm_topk_prob=False)),
        # GShard normalises the two gate values to sum to one
        Variant("gshard", f"top-{COARSE_TOP_K} of {COARSE_EXPERTS} experts of width {coarse}, "
                "no shared expert",
                dict(common, n_shared_experts=None, n_routed_experts=COARSE_EXPERTS, num_experts_per_tok=COARSE_TOP_K,
                     moe_intermediate_size=coarse, norm_topk_prob=True)),
        Variant("dense", f"a SwiGLU MLP of width {COARSE_TOP_K * coarse} in every layer",
                dict(common, n_shared_experts=None, n_routed_experts=None, num_experts_per_tok=None)),
    ]


# DeepSeek-V2 against DeepSeek 67B (§3.2.3: 42.5% less training compute per token, and a stronger model): the
# base (MLA + DeepSeekMoE) against 67B-shaped models, dense with GQA (a key/value head per two query heads; 67B's
# one per eight would be MQA at four heads) and Llama's head dim, at DENSE_MULTIPLES times the base's active
# parameters (67B has 3.2 times V2's), so the dense model of comparable loss, and its cost, can be read off.
DENSE_MULTIPLES = (1, 2, 3)


def cost_variants(base: ModelConfig) -> list[Variant]:
    active = _count(base, {}, "active_params")
    dense = {"attention": "gqa", "num_key_value_heads": max(1, base.num_attention_heads // 2), "head_dim": None,
             "n_routed_experts": None, "n_shared_experts": None, "num_experts_per_tok": None}
    variants = [Variant("v2", f"the base: {base.attention.upper()} + "
                        + (f"{base.n_shared_experts or 0} shared + top-{base.num_experts_per_tok} of "
                           f"{base.n_routed_experts} routed experts" if base.n_routed_experts else "dense MLP"), {})]
    for m in DENSE_MULTIPLES:
        width = _closest(base, dense, "intermediate_size", m * active, "active_params", multiple=8)
        variants.append(Variant(f"dense-{m}x", f"dense GQA ({dense['num_key_value_heads']} key/value heads), MLP "
                                f"width {width}: {m}x the base's active parameters",
                                {**dense, "intermediate_size": width}))
    return variants


STUDIES: dict[str, Study] = {
    "attention": Study("attention", "MLA vs MHA vs GQA vs MQA, at equal total parameters", "total_params",
                       attention_variants, ("mla", "mha", "gqa", "mqa"),
                       "MLA ≥ MHA > GQA > MQA (Appendix D.1-D.2, Tables 8-9)"),
    "moe": Study("moe", "DeepSeekMoE vs GShard-style MoE vs dense, at equal active parameters", "active_params",
                 moe_variants, ("deepseekmoe", "gshard", "dense"),
                 "DeepSeekMoE > GShard > dense at equal active parameters (paper §2.2.1; DeepSeekMoE Table 1)"),
    "cost": Study("cost", "V2-shaped MLA + DeepSeekMoE vs 67B-shaped dense GQA: loss against training cost per token",
                  None, cost_variants, ("v2", f"dense-{DENSE_MULTIPLES[-1]}x"),
                  "DeepSeek-V2 outperforms DeepSeek 67B, a dense model of 3.2x its active parameters, at 42.5% "
                  "lower training cost per token (§3.2.3)"),
}


# ------------------------------------------------------------------------------------------- config
@dataclass
class AblateConfig(pretrain.PretrainConfig):
    """A study and the training every one of its runs shares; `model` and `config_overrides` give the base
    config the variants change. Defaults: the nano preset, 200 steps of 16 x 128 tokens (410K tokens per run),
    3 seeds: a study of 9-12 runs in about ten minutes on two CPU cores."""

    study: str = "moe"
    seeds: int = 3  # seeds 0 .. seeds-1 of every variant
    variants: tuple[str, ...] | None = None  # a subset of the study's variants (None: all)
    out: str = ""  # "" = runs/ablate/STUDY
    steps: int = 200
    warmup_steps: int = 20
    eval_every: int = 20
    eval_batches: int = 16
    save_every: int = 50
    keep_last: int = 1

    @property
    def folder(self) -> Path:
        return Path(self.out or f"runs/ablate/{self.study}")

    def validate(self, world: int = 1) -> None:
        if self.study not in STUDIES:
            raise ValueError(f"study: unknown {self.study!r}; choose one of: {', '.join(STUDIES)}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds: must be an integer >= 1, got {self.seeds!r}")
        if self.resume:
            raise ValueError("resume: an ablation study always reuses finished runs and resumes cut-short ones")
        super().validate(world)

    def run_config(self, variant: Variant, seed: int) -> pretrain.PretrainConfig:
        """The pretraining config of one run: the shared settings, the variant's overrides, the seed."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(pretrain.PretrainConfig)}
        return pretrain.PretrainConfig(**{
            **shared, "out": str(self.folder / "runs" / variant.name / f"seed_{seed}"), "seed": seed,
            "config_overrides": {**self.config_overrides, **variant.overrides}})


def study_variants(cfg: AblateConfig) -> list[Variant]:
    """The study's variants sized on the base config (`model` + `config_overrides`), or the chosen subset."""
    study = STUDIES[cfg.study]
    variants = study.variants(core.model_config(cfg))
    if cfg.variants is None:
        return variants
    names = [v.name for v in variants]
    for name in cfg.variants:
        if name not in names:
            raise ValueError(f"variants: {name!r} is not a variant of the {cfg.study} study ({', '.join(names)})")
    return [v for v in variants if v.name in cfg.variants]


# --------------------------------------------------------------------------------------------- runs
def _spec(cfg: pretrain.PretrainConfig) -> dict[str, Any]:
    """What makes two runs the same run: every setting but the progress bar."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress", "resume")}


def _check_same(run: pretrain.PretrainConfig, stored: dict[str, Any], what: str) -> None:
    """Refuse a run folder that holds another run (`stored`: its settings), naming the first setting that differs."""
    spec = json.loads(json.dumps(_spec(run)))  # tuples as lists, as the files have them
    for key, value in spec.items():
        if stored.get(key) != value:
            raise ValueError(f"{run.out}: {what} with {key}={stored.get(key)!r}, not {value!r}; give the study "
                             "another --out (or remove that folder)")


def _finished(run: pretrain.PretrainConfig) -> dict[str, Any] | None:
    """The run's result if it finished with these settings; None if it has not; an error if it was another run."""
    path = Path(run.out) / RESULT_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    _check_same(run, result["spec"], "a finished run")
    return result


def _result(run: pretrain.PretrainConfig) -> dict[str, Any]:
    """A finished run's figures, from its metrics.jsonl."""
    rows = read_metrics(run.out)
    speeds = [r["tokens_per_s"] for r in rows[1:]] or [rows[0]["tokens_per_s"]]  # the first step warms up
    return {
        "spec": _spec(run),
        "seed": run.seed,
        "steps": rows[-1]["step"],
        "tokens": rows[-1]["tokens"],
        "val_loss": rows[-1]["val_loss"],
        "tokens_per_s": statistics.median(speeds),
        "val_curve": [[r["tokens"], r["val_loss"]] for r in rows if "val_loss" in r],
        "train_loss": [r["loss"] for r in rows],
    }


def train_run(run: pretrain.PretrainConfig, prepared: Any, dist: Distributed) -> dict[str, Any]:
    """Train one run (resuming it if cut short) and record its result; its checkpoints, which only a cut-short
    run needs, are removed once the result is written."""
    out = Path(run.out)
    resume = checkpoint.latest_checkpoint(out) is not None
    if resume:  # the settings core.run recorded when the run started (with the pretraining length it adds)
        _check_same(pretrain.recording_length(run), json.loads((out / "train_config.json").read_text()),
                    "a cut-short run")
    core.run(pretrain.stage(dataclasses.replace(run, resume=resume), dist, prepared), dist)
    result = _result(run)
    write_text_atomic(out / RESULT_FILE, json.dumps(result, indent=1))
    shutil.rmtree(out / checkpoint.CHECKPOINTS, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------ summary
def _variant_summary(cfg: AblateConfig, variant: Variant, runs: list[dict[str, Any]]) -> dict[str, Any]:
    config = core.model_config(cfg.run_config(variant, 0))
    s = summarize(config)
    losses = [r["val_loss"] for r in runs]
    return {
        "name": variant.name, "label": variant.label, "overrides": variant.overrides,
        "total_params": s["total_params"], "active_params": s["active_params"],
        "kv_cache_bytes_per_token": s["kv_cache_bytes_per_token"],
        "train_flops_per_token": train_flops_per_token(config, cfg.seq_len),
        "tokens": runs[0]["tokens"],
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
        "val_loss_mean": statistics.mean(losses),
        "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "val_loss_min": min(losses), "val_loss_max": max(losses),
        "runs": runs,
    }


def paper_ordering(study: Study, variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each adjacent pair of the paper's ranking among the variants run: whether the small scale has the
    better-ranked one ahead (lower mean validation loss), and whether the gap exceeds the two spreads (std)."""
    by_name = {v["name"]: v for v in variants}
    ranked = [by_name[name] for name in study.paper_order if name in by_name]
    pairs = []
    for a, b in zip(ranked, ranked[1:], strict=False):
        gap = b["val_loss_mean"] - a["val_loss_mean"]
        pairs.append({"better": a["name"], "worse": b["name"], "gap": gap, "holds": gap > 0,
                      "beyond_spread": abs(gap) > a["val_loss_std"] + b["val_loss_std"]})
    return pairs


def _markdown(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    lines = [
        f"# {summary['title']}",
        "",
        f"{s['seeds']} seeds per variant; each run {summary['training_tokens']:,} training tokens ({s['steps']} steps "
        f"of {s['batch_size']} x {s['seq_len']}), base `{s['model']}`; validation loss on the same "
        f"{s['eval_batches']} x {s['batch_size']} x {s['seq_len']} held-out tokens. "
        + (f"Matched: {summary['matched'].replace('_', ' ')} (spread {summary['matched_spread']:.1%})."
           if summary["matched"] else "The sizes differ by design.") + f" {summary['hardware']}.",
        "",
        "| variant | total params | active params | KV cache / token (bf16) | train FLOPs / token | tokens/s | "
        "val loss (mean ± std) | min - max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in summary["variants"]:
        lines.append(
            f"| {v['name']} | {v['total_params']:,} | {v['active_params']:,} | {v['kv_cache_bytes_per_token']:,} B | "
            f"{v['train_flops_per_token'] / 1e6:.2f} M | {v['tokens_per_s']:,.0f} | {v['val_loss_mean']:.4f} ± "
            f"{v['val_loss_std']:.4f} | {v['val_loss_min']:.4f} - {v['val_loss_max']:.4f} |")
    lines += ["", *[f"- `{v['name']}`: {v['label']}" for v in summary["variants"]], "",
              f"Paper: {summary['paper_claim']}. Here:"]
    for p in summary["paper_ordering"]:
        verdict = "holds" if p["holds"] else "does not hold"
        margin = "beyond" if p["beyond_spread"] else "within"
        lines.append(f"- {p['better']} ahead of {p['worse']}: {verdict} (gap {p['gap']:+.4f} nats, {margin} the "
                     "seeds' spread)")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- run
def run_study(cfg: AblateConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or reuse) every run of the study and write results.json, results.md and the two plots."""
    cfg.validate()
    study = STUDIES[cfg.study]
    variants = study_variants(cfg)
    folder = cfg.folder
    dist = Distributed()
    for v in variants:
        s = summarize(core.model_config(cfg.run_config(v, 0)))
        log(f"{v.name}: {s['total_params']:,} params, {s['active_params']:,} active per token, "
            f"{s['kv_cache_bytes_per_token']:,} B of KV cache per token - {v.label}")
    prepared = pretrain.prepare_data(dataclasses.replace(cfg.run_config(variants[0], 0), out=str(folder)), dist)
    total = len(variants) * cfg.seeds
    results: dict[str, list[dict[str, Any]]] = {}
    for i, (v, seed) in enumerate(((v, seed) for v in variants for seed in range(cfg.seeds)), 1):
        run = cfg.run_config(v, seed)
        result = _finished(run)
        reused = result is not None
        if result is None:
            result = train_run(run, prepared, dist)
        results.setdefault(v.name, []).append(result)
        log(f"[{i}/{total}] {cfg.study} {v.name} seed {seed}: val loss {result['val_loss']:.4f}, "
            f"{result['tokens_per_s']:,.0f} tokens/s" + (" (reused)" if reused else ""))

    rows = [_variant_summary(cfg, v, results[v.name]) for v in variants]
    tokens = {r["tokens"] for row in rows for r in row["runs"]}
    if len(tokens) != 1:  # by construction; a mixed output folder would break it
        raise RuntimeError(f"{folder}: runs trained on different numbers of tokens: {sorted(tokens)}")
    matched = [row[study.matched] for row in rows] if study.matched else None
    summary = {
        "study": study.name, "title": study.title, "matched": study.matched,
        "matched_spread": max(matched) / min(matched) - 1 if matched else None, "training_tokens": tokens.pop(),
        "settings": {k: v for k, v in _spec(cfg).items() if k not in ("out", "seed", "config_overrides")}
        | {"base_overrides": cfg.config_overrides},
        "hardware": describe(), "paper_claim": study.paper_claim, "variants": rows,
        "paper_ordering": paper_ordering(study, rows),
    }
    write_text_atomic(folder / "results.json", json.dumps(summary, indent=1))
    write_text_atomic(folder / "results.md", _markdown(summary))
    count = study.matched or "active_params"
    plot_seed_curves({row["name"]: [r["val_curve"] for r in row["runs"]] for row in rows}, folder / "loss_curves.png",
                     xlabel="training tokens", ylabel="validation loss (nats)", title=study.title)
    plot_bars({row["name"]: (row["val_loss_mean"], row["val_loss_std"]) for row in rows}, folder / "val_loss.png",
              ylabel="final validation loss (nats)", title=f"{study.name} study: mean ± std over {cfg.seeds} seeds",
              notes={row["name"]: f"{row[count] / 1e6:.2f}M {count.split('_')[0]}" for row in rows})
    log(f"wrote {folder}/results.json, results.md, loss_curves.png and val_loss.png")
    return summary
