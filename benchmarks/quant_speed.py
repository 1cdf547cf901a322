"""Decode speed of the weight formats (fp32, bf16, int8, w8a8, int4) and of the latent-cache formats (auto, fp8,
6bit), dsv2's engine, random weights built in memory, greedy, EOS ignored, all in one process and one run.

- weights: decode tok/s at batch 1 and 8 (prompt 128, 32 new tokens), and the ratio to bf16;
- cache: the batch-1 decode step at a context of --context tokens with bf16 weights, per cache format, and
  the ratio to the bf16 cache.

    python benchmarks/quant_speed.py [--models small lite4] [--context 8192]
"""

from __future__ import annotations

import argparse

import torch

import dsv2
from dsv2 import LLM, SamplingParams, hardware
from dsv2.model import quant

MODELS = {
    "small": lambda: dsv2.preset("small"),
    "lite4": lambda: dsv2.preset("deepseek-v2-lite").replace(num_hidden_layers=4),  # V2-Lite's shapes, 4 layers
}


def decode_tok_s(llm: LLM, batch: int, prompt: int, new: int, vocab: int) -> float:
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(10, min(vocab, 30000), (batch, prompt), generator=g).tolist()
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    llm.generate(prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
    return llm.stats()["decode_tok_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small", "lite4"], choices=list(MODELS))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--context", type=int, default=8192)
    args = p.parse_args()
    print(f"machine: {hardware.describe()}")
    for name in args.models:
        config = MODELS[name]()
        results = {}
        for fmt in ("fp32", "bf16", "int8", "w8a8", "int4"):
            model = dsv2.weights.random_model(config, dtype=torch.float32 if fmt == "fp32" else torch.bfloat16, seed=0)
            model = quant.for_inference(model, None if fmt in ("fp32", "bf16") else fmt)
            llm = LLM(model, skip_tokenizer_init=True, max_batch_size=8)
            results[fmt] = [decode_tok_s(llm, b, 128, args.new_tokens, config.vocab_size) for b in (1, 8)]
            del llm, model
        for fmt, (b1, b8) in results.items():
            r1, r8 = b1 / results["bf16"][0], b8 / results["bf16"][1]
            print(f"{name} weights {fmt:<5} decode tok/s: batch 1 {b1:7.1f} ({r1:.2f}x bf16), batch 8 {b8:7.1f} "
                  f"({r8:.2f}x bf16)")
        model = dsv2.weights.random_model(config.replace(max_position_embeddings=args.context + 64),
                                          dtype=torch.bfloat16, seed=0)
        steps = {}
        for cache in ("auto", "fp8", "6bit"):
            llm = LLM(model, skip_tokenizer_init=True, max_batch_size=1, kv_cache_dtype=cache)
            tok_s = decode_tok_s(llm, 1, args.context, 16, config.vocab_size)
            steps[cache] = 1000 / tok_s
            print(f"{name} cache {cache:<4} decode step at {args.context} context: {steps[cache]:7.1f} ms "
                  f"({steps[cache] / steps['auto']:.2f}x the bf16 cache's), "
                  f"{llm.engine.cache.bytes_per_token():,} B per token")
            del llm


if __name__ == "__main__":
    main()
