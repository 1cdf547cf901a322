"""`dsv2` command line: argparse -> library calls."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsv2.config import PRESETS, ConfigError, ModelConfig, preset
from dsv2.info import summarize


def _config_of(name_or_path: str) -> ModelConfig:
    path = Path(name_or_path)
    if path.is_dir():
        return ModelConfig.from_json(path / "config.json")
    if path.suffix == ".json" and path.is_file():
        return ModelConfig.from_json(path)
    if name_or_path in PRESETS:
        return preset(name_or_path)
    raise ConfigError(
        f"{name_or_path!r} is not a preset ({', '.join(PRESETS)}), a checkpoint folder or a config.json"
    )


def _billions(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f}B)"


def cmd_info(args: argparse.Namespace) -> int:
    config = _config_of(args.model)
    s = summarize(config)
    if args.json:
        print(json.dumps({"model": args.model, **s}, indent=2))
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
    print(f"  KV cache per token (bf16):     {latent:,} bytes latent (c_KV {config.kv_lora_rank} + "
          f"k_rope {config.qk_rope_head_dim} per layer)")
    print(f"    MHA equivalent:              {mha:,} bytes ({latent / mha:.2%} of it)")
    print(f"    reference (decompressed K,V): {s['reference_kv_cache_bytes_per_token']:,} bytes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv2", description="DeepSeek-V2 in readable PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameter counts and KV-cache size of a preset or checkpoint")
    info.add_argument("model", help=f"preset ({', '.join(PRESETS)}), checkpoint folder or config.json")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, OSError) as e:
        print(f"dsv2: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
