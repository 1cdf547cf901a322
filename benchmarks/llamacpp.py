"""dsv2 against llama.cpp on the same checkpoint and threads: prefill and decode, float / int8 / int4 weights.

For each model (`benchmarks/decode.py`'s MODELS: random bf16 weights, seed 0, saved by dsv2 with a
byte-level BPE tokenizer), llama.cpp's own converter writes a BF16 GGUF (and an F32 one when dsv2 computes in
fp32) and `llama-quantize` makes Q8_0 and Q4_0 from the BF16 one. Then, with the same thread count everywhere, on
a prompt of P tokens and N new tokens:

- llama.cpp, batch 1: `llama-bench -p P -n N -r R` (its warm-up run, then R repetitions; each figure the
  median of the repetitions): prefill = pp (P prompt tokens in one batch), decode = tg (N tokens one at a
  time, no sampling: llama-bench feeds its own tokens).
- llama.cpp, batch B: `llama-batched-bench -npp P -ntg N -npl 1,B` (B sequences, each with its own prompt,
  decoded together one token each per step), run R times, the median of its S_PP and S_TG. Its batch-1
  figure is printed beside llama-bench's as a check that the two tools agree.
- dsv2 (weights as loaded, int8 and int4 as `LLM(quantization=...)` makes them) and transformers, both in
  --dtype (default auto: bf16 where the CPU has native bf16, else fp32; `dsv2.hardware.resolve_dtype`),
  each in its own process, timed by decode.py's `measure` (a warm-up run, then the median of R runs) at
  (1, P, N) and (B, P, N): prefill tok/s = B·P / seconds to the first token; decode tok/s = B / step time.

The pairs are dsv2 float (the row named by its dtype) / llama.cpp BF16, and F32 too when dsv2 runs fp32, dsv2 int8
and w8a8 / Q8_0, dsv2 int4 and w4a8 / Q4_0, and, when dsv2 runs fp32, dsv2 bf16 (the fp32 model's weights stored in
bf16, `LLM(quantization="bf16")`) / BF16, the same bytes; --formats picks some of dsv2's formats. They are not the
same formats: dsv2's int8 has one scale per output channel and its int4 one scale and zero point per group of 128,
both weight-only; Q8_0 and Q4_0 have one fp16 scale per block of 32 and quantize the activations to 8 bits for their
dot products, as dsv2's w8a8 and w4a8 do per row (the same weights as int8 and int4; model/quant.py).
With --compile, dsv2's decode steps run as compiled graphs in float, w8a8, w4a8 and bf16 (float's prefill too).

The converter identifies a tokenizer's pre-tokenizer by hashing the ids a known model's tokenizer gives for a
test string, so a tokenizer trained here is never in its table; this script names it "gpt-2", which is what
it is (tokenizers' ByteLevel split, GPT-2's regex). tests/test_llamacpp.py checks the two tokenize alike.

    DSV2_LLAMA_CPP=/path/to/llama.cpp DSV2_LLAMA_CPP_BIN=/path/to/build/bin \\
        python benchmarks/llamacpp.py --models small lite4 [--compile]   # README "Benchmarks": how to build it

Time it alone on the machine (another process on the cores skews both sides): the project's runs take
`flock -x /tmp/cpu.lock`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import decode  # benchmarks/decode.py: the checkpoints and the clock both scripts use
import torch

import dsv2
from dsv2 import hardware
from dsv2.config import ModelConfig
from dsv2.data.corpus import Corpus
from dsv2.data.prepare import SPECIAL_TOKENS
from dsv2.info import summarize
from dsv2.tokenizer import Tokenizer, train_bpe

SOURCE_ENV, BIN_ENV = "DSV2_LLAMA_CPP", "DSV2_LLAMA_CPP_BIN"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")
FLOAT = "float"  # dsv2's unquantized weights, in --dtype
# dsv2 weight format -> the llama.cpp types it is compared with (F32 joins float's when dsv2 runs fp32: `pairs`)
PAIRS = {FLOAT: ("BF16",), "int8": ("Q8_0",), "w8a8": ("Q8_0",), "int4": ("Q4_0",), "w4a8": ("Q4_0",)}
# the formats whose decode step compiles (`infer/compiled.py`), timed that way with --compile
COMPILES = (FLOAT, "w8a8", "w4a8", "bf16")
SHORT = {torch.bfloat16: "bf16", torch.float32: "fp32"}
TOKENIZER_DOCUMENTS = 100  # stdlib files the benchmark tokenizer learns its merges from

# Runs llama.cpp's converter with the pre-tokenizer named (see the module docstring); argv: the llama.cpp
# source folder, then the converter's own arguments.
_CONVERT = """
import runpy, sys
source = sys.argv[1]
sys.path[:0] = [source, source + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [source + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class LlamaCppError(RuntimeError):
    pass


@dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp source folder (`convert_hf_to_gguf.py`, `gguf-py/`) and the folder its build put the tools in."""

    source: Path
    bin: Path

    @classmethod
    def from_env(cls) -> LlamaCpp | None:
        """From DSV2_LLAMA_CPP (the source) and DSV2_LLAMA_CPP_BIN (default: its build/bin); None when the first
        is unset. LlamaCppError naming the variable when a folder lacks what it should hold."""
        source = os.environ.get(SOURCE_ENV)
        if not source:
            return None
        found = cls(Path(source), Path(os.environ.get(BIN_ENV) or Path(source) / "build" / "bin"))
        if not (found.source / "convert_hf_to_gguf.py").is_file():
            raise LlamaCppError(f"{SOURCE_ENV}={source}: no convert_hf_to_gguf.py there; point it at the llama.cpp "
                                "source folder")
        missing = [t for t in TOOLS if not (found.bin / t).is_file()]
        if missing:
            raise LlamaCppError(f"{found.bin} (${BIN_ENV}, default ${SOURCE_ENV}/build/bin) has no "
                                f"{', '.join(missing)}: build them (cmake --build BUILD --target {' '.join(TOOLS)})")
        return found

    def version(self) -> str:
        """e.g. "0.5.0-dev (build 1, commit 0c1e570)", as llama-bench reports it."""
        out = subprocess.run([str(self.bin / "llama-bench"), "--version"], capture_output=True, text=True,
                             errors="replace")
        lines = (out.stdout + out.stderr).splitlines()  # it prints the version on stderr
        return next((line.removeprefix("version: ") for line in lines if line.startswith("version:")), "unknown")

    def convert(self, folder: Path, out: Path, outtype: str) -> Path:
        """The checkpoint folder as a GGUF file of `outtype` (f32, bf16, q8_0, ...), by llama.cpp's converter."""
        _run([sys.executable, "-c", _CONVERT, str(self.source), str(folder), "--outtype", outtype,
              "--outfile", str(out)])
        return out

    def quantize(self, gguf: Path, out: Path, kind: str, threads: int) -> Path:
        _run([str(self.bin / "llama-quantize"), str(gguf), str(out), kind, str(threads)])
        return out

    def bench(self, gguf: Path, threads: int, prompt: int, new_tokens: int, repeats: int,
              repack: bool = True) -> dict[str, Any]:
        """Batch 1: llama-bench's prefill and decode tok/s, each the median of its repetitions. `repack`: llama.cpp's
        repacked CPU layouts (AMX / AVX-512 "extra buffer types"), its fastest path where it works."""
        out = _run([str(self.bin / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt),
                    "-n", str(new_tokens), "-r", str(repeats), "-o", "json", "--repack", str(int(repack))])
        tests = json.loads(out)
        pp = next(t for t in tests if t["n_prompt"] == prompt and t["n_gen"] == 0)
        tg = next(t for t in tests if t["n_gen"] == new_tokens and t["n_prompt"] == 0)
        return {"prefill_tok_s": statistics.median(pp["samples_ts"]),
                "decode_tok_s": statistics.median(tg["samples_ts"]),
                "spread": max(tg["samples_ts"]) / min(tg["samples_ts"]),
                "flash_attn": tg.get("flash_attn")}  # -1: auto

    def batched_bench(self, gguf: Path, threads: int, prompt: int, new_tokens: int, batches: list[int],
                      repeats: int, repack: bool = True) -> dict[int, dict[str, float]]:
        """llama-batched-bench's S_PP and S_TG (tok/s of all sequences together) per batch size, each the
        median of `repeats` runs."""
        cmd = [str(self.bin / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
               "-c", str(max(batches) * (prompt + new_tokens)), "-b", "2048", "-ub", "512", "-npp", str(prompt),
               "-ntg", str(new_tokens), "-npl", ",".join(map(str, batches)), "--output-format", "jsonl",
               *([] if repack else ["--no-repack"])]
        runs = []
        for _ in range(repeats):
            lines = _run(cmd).splitlines()
            runs.append({r["pl"]: r for r in map(json.loads, (line for line in lines if line.startswith("{")))})
        return {b: {"prefill_tok_s": statistics.median(r[b]["speed_pp"] for r in runs),
                    "decode_tok_s": statistics.median(r[b]["speed_tg"] for r in runs)} for b in batches}


def _run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if out.returncode:
        raise LlamaCppError(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])}... failed ({out.returncode}):\n"
                            f"{out.stderr[-3000:]}")
    return out.stdout


def bpe_tokenizer(config: ModelConfig, documents: int = TOKENIZER_DOCUMENTS) -> Tokenizer:
    """A byte-level BPE with merges (llama.cpp loads no tokenizer without) learned from the first `documents`
    files of Python's standard library, up to the model's vocab_size (a model with a larger vocabulary than
    that text gives is padded by the converter). SPECIAL_TOKENS take ids 0 and 1, where the small presets have
    BOS and EOS; the Lite shape's are elsewhere, which a benchmark that feeds token ids does not notice."""
    texts = [d.text for d in itertools.islice(Corpus(None), documents)]
    return Tokenizer(train_bpe(texts, vocab_size=config.vocab_size, special_tokens=SPECIAL_TOKENS), 0, 1)


def save_checkpoint(model: dsv2.Transformer, folder: Path) -> Path:
    """The model as dsv2 saves it, with a tokenizer llama.cpp's converter takes."""
    dsv2.save_model(model, folder, progress=False)
    bpe_tokenizer(model.config).save(folder)
    return folder


# ------------------------------------------------------------------------------------------- dsv2 side
def pairs(dtype: torch.dtype, formats: list[str] | None = None) -> dict[str, tuple[str, ...]]:
    """PAIRS (those of `formats`, default all), with, when dsv2 computes in fp32, llama.cpp's F32 beside BF16 for
    dsv2's float row and dsv2's "bf16" format (the fp32 model's weights stored in bf16) against BF16."""
    every = PAIRS | {FLOAT: ("F32", "BF16"), "bf16": ("BF16",)} if dtype == torch.float32 else PAIRS
    return {fmt: kinds for fmt, kinds in every.items() if formats is None or fmt in formats}


def worker(which: str, path: str, dtype: torch.dtype, quantization: str | None, pts: list[decode.Point],
           repeats: int, compiled: bool = False) -> dict:
    """dsv2 (in `quantization`; `compiled`: its decode steps, and a float model's prefill, as compiled graphs) or
    transformers on the checkpoint in `dtype`, every point timed by decode.measure (compiling in the warm-up)."""
    max_batch = max(b for b, _, _ in pts)
    if which == "dsv2":
        run, _ = decode.dsv2_runner(path, dtype, "cpu", max_batch, quantization, compiled)
    else:
        run = decode.transformers_runner(path, dtype, "cpu")
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    out: dict[str, Any] = {}
    for b, p, n in pts:
        row = decode.measure(run, (b, p, n), vocab, repeats)
        out[str(b)] = {"prefill_tok_s": row["prefill_tok_s"], "decode_tok_s": 1000 * b / row["step_ms"],
                       "spread": row["spread"]}
    out["peak_rss_mb"] = decode.peak_memory_mb("cpu")
    return out


def run_worker(which: str, path: Path, fmt: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--dtype", args.dtype,
           "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens), "--batch", str(args.batch),
           "--repeats", str(args.repeats),
           *(["--compile"] if args.compile and which == "dsv2" and fmt in COMPILES else []),
           "--worker", which, str(path), fmt]
    # the checkpoint (or GGUF) written just before is flushed to disk now: left to the kernel's writeback it
    # competes for the 2 cores with the first timed point (small 1x128 prefill measured at 0.6x its speed)
    os.sync()
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if out.returncode:
        raise SystemExit(f"{which} {path} {fmt} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- driver
def measure_model(llama: LlamaCpp, name: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Save, convert and quantize the model, then time llama.cpp on each GGUF and dsv2 / transformers."""
    folder = save_checkpoint(dsv2.random_model(decode.MODELS[name](), dtype=torch.bfloat16, seed=0), tmp / name)
    chosen = pairs(hardware.resolve_dtype(args.dtype), args.formats)
    kinds = {kind for fmt_kinds in chosen.values() for kind in fmt_kinds}
    ggufs = {"BF16": llama.convert(folder, tmp / f"{name}-bf16.gguf", "bf16")}  # what Q8_0 and Q4_0 come from
    if "F32" in kinds:
        ggufs["F32"] = llama.convert(folder, tmp / f"{name}-f32.gguf", "f32")
    for kind in sorted(kinds & {"Q8_0", "Q4_0"}):
        ggufs[kind] = llama.quantize(ggufs["BF16"], tmp / f"{name}-{kind}.gguf", kind, args.threads)
    ggufs = {kind: gguf for kind, gguf in ggufs.items() if kind in kinds}
    result: dict[str, Any] = {"llama.cpp": {}, "dsv2": {}}
    for kind, gguf in ggufs.items():
        # llama.cpp 0c1e570's repacked layouts abort on some of V2's tensors on an AMX CPU (Q8_0 on lite4:
        # "GGML_ASSERT(*cur_backend_id != -1)", no backend takes a node); then it runs with plain layouts
        repack = True
        try:
            bench = llama.bench(gguf, args.threads, args.prompt, args.new_tokens, args.repeats)
        except LlamaCppError as e:
            if "cur_backend_id" not in str(e):
                raise
            repack = False
            bench = llama.bench(gguf, args.threads, args.prompt, args.new_tokens, args.repeats, repack=False)
        result["llama.cpp"][kind] = {
            "bench": bench, "repack": repack,
            "batched": llama.batched_bench(gguf, args.threads, args.prompt, args.new_tokens, [1, args.batch],
                                           args.repeats, repack=repack),
            "file_mb": gguf.stat().st_size / 2**20}
    for fmt in chosen:
        result["dsv2"][fmt] = run_worker("dsv2", folder, fmt, args)
    if FLOAT in chosen:  # the reference, reported beside dsv2's float row
        result["transformers"] = run_worker("transformers", folder, FLOAT, args)
    return result


def report(name: str, r: dict[str, Any], args: argparse.Namespace, bandwidth_gbs: float) -> None:
    config = decode.MODELS[name]()
    params = summarize(config)["total_params"]
    b, p, n = args.batch, args.prompt, args.new_tokens
    dtype = hardware.resolve_dtype(args.dtype)
    floats = SHORT[dtype]
    print(f"\n### {name} ({params / 1e6:.0f}M params), prompt {p}, {n} new tokens, {args.threads} threads, "
          f"dsv2 and transformers in {floats} (--dtype {args.dtype})")
    print(f"tok/s; ratios are dsv2 / the other (above 1: dsv2 faster). transformers runs {floats} only."
          + (f" dsv2's decode steps compiled in {floats}, w8a8 and w4a8 (and {floats}'s prefill)"
             if args.compile else ""))
    print("| dsv2 weights / llama.cpp | batch | prefill dsv2 | llama.cpp | ratio | decode dsv2 | llama.cpp | ratio "
          "| transformers prefill | ratio | transformers decode | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    chosen = pairs(dtype, args.formats)
    for fmt, kind in ((f, k) for f, kinds in chosen.items() for k in kinds):
        ll = r["llama.cpp"][kind]
        for batch in (1, b):
            ours = r["dsv2"][fmt][str(batch)]
            theirs = ll["bench"] if batch == 1 else ll["batched"][batch]
            cells = [f"{ours['prefill_tok_s']:.0f}", f"{theirs['prefill_tok_s']:.0f}",
                     f"**{ours['prefill_tok_s'] / theirs['prefill_tok_s']:.2f}**", f"{ours['decode_tok_s']:.1f}",
                     f"{theirs['decode_tok_s']:.1f}", f"**{ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}**"]
            if fmt == FLOAT and kind == chosen[FLOAT][0]:
                hf = r["transformers"][str(batch)]
                cells += [f"{hf['prefill_tok_s']:.0f}", f"{ours['prefill_tok_s'] / hf['prefill_tok_s']:.2f}",
                          f"{hf['decode_tok_s']:.1f}", f"{ours['decode_tok_s'] / hf['decode_tok_s']:.2f}"]
            else:
                cells += ["", "", "", ""]
            print(f"| {floats if fmt == FLOAT else fmt} / {kind} | {batch} | " + " | ".join(cells) + " |")
    if FLOAT in chosen:
        step_gb = decode.step_bytes(config, dtype, 1, p + n / 2) / 1e9
        kind = chosen[FLOAT][0]
        ours, theirs = r["dsv2"][FLOAT]["1"]["decode_tok_s"], r["llama.cpp"][kind]["bench"]["decode_tok_s"]
        print(f"batch-1 {floats} decode reads the step's {step_gb:.2f} GB (decode.step_bytes) at "
              f"{step_gb * ours:.1f} GB/s (dsv2) and {kind} {step_gb * theirs:.1f} GB/s (llama.cpp); read bandwidth "
              f"probe: {bandwidth_gbs:.1f} GB/s")
    checks = ", ".join(f"{kind} {ll['batched'][1]['decode_tok_s']:.1f} vs {ll['bench']['decode_tok_s']:.1f}"
                       for kind, ll in r["llama.cpp"].items())
    print(f"llama.cpp batch-1 decode, llama-batched-bench vs llama-bench: {checks}")
    timed = [*r["dsv2"].values(), *([r["transformers"]] if "transformers" in r else [])]
    spread = max(x[k]["spread"] for x in timed for k in ("1", str(b)))
    ll_spread = max(ll["bench"]["spread"] for ll in r["llama.cpp"].values())
    flash_attn = next(iter(r["llama.cpp"].values()))["bench"]["flash_attn"]
    print(f"largest spread of one point's repeats (slowest / fastest decode): dsv2 and transformers {spread:.2f}, "
          f"llama-bench {ll_spread:.2f}; llama.cpp flash_attn: {flash_attn}; "
          f"GGUF MB: " + ", ".join(f"{k} {v['file_mb']:.0f}" for k, v in r["llama.cpp"].items()))
    plain = [k for k, v in r["llama.cpp"].items() if not v["repack"]]
    if plain:
        print(f"llama.cpp ran {', '.join(plain)} without its repacked layouts (--repack 0): they abort on this "
              "model here")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["small", "lite4"], choices=[m for m in decode.MODELS
                                                                                 if m != "lite"])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="concurrent sequences of the batched point")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per point after a warm-up (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", choices=list(hardware.DTYPES),
                    help="dsv2's and transformers' compute dtype; auto: bf16 where the CPU has native bf16, else fp32")
    ap.add_argument("--compile", action="store_true",
                    help=f"dsv2's decode steps as compiled graphs where the format allows ({', '.join(COMPILES)}; "
                         "infer/compiled.py), and float's prefill")
    ap.add_argument("--formats", nargs="+", choices=[*PAIRS, "bf16"],
                    help="dsv2's weight formats to time (default: all; bf16 only where dsv2 computes in fp32)")
    ap.add_argument("--json", help="also write all figures to this file")
    ap.add_argument("--worker", nargs=3, metavar=("WHICH", "PATH", "FORMAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.new_tokens < 2 or args.repeats < 1 or args.batch < 2:
        ap.error("--new-tokens must be >= 2, --repeats >= 1, --batch >= 2")
    torch.set_num_threads(args.threads)
    if args.worker:
        which, path, fmt = args.worker
        pts = [(1, args.prompt, args.new_tokens), (args.batch, args.prompt, args.new_tokens)]
        print(json.dumps(worker(which, path, hardware.resolve_dtype(args.dtype), None if fmt == FLOAT else fmt, pts,
                                args.repeats, args.compile)))
        return
    llama = LlamaCpp.from_env()
    if llama is None:
        ap.error(f"set {SOURCE_ENV} to the llama.cpp source folder and {BIN_ENV} to its built tools "
                 "(docs/benchmarks.md, llama.cpp)")
    bandwidth = hardware.read_bandwidth_gbs()
    print(f"machine: {hardware.describe()}\nllama.cpp {llama.version()} ({llama.source}); read bandwidth "
          f"{bandwidth:.1f} GB/s; every figure the median of {args.repeats} runs after a warm-up"
          f"{decode.busy_warning()}")
    saved: dict[str, Any] = {"machine": hardware.describe(), "llama.cpp": llama.version(), "bandwidth_gbs": bandwidth,
                             "dtype": str(hardware.resolve_dtype(args.dtype)), "compiled": args.compile, "models": {}}
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:  # one model's GGUFs at a time on disk
            saved["models"][name] = measure_model(llama, name, Path(tmp), args)
        report(name, saved["models"][name], args, bandwidth)
        if args.json:
            Path(args.json).write_text(json.dumps(saved, indent=1))


if __name__ == "__main__":
    main()
