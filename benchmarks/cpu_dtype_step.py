"""cpp MGPO step on the CPU for fp32, bf16 and fp16 parameters side by side (bf16/fp16 keep an fp32 master).

    .venv/bin/python benchmarks/cpu_dtype_step.py [--layers 16] [--reps 25]

LLaMA-2-7B LoRA r=8 shapes (7 projections x A/B per layer); the contenders run interleaved (rotating order),
medians printed with each dtype's paired ratio to the fp32 step (median over repetitions of the per-repetition
ratio) and the CPU model.
"""
import argparse

import torch

from mgpo_kernels import MGPO, _C
from mgpo_kernels.bench.common import machine_line
from mgpo_kernels.bench.shapes import lora_shapes, numel
from mgpo_kernels.bench.tensors import params_with_grads
from mgpo_kernels.bench.timing import paired_quantiles, percentile, time_interleaved

WARMUP_ROUNDS = 3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--reps", type=int, default=25)
    args = ap.parse_args()
    shapes = lora_shapes(args.layers, rank=8)
    n = numel(shapes)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    # the same draws (seed 0) in every dtype
    opts = {d: MGPO(params_with_grads(shapes, seed=0, dtype=d), lr=1e-4, backend="cpp") for d in dtypes}
    times = time_interleaved({d: opts[d].step for d in dtypes}, args.reps, warmup_rounds=WARMUP_ROUNDS,
                             order="rotate")
    print(machine_line())
    print(f"{len(shapes)} tensors, {n:,} params, {torch.get_num_threads()} threads, cpp CPU kernels: {_C.cpu_isa()}")
    for d in dtypes:
        paired = paired_quantiles(times[d], times[torch.float32])["median"]
        print(f"  {str(d):15s} {percentile(times[d], 50) * 1e3:7.2f} ms per step (median of {args.reps}),"
              f" {paired:.2f}x the fp32 step (paired)")


if __name__ == "__main__":
    main()
