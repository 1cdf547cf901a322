"""Quality of the quantized formats on a model `dsv2 train` produced: weights (fp32, bf16, int8, w8a8, int4,
block FP8) and latent cache (auto, fp8, 6bit), each against bf16 weights with the bf16 cache.

For each variant:
- validation perplexity, teacher-forced through the latent cache in chunks of 32 tokens, so that every
  attended latent has been through the cache's storage format;
- the max |logit| error of those forwards against the fp32 model with the plain cache;
- greedy agreement: 64 prompts (16 validation tokens each) × 64 new tokens through the engine; the share of
  positions whose token equals the reference's, and the mean length of the common prefix.

    python benchmarks/quant_quality.py --run runs/nano [--batches 8] [--int4-group 32]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv2 import LLM, SamplingParams
from dsv2.data.shards import TokenShards
from dsv2.infer.cache import LatentCache
from dsv2.model import quant
from dsv2.train.pretrain import PackedText
from dsv2.weights import load_model, save_model

CHUNK = 32


@torch.no_grad()
def cached_logits(model, tokens: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    """Logits [B,S,V] fp32 of a teacher-forced pass, CHUNK tokens at a time through a latent cache."""
    B, S = tokens.shape
    cache = LatentCache(model.config, B, S, dtype=model.embed.weight.dtype, kv_cache_dtype=kv_cache_dtype)
    out = []
    for start in range(0, S, CHUNK):
        chunk = tokens[:, start : start + CHUNK]
        out.append(model(chunk, cache=cache).float())
        cache.lengths += chunk.shape[1]
    return torch.cat(out, dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a `dsv2 train` run folder (model/ and data/)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--int4-group", type=int, default=32)
    args = p.parse_args()
    run = Path(args.run)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; model {run / 'model'}")
    source = PackedText(TokenShards(run / "data", "val"), args.seq_len, shuffle=False)
    batches = [source.next_batch(8) for _ in range(args.batches)]
    prompts = [row[:16].tolist() for b in batches for row in b.inputs][:64]

    def weights(fmt: str):
        if fmt == "fp32":
            return load_model(run / "model", dtype=torch.float32, progress=False)
        if fmt == "fp8":
            with tempfile.TemporaryDirectory() as tmp:
                save_model(load_model(run / "model", dtype=torch.bfloat16, progress=False), tmp, progress=False,
                           fp8_block=(128, 128))
                return load_model(tmp, dtype=torch.bfloat16, fp8="keep", progress=False)
        model = load_model(run / "model", dtype=torch.bfloat16, progress=False)
        return model if fmt == "bf16" else quant.for_inference(model, fmt, args.int4_group)

    truth = [cached_logits(weights("fp32"), b.inputs, "auto") for b in batches[:1]]
    greedy = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    reference = None
    print(f"{'weights':<8} {'cache':<6} {'perplexity':>10} {'max |dlogit|':>12} {'agreement':>9} {'prefix':>6}")
    for fmt, cache in [("bf16", "auto"), ("fp32", "auto"), ("int8", "auto"), ("w8a8", "auto"), ("int4", "auto"),
                       ("fp8", "auto"),
                       ("bf16", "fp8"), ("bf16", "6bit"), ("int8", "fp8"), ("int4", "6bit")]:
        model = weights(fmt)
        nll = count = 0.0
        for i, b in enumerate(batches):
            logits = cached_logits(model, b.inputs, cache)
            nll += F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), reduction="sum").item()
            count += b.targets.numel()
            if i == 0:
                error = (logits - truth[0]).abs().max().item()
        outs = [o.token_ids for o in LLM(model, kv_cache_dtype=cache, skip_tokenizer_init=True,
                                         max_batch_size=64).generate(prompts, greedy)]
        reference = reference or outs
        same = sum(a == b for ro, o in zip(reference, outs, strict=True) for a, b in zip(ro, o, strict=True))
        prefix = sum(next((k for k, (a, b) in enumerate(zip(ro, o, strict=True)) if a != b), len(o))
                     for ro, o in zip(reference, outs, strict=True)) / len(outs)
        ppl = torch.tensor(nll / count).exp().item()
        print(f"{fmt:<8} {cache:<6} {ppl:>10.3f} {error:>12.4f} {same / (64 * len(outs)):>9.3f} {prefix:>6.1f}")


if __name__ == "__main__":
    main()
