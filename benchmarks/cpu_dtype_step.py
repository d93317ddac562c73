"""cpp MGPO step on the CPU for fp32, bf16 and fp16 parameters side by side (bf16/fp16 keep an fp32 master).

    .venv/bin/python benchmarks/cpu_dtype_step.py [--layers 16] [--reps 25]

LLaMA-2-7B LoRA r=8 shapes (7 projections x A/B per layer); the contenders run interleaved (rotating order),
medians printed with each dtype's paired ratio to the fp32 step (median over repetitions of the per-repetition
ratio) and the CPU model.
"""
import argparse
import os
import statistics
import time

import torch

from cpu_kernel_check import cpu_model, git_commit, lora_shapes
from mgpo_kernels import MGPO, _C


def make(shapes, dtype):
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=g).mul_(0.02).to(dtype).requires_grad_(True) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).mul_(1e-3).to(dtype)
    return ps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--reps", type=int, default=25)
    args = ap.parse_args()
    shapes = lora_shapes(8)[: 14 * args.layers]
    n = sum(a * b for a, b in shapes)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    opts = {d: MGPO(make(shapes, d), lr=1e-4, backend="cpp") for d in dtypes}
    times = {d: [] for d in dtypes}
    for rep in range(args.reps + 3):
        order = dtypes[rep % 3:] + dtypes[:rep % 3]
        for d in order:
            t0 = time.perf_counter()
            opts[d].step()
            if rep >= 3:
                times[d].append(time.perf_counter() - t0)
    print(f"# CPU: {cpu_model()}; git {git_commit()}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{len(shapes)} tensors, {n:,} params, {torch.get_num_threads()} threads, cpp CPU kernels: {_C.cpu_isa()}")
    for d in dtypes:
        paired = statistics.median(a / b for a, b in zip(times[d], times[torch.float32]))
        print(f"  {str(d):15s} {statistics.median(times[d]) * 1e3:7.2f} ms per step (median of {args.reps}),"
              f" {paired:.2f}x the fp32 step (paired)")


if __name__ == "__main__":
    main()
