"""Host (Python + dispatch) cost of one optimizer step, isolated from memory traffic: 448 tiny tensors, the
tensor count of LLaMA-2-7B LoRA on all linear layers. Prints medians side by side for MGPO and fused AdamW.

    .venv/bin/python benchmarks/host_overhead.py [--backend cpp] [--tensors 448]
"""
import argparse

import torch

from mgpo_kernels import MGPO
from mgpo_kernels.bench.tensors import params_with_grads
from mgpo_kernels.bench.timing import percentile, time_interleaved

STEPS_PER_LINE, LINES = 200, 3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--tensors", type=int, default=448)
    ap.add_argument("--numel", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ps = params_with_grads([(args.numel,)] * args.tensors, param_std=1.0, grad_std=1.0)
    opt = MGPO(ps, backend=args.backend)
    adam = torch.optim.AdamW(ps, fused=True)
    for _ in range(LINES):  # several lines: their spread is the noise of the machine
        times = time_interleaved({"mgpo": opt.step, "adamw": adam.step}, STEPS_PER_LINE, warmup_rounds=1)
        print(f"MGPO[{opt.backend}] step {percentile(times['mgpo'], 50) * 1e3:.3f} ms | torch AdamW(fused) step "
              f"{percentile(times['adamw'], 50) * 1e3:.3f} ms  ({args.tensors} tensors of {args.numel} elements, "
              "1 thread)")


if __name__ == "__main__":
    main()
