"""Host (Python + dispatch) cost of one optimizer step, isolated from memory traffic: 448 tiny tensors, the
tensor count of LLaMA-2-7B LoRA on all linear layers. Prints medians side by side for MGPO and fused AdamW.

    .venv/bin/python benchmarks/host_overhead.py [--backend cpp] [--tensors 448]
"""
import argparse
import time

import torch

from mgpo_kernels import MGPO


def median_ms(f, n=200):
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--tensors", type=int, default=448)
    ap.add_argument("--numel", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ps = [torch.nn.Parameter(torch.randn(args.numel)) for _ in range(args.tensors)]
    for p in ps:
        p.grad = torch.randn(args.numel)
    opt = MGPO(ps, backend=args.backend)
    adam = torch.optim.AdamW(ps, fused=True)
    for _ in range(3):  # interleaved repetitions
        print(f"MGPO[{opt.backend}] step {median_ms(opt.step):.3f} ms | torch AdamW(fused) step "
              f"{median_ms(adam.step):.3f} ms  ({args.tensors} tensors of {args.numel} elements, 1 thread)")


if __name__ == "__main__":
    main()
