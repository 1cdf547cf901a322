"""Peak memory of loading a checkpoint: dsv2.load_model vs transformers' from_pretrained.

Writes a random `small`-preset checkpoint (bf16 on disk), then loads it in fresh subprocesses and
reports the peak resident set size above the interpreter's baseline, as a multiple of the weights' size
in the target dtype. Usage: python benchmarks/load_memory.py [--preset small] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile

LOADER = r"""
import json, sys, torch
torch.set_num_threads(2)
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
import dsv2, transformers  # import both so the baseline is the same
def status_kb(key):  # VmHWM, unlike ru_maxrss, is not inherited from the parent across fork+exec
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key))
base = status_kb("VmRSS")
if which == "dsv2":
    model = dsv2.load_model(path, dtype=dtype, progress=False)
else:
    model = transformers.DeepseekV2ForCausalLM.from_pretrained(path, dtype=dtype)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
peak = status_kb("VmHWM")
print(json.dumps({"weights_mb": weights / 2**20, "peak_over_base_mb": (peak - base) / 1024,
                  "after_mb": (status_kb("VmRSS") - base) / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    import torch

    import dsv2

    with tempfile.TemporaryDirectory() as d:
        dsv2.save_model(dsv2.load_model(args.preset, dtype=torch.bfloat16, seed=0), d)
        rows = {}
        for which in ("dsv2", "transformers"):
            out = subprocess.run([sys.executable, "-c", LOADER, which, d, args.dtype], capture_output=True,
                                 text=True, check=True)
            rows[which] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}")
    print(f"checkpoint: preset {args.preset}, bf16 on disk, loaded as {args.dtype}")
    print(f"{'loader':<14}{'weights MB':>12}{'peak RSS over baseline MB':>28}{'x weights':>11}")
    for which, r in rows.items():
        print(f"{which:<14}{r['weights_mb']:>12.0f}{r['peak_over_base_mb']:>28.0f}"
              f"{r['peak_over_base_mb'] / r['weights_mb']:>11.2f}")
    ratio = rows["transformers"]["peak_over_base_mb"] / rows["dsv2"]["peak_over_base_mb"]
    print(f"transformers peak / dsv2 peak: {ratio:.2f}")


if __name__ == "__main__":
    main()
