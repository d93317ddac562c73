"""CPU check of the cpp backend's step against torch's fused AdamW on LLaMA-2-7B LoRA shapes.

    .venv/bin/python benchmarks/cpu_kernel_check.py [--rank 8] [--reps 21]

Prints, from one run, the two step ratios side by side:
    cpp MGPO step                     / torch.optim.AdamW(fused=True).step()          (target <= 1.1)
    cpp MGPO step with max_grad_norm  / clip_grad_norm_ + AdamW(fused=True).step()    (target <= 0.7)
and the bandwidth of each pass (pass 1 reads g, m: 8 B/elem; pass 2 reads p, g, m, v and writes p, m, v:
28 B/elem; fp32), with pass 1 set beside `torch.dot(g, m)`, which reads the same 8 B/elem: the dot runs on two
flat fp32 buffers of all the gradients' and first moments' elements, and pass 1 runs on the optimizer's own 448
separately allocated tensors and on 448 views of those two flat buffers (the very bytes the dot reads).  Pass 1
runs as a steady step runs it, through a ``_C.KeptPlan``; the row ``pass1_op`` is the same pass through the op
``torch.ops.mgpo.reduce_sums``, whose call converts all seven tensor lists.  torch.dot is MKL's sdot (with torch
2.14.1 it runs on torch's threads: 5.4 ms with one thread, 2.2 ms with two on 80 MB tensors); a `torch.sum` over one
buffer holding both is timed as well.
The header records the CPU model, the git commit and the load average.

The machine's cores may be shared with other work: every repetition runs all contenders back to back
(interleaved, in a rotating order); the figures are medians over repetitions, and the ratios are also given as
the median of per-repetition (paired) ratios, which cancels slow changes of the load.
"""
from __future__ import annotations

import argparse

import torch

from mgpo_kernels import MGPO
from mgpo_kernels.backends.base import GlobalState, GroupTensors, StepConfig
from mgpo_kernels.backends.plan import PlanCache, StepPlan
from mgpo_kernels.bench.common import machine_line
from mgpo_kernels.bench.shapes import lora_shapes, numel
from mgpo_kernels.bench.tensors import params_with_grads
from mgpo_kernels.bench.timing import paired_quantiles, percentile, time_interleaved


def pass_plan(params, grads, exp_avgs, exp_avg_sqs, steps, lr: float = 1e-4) -> StepPlan:
    """The step plan of the extension's ops for these tensors, every tensor in one group, with rho = 0 and no
    clipping: pass 2 then runs with clip factor 1 and nothing to restore or apply."""
    group = GroupTensors(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), [None] * len(params),
                         list(steps), lr, 0.9, 0.999, 1e-8, 0.0)
    cfg = StepConfig(rho=0.0, ema_beta=0.9, adaptive_norm=True, sign=1.0, max_grad_norm=None, perturbed=True)
    return PlanCache().build([group], GlobalState.zeros(torch.device("cpu")), cfg)


def keep(plan: StepPlan):
    """The plan's persistent lists held in C++ (``_C.KeptPlan``), as the cpp backend holds them in a steady loop."""
    from mgpo_kernels import _C

    return _C.KeptPlan(plan.params, plan.exp_avgs, plan.exp_avg_sqs, plan.masters, plan.master_index, plan.steps,
                       plan.group_sizes, plan.gstate)


def run_pass1(plan: StepPlan, kept=None) -> torch.Tensor:
    """Pass 1 alone (the reduce: reads g and m) as a step runs it: through ``kept`` (a KeptPlan of ``plan``), or
    the extension's op, which takes every list at every call.  Under no_grad, as MGPO.step runs it (with grad mode
    on, torch's autograd fallback would also look at every input of the op for one that requires grad).  The
    extension is called here and in run_pass2, nowhere else in this script."""
    with torch.no_grad():
        if kept is None:
            return torch.ops.mgpo.reduce_sums(*plan)
        return kept.reduce_sums(plan.grads, plan.hyper, plan.lr_tensors, plan.grad_scale, plan.found_inf)


def run_pass2(plan: StepPlan, sums: torch.Tensor, kept=None) -> None:
    """Pass 2 alone (restore, AdamW, re-perturb: reads p, g, m, v and writes p, m, v) after the scalar stage (a
    few float64 operations), through ``kept`` or the op."""
    with torch.no_grad():
        if kept is None:
            torch.ops.mgpo.finish_step(*plan, sums)
        else:
            kept.finish_step(plan.grads, plan.hyper, plan.lr_tensors, plan.grad_scale, plan.found_inf, sums)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mgpo_kernels import _C

    shapes = lora_shapes(rank=args.rank)
    n = numel(shapes)
    print(machine_line())
    print(f"LLaMA-2-7B LoRA r={args.rank}: {len(shapes)} tensors, {n:,} fp32 params; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, cpp CPU kernels: {_C.cpu_isa()}")

    p_adam, p_clip, p_cpp, p_cppc = (params_with_grads(shapes, seed=s) for s in range(4))
    adam = torch.optim.AdamW(p_adam, lr=1e-4, fused=True)
    adam_c = torch.optim.AdamW(p_clip, lr=1e-4, fused=True)
    mg = MGPO(p_cpp, lr=1e-4, rho=0.05, backend="cpp")
    mgc = MGPO(p_cppc, lr=1e-4, rho=0.05, backend="cpp", max_grad_norm=args.max_grad_norm)

    def clip_then_adam():
        torch.nn.utils.clip_grad_norm_(p_clip, args.max_grad_norm)
        adam_c.step()

    # the passes alone, on mgc's tensors (after a first step, its state exists)
    mgc.step()
    st = [mgc.state[p] for p in p_cppc]
    grads = [p.grad for p in p_cppc]
    ms = [s["exp_avg"] for s in st]
    vs = [s["exp_avg_sq"] for s in st]
    steps = [s["step"] for s in st]

    plan = pass_plan(p_cppc, grads, ms, vs, steps)
    kept = keep(plan)
    sums = run_pass1(plan, kept)

    def pass1():
        run_pass1(plan, kept)

    def pass1_op():
        run_pass1(plan)

    # the same gradients and first moments in two flat buffers, and views of them in the tensors' shapes
    flat_g = torch.cat([g.reshape(-1) for g in grads])
    flat_m = torch.cat([m.reshape(-1) for m in ms])
    sizes = [g.numel() for g in grads]
    view_g = [v.view(g.shape) for v, g in zip(torch.split(flat_g, sizes), grads)]
    view_m = [v.view(m.shape) for v, m in zip(torch.split(flat_m, sizes), ms)]

    plan_views = plan._replace(grads=view_g, exp_avgs=view_m)
    kept_views = keep(plan_views)

    def pass1_views():
        run_pass1(plan_views, kept_views)

    def dot():  # MKL's sdot
        torch.dot(flat_g, flat_m)

    flat_gm = torch.cat([flat_g, flat_m])

    def flat_sum():  # a read of the same 8 B/elem on all of torch's threads
        flat_gm.sum()

    def pass2():
        run_pass2(plan, sums, kept)

    # pass 1 on as many one-element tensors: its host part (the arguments crossing into C++, the checks, the
    # parallel region), which the pass-1 rows above include
    tiny = params_with_grads([(1,)] * len(shapes), seed=9)
    z = [torch.zeros(1) for _ in tiny]
    plan_tiny = pass_plan(tiny, [p.grad for p in tiny], z, [torch.zeros(1) for _ in tiny],
                          [torch.ones(()) for _ in tiny])
    kept_tiny = keep(plan_tiny)

    def pass1_host():
        run_pass1(plan_tiny, kept_tiny)

    contenders = {  # each ratio's pair is adjacent in every rotation of this order, except at the wrap
        "adamw_fused": adam.step,
        "cpp": mg.step,
        "clip+adamw_fused": clip_then_adam,
        "cpp_max_grad_norm": mgc.step,
        "pass1_reduce": pass1,
        "torch_dot_flat": dot,
        "pass1_op": pass1_op,
        "torch_sum_flat": flat_sum,
        "pass1_flat_views": pass1_views,
        "pass2_update": pass2,
        "pass1_host_part": pass1_host,
    }
    names = list(contenders)
    times = time_interleaved(contenders, args.reps, warmup_rounds=args.warmup, order="rotate")
    med = {k: percentile(v, 50) for k, v in times.items()}
    lo = {k: min(v) for k, v in times.items()}
    print(f"\nmedian (min) over {args.reps} interleaved repetitions:")
    for k in names:
        print(f"  {k:20s} {med[k] * 1e3:8.2f} ms  ({lo[k] * 1e3:7.2f} ms)")

    # paired: the two contenders of a ratio ran back to back in the same repetition (same load on the machine)
    def paired(num, den):
        return paired_quantiles(times[num], times[den])["median"]

    p1 = paired("cpp", "adamw_fused")
    p2 = paired("cpp_max_grad_norm", "clip+adamw_fused")
    r1 = med["cpp"] / med["adamw_fused"]
    r2 = med["cpp_max_grad_norm"] / med["clip+adamw_fused"]
    print("\n                                                  paired  ratio of  ratio of   target")
    print("                                                  median  medians   minima")
    print(f"cpp / AdamW(fused)                                 {p1:5.2f}   {r1:5.2f}     "
          f"{lo['cpp'] / lo['adamw_fused']:5.2f}    <= 1.10")
    print(f"cpp+max_grad_norm / (clip_grad_norm_+AdamW)        {p2:5.2f}   {r2:5.2f}     "
          f"{lo['cpp_max_grad_norm'] / lo['clip+adamw_fused']:5.2f}    <= 0.70")
    p3 = paired("torch_dot_flat", "pass1_reduce")  # bandwidth ratios: the time ratio's inverse
    p4 = paired("torch_dot_flat", "pass1_flat_views")
    print(f"pass 1 bandwidth / torch.dot's: own tensors        {p3:5.2f}   {med['torch_dot_flat'] / med['pass1_reduce']:5.2f}"
          f"     {lo['torch_dot_flat'] / lo['pass1_reduce']:5.2f}    >= 0.90")
    p6 = paired("torch_dot_flat", "pass1_op")
    print(f"pass 1 bandwidth / torch.dot's: the op's call       {p6:5.2f}   "
          f"{med['torch_dot_flat'] / med['pass1_op']:5.2f}     {lo['torch_dot_flat'] / lo['pass1_op']:5.2f}")
    print(f"pass 1 bandwidth / torch.dot's: same flat bytes    {p4:5.2f}   "
          f"{med['torch_dot_flat'] / med['pass1_flat_views']:5.2f}     "
          f"{lo['torch_dot_flat'] / lo['pass1_flat_views']:5.2f}    >= 0.90")
    p5 = paired("torch_sum_flat", "pass1_reduce")
    print(f"pass 1 bandwidth / torch.sum's of g and m           {p5:5.2f}   "
          f"{med['torch_sum_flat'] / med['pass1_reduce']:5.2f}     "
          f"{lo['torch_sum_flat'] / lo['pass1_reduce']:5.2f}")
    gb1 = 8 * n / med["pass1_reduce"] / 1e9
    gb1v = 8 * n / med["pass1_flat_views"] / 1e9
    gbd = 8 * n / med["torch_dot_flat"] / 1e9
    gb2 = 28 * n / med["pass2_update"] / 1e9
    gba = 28 * n / med["adamw_fused"] / 1e9
    print(f"\npass 1 (reduce, 8 B/elem)   {gb1:6.1f} GB/s on the optimizer's tensors, {gb1v:6.1f} GB/s on views of "
          f"flat buffers;  torch.dot(g, m) on the flat buffers {gbd:6.1f} GB/s, "
          f"torch.sum of both {8 * n / med['torch_sum_flat'] / 1e9:6.1f} GB/s ({torch.get_num_threads()} threads)")
    host = med["pass1_host_part"]
    print(f"pass 1 without its host part ({host * 1e3:.2f} ms: the same call on {len(shapes)} one-element tensors) "
          f"{8 * n / (med['pass1_reduce'] - host) / 1e9:6.1f} GB/s, "
          f"{(med['pass1_reduce'] - host) and med['torch_dot_flat'] / (med['pass1_reduce'] - host):.2f}x torch.dot's "
          "(an estimate: the two were not timed as a pair)")
    print(f"pass 2 (update, 28 B/elem)  {gb2:6.1f} GB/s")
    print(f"whole cpp step (36 B/elem)  {36 * n / med['cpp'] / 1e9:6.1f} GB/s;  AdamW(fused) (28 B/elem) {gba:6.1f} GB/s")


if __name__ == "__main__":
    main()
