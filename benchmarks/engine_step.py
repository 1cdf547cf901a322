"""The engine's decode step, alone: `LLMEngine.step` at batch B after a 128-token prompt, the median of 24 steps
after 8 warm-up steps, random weights built in memory in --dtype (default auto: the CPU's native dtype, fp32 on
AVX2). A quick A/B probe for a change to the decode path
(run it on the two trees one after the other); decode.py is the benchmark against transformers.

    python benchmarks/engine_step.py lite4 float 1 8     # model (nano / small / lite4), weights, batch sizes
    python benchmarks/engine_step.py nano float 1 8 --compile  # the compiled decode step (infer/compiled.py)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dsv2
from dsv2 import LLM, SamplingParams, hardware

MODELS = {"nano": lambda: dsv2.preset("nano"), "small": lambda: dsv2.preset("small"),
          "lite4": lambda: dsv2.preset("deepseek-v2-lite").replace(num_hidden_layers=4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=list(MODELS))
    p.add_argument("weights", choices=["float", "int8", "w8a8", "int4", "w4a8", "bf16"],
                   help="float: unquantized; bf16: an fp32 model's weights stored in bf16")
    p.add_argument("batches", type=int, nargs="+")
    p.add_argument("--compile", action="store_true", help="decode steps compiled (compiling is in the warm-up)")
    p.add_argument("--dtype", default="auto", choices=list(hardware.DTYPES), help="the model's and activations' dtype")
    args = p.parse_args()
    config = MODELS[args.model]()
    dtype = hardware.resolve_dtype(args.dtype)
    model = dsv2.weights.random_model(config, dtype=dtype, seed=0)
    llm = LLM(model, quantization=None if args.weights == "float" else args.weights, skip_tokenizer_init=True,
              max_batch_size=max(args.batches), compile_decode=args.compile)
    engine = llm.engine
    print(f"{hardware.describe()}; model in {str(dtype).removeprefix('torch.')}")
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(10, min(config.vocab_size, 30000), (batch, 128), generator=g).tolist()
        for prompt in prompts:
            engine.add_request(engine.make_request(prompt, SamplingParams(max_tokens=40, temperature=0,
                                                                          ignore_eos=True)))
        for _ in range(8):  # the prefill, then warm-up decode steps
            engine.step()
        times = []
        for _ in range(24):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        while engine.has_unfinished():
            engine.step()
        label = f"{args.model} {args.weights}{' compiled' if args.compile else ''}"
        print(f"{label} batch {batch}: decode step {statistics.median(times) * 1e3:.2f} ms "
              f"(fastest {min(times) * 1e3:.2f})")


if __name__ == "__main__":
    main()
