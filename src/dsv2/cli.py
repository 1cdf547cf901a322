"""`dsv2` command line: argparse -> library calls."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dsv2.config import PRESETS, ConfigError, resolve_config
from dsv2.data.dedup import DEFAULT_THRESHOLD
from dsv2.hardware import DTYPES
from dsv2.infer.kv_quant import KV_CACHE_DTYPES
from dsv2.infer.sampling import SamplingError, SamplingParams
from dsv2.info import compare_kv_cache, summarize
from dsv2.model.quant import INFERENCE_FORMATS
from dsv2.tokenizer import TokenizerError
from dsv2.weights import CheckpointError

DTYPE_HELP = "auto: bf16 where the CPU multiplies bf16 natively (AVX-512 BF16, AMX) or on a GPU, else fp32"


def _billions(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f}B)"


def cmd_info(args: argparse.Namespace) -> int:
    config = resolve_config(args.model)
    s = summarize(config, args.kv_cache_dtype)
    other = None if args.compare is None else resolve_config(args.compare)
    versus = None if other is None else compare_kv_cache(config, other, args.kv_cache_dtype)
    if args.json:
        print(json.dumps({"model": args.model, **s, **({} if versus is None else
                                                       {"compare": {"model": args.compare, **versus}})}, indent=2))
        return 0
    print(f"{args.model}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads} heads, {s['moe_layers']} MoE layers")
    if config.n_routed_experts:
        print(f"  experts: {config.n_routed_experts} routed (top-{config.num_experts_per_tok}, "
              f"{config.routing_method}) + {config.n_shared_experts or 0} shared")
    print(f"  total parameters:              {_billions(s['total_params'])}")
    print(f"  active parameters per token:   {_billions(s['active_params'])}  (excl. input embedding)")
    for part, n in s["params_by_part"].items():
        print(f"    {part:<28} {n:>18,}")
    latent, mha = s["kv_cache_bytes_per_token"], s["mha_kv_cache_bytes_per_token"]
    if config.attention == "mla":
        print(f"  KV cache per token (bf16):     {latent:,} bytes latent (c_KV {config.kv_lora_rank} + "
              f"k_rope {config.qk_rope_head_dim} per layer)")
    else:
        print(f"  KV cache per token (bf16):     {latent:,} bytes ({config.attention.upper()}: K and V of "
              f"{config.num_key_value_heads} heads x {config.attention_head_dim} per layer)")
    print(f"    MHA equivalent:              {mha:,} bytes ({latent / mha:.2%} of it)")
    if config.attention == "mla":
        print(f"    reference (decompressed K,V): {s['reference_kv_cache_bytes_per_token']:,} bytes")
    stored = s["kv_cache_dtype_bytes_per_token"]
    print(f"  KV cache per token {'(' + args.kv_cache_dtype + '):':<12}{stored:,} bytes "
          f"({stored // config.num_hidden_layers:,} per layer): {s['kv_cache_dtype_reduction_vs_latent']:.2f}x "
          f"smaller than the bf16 {'latent ' if config.attention == 'mla' else ''}cache, "
          f"{s['kv_cache_dtype_reduction_vs_mha']:.1f}x smaller than MHA")
    if versus is not None:
        print(f"KV cache per token, {args.model} against {args.compare} (its cache in bf16):")
        rows = [("elements", "elements"), ("bf16 bytes", "bf16_bytes"),
                ("6 bits per element (paper §3.2.3)", "six_bit_bytes")]
        if args.kv_cache_dtype != "auto":
            rows.append((f"stored as {args.kv_cache_dtype} (dsv2's layout)", "kv_cache_dtype_bytes"))
        for label, key in rows:
            ours, theirs = versus[key]
            reduction = versus[key.removesuffix("_bytes") + "_reduction"]
            print(f"  {label + ':':<40}{ours:>12,.0f} vs {theirs:,}: {abs(reduction):.1%} "
                  f"{'less' if reduction >= 0 else 'more'}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """A random-weights checkpoint folder (config, safetensors, byte-level tokenizer) from a preset."""
    import torch

    from dsv2.tokenizer import Tokenizer
    from dsv2.weights import load_model, save_model

    model = load_model(args.model, dtype=getattr(torch, args.dtype), seed=args.seed)
    save_model(model, args.out)
    Tokenizer.byte_level(model.config).save(args.out)
    print(f"wrote {args.out}: random {args.model} weights ({args.dtype}) and a byte-level tokenizer.json")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """A checkpoint in another weight format, written so that it loads back without quantizing again."""
    import torch

    from dsv2.model import quant
    from dsv2.tokenizer import TOKENIZER_FILE, Tokenizer
    from dsv2.weights import load_model, save_model

    src, out = Path(args.model), Path(args.out)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src}: not a checkpoint folder (no config.json)")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out}: write the quantized checkpoint to another folder than its source")
    model = load_model(src, dtype=getattr(torch, args.dtype))
    if args.format == "fp8":
        save_model(model, out, fp8_block=(args.block_size, args.block_size))
    else:
        quant.save_quantized(quant.quantize_model(model, args.format, args.group_size), out)
    if (src / TOKENIZER_FILE).is_file():
        Tokenizer.from_folder(src, model.config).save(out)

    def size(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))

    print(f"wrote {out}: {args.format} weights, {size(out) / 2**20:,.1f} MiB of tensors ({size(src) / 2**20:,.1f} MiB "
          f"in {src}); load it as any checkpoint (`dsv2 generate {out}`)")
    return 0


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
    )


def _llm(args: argparse.Namespace):
    from dsv2.infer.engine import LLM

    return LLM(args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization)


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling(args)  # validate before loading anything
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    llm = _llm(args)
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if llm.tokenizer else prompt
    generated = 0
    for event in llm.stream([prompt], params):
        generated += 1
        print(event.text_delta, end="", flush=True)
    print()
    if args.verbose:
        # the first new token comes out of the prefill step, so the engine's decode count is one short of it
        s = llm.stats()
        print(f"[{s['prefill_tokens']} prompt tokens at {s['prefill_tok_per_s']:.1f} tok/s, "
              f"{generated} generated, decoding at {s['decode_tok_per_s']:.1f} tok/s, "
              f"latent cache {s['kv_cache_peak_bytes_in_use']:,} bytes]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling(args)
    llm = _llm(args)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print("dsv2 chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = llm.tokenizer.apply_chat_template(messages)
        print("assistant> ", end="", flush=True)
        reply = ""
        for event in llm.stream([ids], params):
            reply += event.text_delta
            print(event.text_delta, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})


def _train_config(cls: type, args: argparse.Namespace):
    """A stage's config from the options given (the others keep the config's defaults) and `--set` overrides."""
    fields = {f: getattr(args, f) for f in cls.__dataclass_fields__ if getattr(args, f, None) is not None}
    return cls(**fields, config_overrides=_overrides(getattr(args, "set", None) or []))


def cmd_train(args: argparse.Namespace) -> int:
    from dsv2.train.pretrain import PretrainConfig, train

    cfg = _train_config(PretrainConfig, args)
    last = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports for everyone
        return 0
    if not last:  # resumed a run that had already reached --steps
        print(f"{cfg.out} already holds {cfg.steps} steps; nothing to train (raise --steps to continue)")
    else:
        print(f"step {last['step']}: train loss {last['loss']:.3f}, val loss "
              f"{last.get('val_loss', float('nan')):.3f}; model in {cfg.out}/model")
    if args.sample_tokens:
        from dsv2.infer.engine import LLM

        llm = LLM(f"{cfg.out}/model", dtype="float32")
        out = llm.generate(args.sample_prompt, SamplingParams(max_tokens=args.sample_tokens, temperature=0.8, seed=0))
        print(f"sample:\n{args.sample_prompt}{out[0].text}")
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    from dsv2.train.extend import ExtendConfig, train

    cfg = _train_config(ExtendConfig, args)
    last = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    config = resolve_config(f"{cfg.out}/model")
    rs = config.rope_scaling
    if last:
        print(f"step {last['step']}: train loss {last['loss']:.3f}, val loss {last.get('val_loss', float('nan')):.3f} "
              f"at {cfg.seq_len} tokens; model in {cfg.out}/model (YaRN factor {rs['factor']:g} from "
              f"{rs['original_max_position_embeddings']}: {config.max_position_embeddings} positions)")
    else:
        print(f"{cfg.out} already holds {cfg.steps} steps; nothing to train (raise --steps to continue)")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from dsv2.align.sft import SFTConfig, train

    cfg = _train_config(SFTConfig, args)
    last, counts = train(cfg)
    print(f"{counts['conversations']} conversations: {counts['kept']} kept ({counts['truncated']} truncated), "
          f"{counts['dropped']} dropped as longer than {cfg.seq_len + 1} tokens; {counts['target_tokens']:,} "
          f"target tokens")
    if last:
        print(f"step {last['step']}: train loss {last['loss']:.3f}, val loss {last.get('val_loss', float('nan')):.3f}; "
              f"model in {cfg.out}/model" + (f", adapter in {cfg.out}/adapter" if cfg.lora_rank else ""))
    return 0


def cmd_grpo(args: argparse.Namespace) -> int:
    from dsv2.align.grpo import GRPOConfig, train

    cfg = _train_config(GRPOConfig, args)
    last = train(cfg)
    if last:
        print(f"step {last['step']}: reward {last['reward']:.3f} (std {last['reward_std']:.3f}), kl {last['kl']:.4f}, "
              f"|logprob engine - trainer| {last['logprob_diff']:.2e}; model in {cfg.out}/model")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """Train every variant of a study at equal tokens over several seeds; results.json / .md and plots."""
    from dsv2.train.ablate import AblateConfig, run_study

    if args.tokens is not None:
        if args.steps is not None:
            raise ValueError("--steps and --tokens: give one (--tokens sets the steps from the batch)")
        per_step = (args.batch_size or AblateConfig.batch_size) * (args.seq_len or AblateConfig.seq_len)
        if args.tokens < per_step:
            raise ValueError(f"--tokens {args.tokens}: fewer than one step's {per_step} tokens (batch x seq_len)")
        args.steps = args.tokens // per_step
    if args.variants is not None:
        args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    cfg = _train_config(AblateConfig, args)
    run_study(cfg)
    print((cfg.folder / "results.md").read_text(), end="")
    return 0


def _overrides(pairs: list[str]) -> dict:
    """`--set FIELD=JSON` pairs -> config overrides (a bare word that is not JSON is taken as a string)."""
    overrides = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE, e.g. max_position_embeddings=4096")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name] = value
    return overrides


def cmd_data(args: argparse.Namespace) -> int:
    """Train the byte-level BPE and build the deduplicated shards, as `dsv2 train` would, into a run folder."""
    from dsv2.data.prepare import prepare_run_data

    dedup = {k: getattr(args, k) for k in ("dedup", "near_duplicate_threshold") if getattr(args, k) is not None}
    _, train, val = prepare_run_data(args.out, args.data, resolve_config(args.model),
                                     max_documents=args.max_documents, **dedup)
    m = train.manifest
    print(f"{args.out}: tokenizer.json and data/ with {train.num_tokens:,} train tokens ({train.num_documents:,} "
          f"documents) and {val.num_tokens:,} validation tokens ({val.num_documents:,} documents)")
    if skipped := m.get("skipped"):
        print("  files skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())))
    if (d := m.get("dedup")) is not None:
        print(f"  duplicates dropped: {d['exact_duplicates']} exact, {d['near_duplicates']} near (Jaccard >= "
              f"{d['near_duplicate_threshold']}) of {d['documents_in']:,} documents read")
    else:
        print("  duplicates: kept (built without deduplication)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from dsv2.plots import plot_run

    for path in plot_run(args.run, args.out):
        print(path)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Validation loss and perplexity of a run (its final model or latest checkpoint) or a model folder; with
    --task, accuracy on a built-in task's eval problems."""
    import math

    import torch

    if args.task is not None:
        return _eval_task(args)
    if args.needle or args.ppl_by_position:
        return _eval_long_context(args)

    from dsv2.data.shards import TokenShards
    from dsv2.train.core import evaluate
    from dsv2.train.pretrain import PackedText
    from dsv2.weights import load_model

    run = Path(args.model)
    model_dir = _evaluated_model(run)
    data = Path(args.data) if args.data else run / "data"
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    shards = TokenShards(data, "val", vocab_size=model.config.vocab_size)
    source = PackedText(shards, args.seq_len, shuffle=False)
    loss = evaluate(model, (source.next_batch(args.batch_size) for _ in range(args.batches)))
    print(f"{model_dir}: validation loss {loss:.4f} nats/token, perplexity {math.exp(loss):.2f} "
          f"({args.batches} x {args.batch_size} x {args.seq_len} tokens of {data})")
    return 0


def _evaluated_model(run: Path) -> Path:
    """What `dsv2 eval` evaluates of a folder: a run's final model, else its latest checkpoint, else the folder."""
    from dsv2.train import checkpoint

    return run / "model" if (run / "model").is_dir() else checkpoint.latest_checkpoint(run) or run


def _numbers(text: str, kind: type, what: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected comma-separated numbers") from None


def _eval_long_context(args: argparse.Namespace) -> int:
    """--needle: pass-key accuracy per (length, depth), JSON and heatmap; --ppl-by-position: loss by position
    (beside --baseline's), JSON and plot. Both on the validation split of the shards (--data or RUN/data)."""
    import torch

    from dsv2.atomic import write_text_atomic
    from dsv2.data import longctx
    from dsv2.data.shards import TokenShards
    from dsv2.eval import long_context
    from dsv2.plots import plot_loss_by_position, plot_needle
    from dsv2.tokenizer import Tokenizer
    from dsv2.train.pretrain import PackedText
    from dsv2.weights import load_model

    run = Path(args.model)
    lengths = _numbers(args.lengths, int, "--lengths") if args.needle else []
    depths = _numbers(args.depths, float, "--depths") if args.needle else []
    if args.needle and (not lengths or not depths):
        raise ValueError("--needle needs --lengths and --depths")
    data = Path(args.data) if args.data else run / "data"
    out = Path(args.out) if args.out else run
    model_dir = _evaluated_model(run)
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    shards = TokenShards(data, "val", vocab_size=model.config.vocab_size)
    report: dict = {"model": str(model_dir), "data": str(data)}
    out.mkdir(parents=True, exist_ok=True)
    if args.ppl_by_position:
        models = {str(model_dir): model}
        if args.baseline:
            models[args.baseline] = load_model(_evaluated_model(Path(args.baseline)), dtype=torch.float32,
                                               progress=False)
        l0 = model.config.original_max_position_embeddings
        source = PackedText(shards, args.seq_len, shuffle=False, within_documents=True)
        batches = [source.next_batch(args.batch_size) for _ in range(args.batches)]
        summary = long_context.ppl_by_position(models, batches, args.bins, l0)
        for name, row in summary.items():
            cut = f", the same tokens cut into {l0}-token pieces {row['cut_to_l0']:.4f}" if "cut_to_l0" in row else ""
            print(f"{name}: loss {row['mean']:.4f} over {args.seq_len} positions ({args.batches} x {args.batch_size} "
                  f"long-document windows){cut}; first bin {row['bins'][0]['loss']:.4f}, last "
                  f"{row['bins'][-1]['loss']:.4f}")
        curves = {name: row["bins"] for name, row in summary.items()}
        json_path = out / "ppl_by_position.json"
        write_text_atomic(json_path, json.dumps({**report, "seq_len": args.seq_len, "models": summary}, indent=1))
        png = plot_loss_by_position(curves, out / "ppl_by_position.png", {"L0": l0} if l0 else None)
        print(f"wrote {json_path} and {png}")
    if args.needle:
        tokenizer = Tokenizer.from_folder(model_dir, model.config)
        haystack = longctx.haystack(shards, tokenizer, max(lengths))
        result = long_context.needle_accuracy(model, tokenizer, haystack, lengths, depths, trials=args.trials,
                                              seed=args.seed)
        json_path = out / "needle.json"
        write_text_atomic(json_path, json.dumps({**report, **result}, indent=1))
        png = plot_needle(result, out / "needle.png", title=f"pass-key retrieval: {model_dir}")
        for length, row in zip(result["lengths"], result["accuracy"], strict=True):
            print(f"  {length:>7} tokens: " + " ".join(f"{a:.2f}" for a in row) + f"  (depths {args.depths})")
        print(f"wrote {json_path} and {png}")
    return 0


def _eval_task(args: argparse.Namespace) -> int:
    from dsv2.data import tasks
    from dsv2.infer.engine import LLM

    task = tasks.get_task(args.task)  # an unknown name fails before the model loads
    llm = LLM(_evaluated_model(Path(args.model)), dtype=args.dtype)
    result = tasks.evaluate(llm, task, n=args.n, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.model}: {task.name} accuracy {result['accuracy']:.3f} ({result['n']} problems, greedy), "
          f"mean reward {result['mean_reward']:.3f}")
    for ex in result["examples"]:
        print(f"  {ex['prompt']!r} -> {ex['completion']!r} (answer {ex['answer']}, reward {ex['reward']})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """OpenAI-compatible server over the continuous-batching engine (FastAPI + uvicorn)."""
    try:
        import uvicorn

        from dsv2.serve.api import create_app
    except ImportError as e:
        raise ValueError(f"serving needs the [serve] extra (pip install 'dsv2[serve]'): {e}") from None
    from dsv2.infer.engine import LLM

    if args.cache_mb is not None and args.cache_mb <= 0:
        raise ValueError(f"--cache-mb must be positive, got {args.cache_mb}")
    llm = LLM(args.model, dtype=args.dtype, max_batch_size=args.max_running,
              cache_bytes=None if args.cache_mb is None else int(args.cache_mb * 2**20), block_size=args.block_size,
              kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
              prefix_caching=args.prefix_caching, prefill_chunk=args.prefill_chunk,
              max_prefill_tokens=args.max_prefill_tokens, compile_decode=args.compile_decode,
              compile_prefill=args.compile_prefill)
    name = args.served_model_name or Path(args.model).name
    engine = llm.engine
    dtype = str(llm.model.embed.weight.dtype).removeprefix("torch.")
    print(f"dsv2 serve: {name} ({dtype}) on http://{args.host}:{args.port}/v1 - latent cache "
          f"{engine.cache.num_blocks} blocks x {engine.cache.block_size} tokens "
          f"({engine.cache.bytes_allocated() / 2**20:.0f} MiB, {args.kv_cache_dtype}: "
          f"{engine.cache.bytes_per_token():,} bytes per token), prefix caching "
          f"{'on' if args.prefix_caching else 'off'}"
          f"{', decode compiled (the first decode steps compile, ~1 min)' if args.compile_decode else ''}"
          f"{', equal prefill chunks compiled (the first ones compile, ~1 min)' if args.compile_prefill else ''}",
          file=sys.stderr)
    app = create_app(engine, name, api_key=args.api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help=DTYPE_HELP)
    _add_inference_format_args(p)


def _add_inference_format_args(p: argparse.ArgumentParser) -> None:
    """How an inference command stores weights and the latent cache."""
    p.add_argument("--quantization", choices=list(INFERENCE_FORMATS),
                   help="weights: int8 / int4 (weight-only, quantized at load unless stored so), w8a8 / w4a8 (with "
                        "int8 activations), fp8 (a block-FP8 checkpoint kept in FP8) or bf16 (an fp32 model's weights "
                        "stored in bf16, for CPUs without native bf16); default: --dtype")
    _add_kv_cache_dtype_arg(p)


def _add_kv_cache_dtype_arg(p: argparse.ArgumentParser, what: str = "how the latent cache stores tokens") -> None:
    p.add_argument("--kv-cache-dtype", dest="kv_cache_dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help=f"{what}: auto (the model dtype), fp8 (656 B per token per layer at V2's dims) or 6bit "
                        f"(430 B)")


CHECKPOINT_HELP = f"checkpoint folder (with tokenizer.json) or preset ({', '.join(PRESETS)})"
MODEL_RULE = ("Every command that works on a model (info, init, generate, chat, serve, train, data, eval, extend, "
              "sft, grpo, quantize) names it by its first positional argument MODEL or, equally, by --model MODEL. "
              "Given both ways they must agree; given neither, serve, train and data use nano and the others ask "
              "for one. plot takes a run folder, which is not a model; ablate takes a study, and its base model "
              "by --model.")


def _add_model_args(p: argparse.ArgumentParser, what: str, default: str | None = None, required: bool = False,
                    choices: list[str] | None = None) -> None:
    """The model as the positional MODEL and as its synonym `--model` (as in `vllm serve MODEL`).

    Both are optional to argparse so that either spelling works; `_reconcile_model` merges them after parsing
    and applies `default`, or refuses a missing model when `required`."""
    p.add_argument("model", nargs="?", metavar="MODEL", choices=choices, help=what)
    p.add_argument("--model", dest="model_option", metavar="MODEL", choices=choices, help="the same as MODEL")
    p.set_defaults(model_default=default, model_required=required, model_parser=p)


def _reconcile_model(args: argparse.Namespace) -> None:
    """Merge MODEL and --model into `args.model`: an error if they differ, the command's default if neither."""
    parser = args.model_parser
    if args.model is not None and args.model_option is not None and args.model != args.model_option:
        parser.error(f"MODEL {args.model!r} and --model {args.model_option!r} disagree: name the model once")
    args.model = next((m for m in (args.model, args.model_option, args.model_default) if m is not None), None)
    if args.model is None and args.model_required:
        parser.error("the following arguments are required: MODEL (or --model MODEL)")
    del args.model_option, args.model_default, args.model_required, args.model_parser


def _add_dedup_args(p: argparse.ArgumentParser) -> None:
    """Deduplication options of `train` and `data`; None when not given, so the library's defaults apply."""
    p.add_argument("--no-dedup", dest="dedup", action="store_false", default=None,
                   help="keep exact and near-duplicate documents (default: drop them, first occurrence kept)")
    p.add_argument("--near-dup-threshold", dest="near_duplicate_threshold", type=float,
                   help=f"estimated Jaccard similarity of word 5-grams above which a document is a near "
                        f"duplicate (default {DEFAULT_THRESHOLD})")


def _add_stage_args(p: argparse.ArgumentParser, lora: bool = True) -> None:
    """The training options every stage after pretraining shares (LoRA's with `lora`); None when not given,
    so the stage's defaults apply."""
    p.add_argument("--out", help="run folder")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--grad-accum", dest="grad_accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int)
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    if lora:
        p.add_argument("--lora-rank", dest="lora_rank", type=int, help="train LoRA factors of this rank (frozen base)")
        p.add_argument("--lora-alpha", dest="lora_alpha", type=float, help="LoRA scaling alpha / rank (default 16)")
    p.add_argument("--eval-every", dest="eval_every", type=int)
    p.add_argument("--save-every", dest="save_every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", default=None, help="continue from the latest checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _add_sft_parser(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on chat conversations (full or LoRA)")
    _add_model_args(p, "model folder (with tokenizer.json) or preset to fine-tune", required=True)
    p.add_argument("--data", help='JSONL of {"messages": [...]} or {"prompt", "completion"} rows')
    p.add_argument("--task", help="or a built-in task's worked examples (addition, compare)")
    p.add_argument("--task-examples", dest="task_examples", type=int, help="conversations drawn from --task")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="tokens per sequence (default 64)")
    p.add_argument("--overflow", choices=["drop", "truncate"], help="longer conversations (default drop)")
    _add_stage_args(p)
    p.set_defaults(func=cmd_sft)


def _add_grpo_parser(sub) -> None:
    p = sub.add_parser("grpo", help="GRPO reinforcement learning on a task's or your own reward")
    _add_model_args(p, "model folder to start from (e.g. an SFT run's RUN/model)", required=True)
    p.add_argument("--task", help="built-in task (addition, compare): prompts and reward")
    p.add_argument("--reward", help="MODULE:FUNCTION or file.py:FUNCTION, reward(prompts, completions, **columns)")
    p.add_argument("--prompts", help='JSONL of {"prompt": ...} or {"messages": [...]} rows (+ reward columns)')
    p.add_argument("--group-size", dest="group_size", type=int, help="completions per prompt G (default 8)")
    p.add_argument("--max-completion-tokens", dest="max_completion_tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--beta", type=float, help="KL coefficient (default 0.04; 0: no reference model)")
    p.add_argument("--epsilon", type=float, help="clip range (default 0.2)")
    p.add_argument("--loss-type", dest="loss_type", choices=["grpo", "dr_grpo", "dapo"])
    p.add_argument("--no-scale-rewards", dest="scale_rewards", action="store_false", default=None,
                   help="advantage r - mean, without dividing by the group's std (Dr. GRPO)")
    p.add_argument("--inner-iterations", dest="inner_iterations", type=int, help="optimizer steps per rollout")
    p.add_argument("--routing-replay", dest="routing_replay", action="store_true", default=None,
                   help="route the trainer's forwards to the experts the engine chose (R3)")
    p.add_argument("--rollout-dtype", dest="rollout_dtype", choices=["float32", "bfloat16"])
    _add_stage_args(p)
    p.set_defaults(func=cmd_grpo)


def _add_ablate_parser(sub) -> None:
    from dsv2.train.ablate import STUDIES

    p = sub.add_parser("ablate", help="ablation study: variants trained at equal tokens over seeds (paper App. D)")
    p.add_argument("study", choices=list(STUDIES), help="; ".join(f"{s.name}: {s.title}" for s in STUDIES.values()))
    p.add_argument("--model", help="base preset or config.json the variants change (default nano)")
    p.add_argument("--set", action="append", metavar="FIELD=JSON", help="override a field of the base config first")
    p.add_argument("--variants", help="comma-separated subset of the study's variants (default: all)")
    p.add_argument("--seeds", type=int, help="seeds per variant (default 3)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 200)")
    p.add_argument("--tokens", type=int, help="training tokens per run instead of --steps (rounded down to steps)")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--seq-len", dest="seq_len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int)
    p.add_argument("--eval-every", dest="eval_every", type=int, help="steps between validation points of the curves")
    p.add_argument("--eval-batches", dest="eval_batches", type=int, help="validation batches (default 16)")
    p.add_argument("--data", help="folder of text files or a JSONL file (default: Python's standard library)")
    p.add_argument("--max-documents", dest="max_documents", type=int, help="documents to tokenise")
    p.add_argument("--tokenizer-documents", dest="tokenizer_documents", type=int, help="documents to train BPE on")
    p.add_argument("--out", help="study folder (default runs/ablate/STUDY); finished runs in it are reused")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=cmd_ablate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv2", description="DeepSeek-V2 in readable PyTorch", epilog=MODEL_RULE)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameter counts and KV-cache size of a preset or checkpoint")
    _add_model_args(info, f"preset ({', '.join(PRESETS)}), checkpoint folder or config.json", required=True)
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    _add_kv_cache_dtype_arg(info, "also show the cache stored this way (auto: bf16)")
    info.add_argument("--compare", metavar="MODEL", help="also print the KV cache per token against this model's "
                      "in bf16 (preset, folder or config.json), e.g. deepseek-v2 --compare deepseek-llm-67b")
    info.set_defaults(func=cmd_info)

    init = sub.add_parser("init", help="write a random-weights checkpoint folder from a preset")
    _add_model_args(init, "preset to initialise", required=True, choices=list(PRESETS))
    init.add_argument("out", help="folder to write")
    init.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=cmd_init)

    gen = sub.add_parser("generate", help="complete a prompt (streams the text)")
    _add_model_args(gen, CHECKPOINT_HELP, required=True)
    _add_sampling_args(gen, max_tokens=128)
    gen.add_argument("--prompt", help="prompt text (default: read standard input)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("-v", "--verbose", action="store_true", help="print token counts and speed to stderr")
    gen.set_defaults(func=cmd_generate)

    tr = sub.add_parser("train", help="pretrain (default: the nano preset on the Python standard library)")
    _add_model_args(tr, "preset, config.json or checkpoint folder (default nano)")
    tr.add_argument("--data", help="folder of text files or a JSONL file (default: Python's standard library)")
    tr.add_argument("--out", help="run folder (default runs/nano)")
    tr.add_argument("--steps", type=int)
    tr.add_argument("--batch-size", dest="batch_size", type=int)
    tr.add_argument("--seq-len", dest="seq_len", type=int)
    tr.add_argument("--grad-accum", dest="grad_accum", type=int, help="micro-batches per step (divides --batch-size)")
    tr.add_argument("--batch-ramp-start", dest="batch_ramp_start", type=int,
                    help="ramp the batch size linearly from this many sequences to --batch-size")
    tr.add_argument("--batch-ramp-steps", dest="batch_ramp_steps", type=int, help="steps the ramp takes")
    tr.add_argument("--lr", type=float)
    tr.add_argument("--warmup-steps", dest="warmup_steps", type=int)
    tr.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    tr.add_argument("--activation-checkpointing", dest="activation_checkpointing", action="store_true", default=None)
    tr.add_argument("--alpha-expert", dest="alpha_expert", type=float)
    tr.add_argument("--alpha-device", dest="alpha_device", type=float)
    tr.add_argument("--alpha-comm", dest="alpha_comm", type=float)
    tr.add_argument("--capacity-factor", dest="capacity_factor", type=float, help="token dropping (paper: 1.0)")
    tr.add_argument("--max-documents", dest="max_documents", type=int, help="documents to tokenise")
    tr.add_argument("--tokenizer-documents", dest="tokenizer_documents", type=int, help="documents to train BPE on")
    _add_dedup_args(tr)
    tr.add_argument("--eval-every", dest="eval_every", type=int)
    tr.add_argument("--save-every", dest="save_every", type=int)
    tr.add_argument("--seed", type=int)
    tr.add_argument("--set", action="append", metavar="FIELD=JSON",
                    help="override a config field of --model first, e.g. max_position_embeddings=8192 (repeatable)")
    tr.add_argument("--resume", action="store_true", default=None, help="continue from the latest checkpoint")
    tr.add_argument("--sample-tokens", dest="sample_tokens", type=int, default=48)
    tr.add_argument("--sample-prompt", dest="sample_prompt", default="def ")
    tr.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="tokenizer + packed token shards for training (default: Python's stdlib)")
    data.add_argument("--data", help="folder of text files or a JSONL file (default: Python's standard library)")
    data.add_argument("--out", default="runs/nano", help="run folder to fill (tokenizer.json, data/)")
    _add_model_args(data, "preset or config whose vocab_size the tokenizer gets (default nano)", default="nano")
    data.add_argument("--max-documents", dest="max_documents", type=int, default=None,
                      help="documents of the source to read (default: all)")
    _add_dedup_args(data)
    data.set_defaults(func=cmd_data)

    plot = sub.add_parser("plot", help="PNG plots of a training run: loss, lr, expert load")
    plot.add_argument("run", help="run folder (with metrics.jsonl)")
    plot.add_argument("--out", help="folder for the PNGs (default: the run folder)")
    plot.set_defaults(func=cmd_plot)

    ev = sub.add_parser("eval", help="validation loss and perplexity of a run or model folder")
    _add_model_args(ev, "run folder (its final model or latest checkpoint), or model folder with --data",
                    required=True)
    ev.add_argument("--data", help="shard folder (default RUN/data)")
    ev.add_argument("--batches", type=int, default=8)
    ev.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    ev.add_argument("--seq-len", dest="seq_len", type=int, default=128)
    ev.add_argument("--task", help="accuracy on a built-in task instead (addition, compare)")
    ev.add_argument("--n", type=int, default=500, help="problems for --task")
    ev.add_argument("--seed", type=int, default=1234, help="problems' seed for --task")
    ev.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"], help="for --task")
    ev.add_argument("--json", action="store_true", help="print --task's result as JSON")
    ev.add_argument("--needle", action="store_true",
                    help="pass-key retrieval per (length, depth): needle.json and needle.png in --out")
    ev.add_argument("--lengths", default="512,1024,2048", help="prompt lengths for --needle (comma-separated)")
    ev.add_argument("--depths", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
                    help="needle depths for --needle, 0 (start) to 1 (end)")
    ev.add_argument("--trials", type=int, default=4, help="random keys per (length, depth) for --needle")
    ev.add_argument("--ppl-by-position", dest="ppl_by_position", action="store_true",
                    help="validation loss by token position over long-document windows of --seq-len: "
                         "ppl_by_position.json and .png in --out")
    ev.add_argument("--baseline", help="another run or model folder for --ppl-by-position's plot (e.g. the model "
                                       "before extension)")
    ev.add_argument("--bins", type=int, default=32, help="position bins for --ppl-by-position")
    ev.add_argument("--out", help="folder for --needle / --ppl-by-position files (default: MODEL)")
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("extend", help="extend a model's context with YaRN and long-document training")
    _add_model_args(ex, "model folder pretrained with plain RoPE (e.g. RUN/model of dsv2 train)", required=True)
    ex.add_argument("--seq-len", dest="seq_len", type=int, help="training length L (default 1024)")
    ex.add_argument("--factor", type=float, help="YaRN scale s: the context becomes s x L0 (default L / L0)")
    ex.add_argument("--original-length", dest="original_length", type=int,
                    help="L0, the length MODEL was pretrained at, when its config does not record it")
    ex.add_argument("--retrieval", type=float,
                    help="share of each batch that is synthetic pass-key documents (default 0)")
    ex.add_argument("--data", help="folder of text files or a JSONL file (default: Python's standard library); "
                                   "only documents longer than --seq-len are trained on")
    ex.add_argument("--max-documents", dest="max_documents", type=int, help="documents to tokenise")
    _add_stage_args(ex, lora=False)
    ex.set_defaults(func=cmd_extend)

    _add_sft_parser(sub)
    _add_grpo_parser(sub)
    _add_ablate_parser(sub)

    q = sub.add_parser("quantize", help="write a checkpoint with int8, int4 or block-FP8 weights")
    _add_model_args(q, "checkpoint folder to convert", required=True)
    q.add_argument("--out", required=True, help="folder to write")
    q.add_argument("--format", required=True, choices=["int8", "int4", "fp8"],
                   help="int8 (per-channel scales), int4 (groups with scales and zero points) or DeepSeek's block "
                        "FP8 (e4m3 with a scale per block)")
    q.add_argument("--group-size", dest="group_size", type=int, default=128, choices=[32, 64, 128],
                   help="int4 group along the input dimension")
    q.add_argument("--block-size", dest="block_size", type=int, default=128, help="fp8 block (square)")
    q.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of what is not quantized (and of int8 scales)")
    q.set_defaults(func=cmd_quantize)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, paged latent cache)")
    _add_model_args(serve, CHECKPOINT_HELP + "; default nano", default="nano")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", dest="api_key", help="require `Authorization: Bearer KEY` on /v1/*")
    serve.add_argument("--served-model-name", dest="served_model_name", help="model id (default: folder name)")
    serve.add_argument("--dtype", default="auto", choices=list(DTYPES), help=DTYPE_HELP)
    _add_inference_format_args(serve)
    serve.add_argument("--max-running", dest="max_running", type=int, default=32, help="sequences per batch")
    serve.add_argument("--cache-mb", dest="cache_mb", type=float, help="latent cache memory (default 1024 MiB)")
    serve.add_argument("--block-size", dest="block_size", type=int, default=16, help="tokens per cache block")
    serve.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                       help="compute every prompt from scratch instead of sharing the cache blocks of common prefixes")
    serve.add_argument("--prefill-chunk", dest="prefill_chunk", type=int, default=256,
                       help="prompt tokens a step may prefill while others decode (the tail of inter-token latency)")
    serve.add_argument("--max-prefill-tokens", dest="max_prefill_tokens", type=int, default=1024,
                       help="prompt tokens a step may prefill while nobody decodes")
    serve.add_argument("--compile-decode", dest="compile_decode", action="store_true",
                       help="decode steps as one compiled graph (CPU; float weights, or --quantization w8a8 or "
                            "w4a8 on an AVX-512 BF16 CPU): 3x faster steps for small models, after about a minute "
                            "of compiling on the first steps")
    serve.add_argument("--compile-prefill", dest="compile_prefill", action="store_true",
                       help="short prefill steps (chunks all one length, <= 256 tokens) as compiled graphs (CPU, "
                            "float weights; nano's 128-token prompt 2.5x faster), after compiling on the first ones")
    serve.add_argument("--log-level", dest="log_level", default="info")
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="interactive chat with streaming replies")
    _add_model_args(chat, CHECKPOINT_HELP, required=True)
    _add_sampling_args(chat, max_tokens=512)
    chat.add_argument("--system", help="system message")
    chat.set_defaults(func=cmd_chat)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as a namespace, with its model (MODEL or --model) in `args.model`."""
    args = build_parser().parse_args(argv)
    if hasattr(args, "model_parser"):  # every command but plot takes a model
        _reconcile_model(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, SamplingError, TokenizerError, OSError, ValueError) as e:
        print(f"dsv2: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
