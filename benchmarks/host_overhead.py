"""Host (Python + dispatch) cost of one optimizer step, isolated from memory traffic: 448 tiny tensors, the
tensor count of LLaMA-2-7B LoRA on all linear layers. Prints medians side by side for MGPO (its step and the apply
pass the training forward runs before it: theta at rest) and fused AdamW.

    .venv/bin/python benchmarks/host_overhead.py [--backend cpp] [--tensors 448] [--cold] [--threads N]

--cold writes 200 MB before every timed step, as a real step's streaming passes leave the caches: the host
objects (tensors, state dicts) are then read from memory, which is what a step of large tensors pays (2 threads
by default).  On a machine shared with other jobs, ``--threads 1`` keeps a descheduled OpenMP thread from
stalling a pass's barrier (which then measures the scheduler, not the host path).
"""
import argparse
import time

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
    ap.add_argument("--cold", action="store_true", help="flush the caches before every timed step")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 warm, 2 cold)")
    args = ap.parse_args()
    if args.cold:
        return cold(args)
    torch.set_num_threads(args.threads or 1)
    ps = params_with_grads([(args.numel,)] * args.tensors, param_std=1.0, grad_std=1.0)
    opt = MGPO(ps, backend=args.backend)
    adam = torch.optim.AdamW(ps, fused=True)

    def mgpo_iteration():
        opt.apply_perturbation()  # what the training forward's hook runs (no module here)
        opt.step()

    for _ in range(LINES):  # several lines: their spread is the noise of the machine
        times = time_interleaved({"mgpo": mgpo_iteration, "adamw": adam.step}, STEPS_PER_LINE, warmup_rounds=1)
        print(f"MGPO[{opt.backend}] apply + step {percentile(times['mgpo'], 50) * 1e3:.3f} ms | torch AdamW(fused) step "
              f"{percentile(times['adamw'], 50) * 1e3:.3f} ms  ({args.tensors} tensors of {args.numel} elements, "
              f"{torch.get_num_threads()} thread(s))")


def cold(args) -> None:
    from mgpo_kernels import _host_cache

    torch.set_num_threads(args.threads or 2)
    ps = params_with_grads([(args.numel,)] * args.tensors, seed=9)
    ps2 = params_with_grads([(args.numel,)] * args.tensors, seed=9)
    opt = MGPO(ps, lr=1e-4, rho=0.05, backend=args.backend)
    adam = torch.optim.AdamW(ps2, lr=1e-4, fused=True)
    for _ in range(3):  # a steady loop: the host cache (and the cpp backend's KeptPlan) in use
        opt.apply_perturbation()
        opt.step()
        adam.step()
    flush = torch.randn(200_000_000 // 4)
    calls = {f"MGPO[{opt.backend}] apply": opt.apply_perturbation, f"MGPO[{opt.backend}] step": opt.step,
             "torch AdamW(fused) step": adam.step, "MGPO host-cache lookup": lambda: _host_cache.lookup(opt)}
    times = {k: [] for k in calls}
    for _ in range(41):
        for k, f in calls.items():
            flush.add_(1.0)
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    print("  ".join(f"{k} {percentile(v, 50) * 1e3:.3f} ms" for k, v in times.items()),
          f"(cold caches, {args.tensors} tensors of {args.numel} elements, {torch.get_num_threads()} thread(s))")


if __name__ == "__main__":
    main()
