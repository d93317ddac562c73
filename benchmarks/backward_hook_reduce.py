"""Prototype: MGPO's pass 1 during the backward, in post-accumulate-grad hooks, against the fused step.

Without gradient accumulation a gradient is final when its ``register_post_accumulate_grad_hook`` fires, and
still in cache: the hook runs pass 1 on that one tensor (the extension's ``reduce_sums`` on a one-tensor step plan)
and keeps its four float64 sums; the step then adds them in a fixed order and runs only the scalar stage and
pass 2 (``finish_step``). The fused step (``step``) reads g and m once more in pass 1.

Both variants run the extension's ops on the same step plan (mgpo_kernels/backends/plan.py) and their own state,
on a stack of LoRA linears (frozen base weights, trainable A and B), and are timed paired and interleaved:
forward + backward + step of one iteration, and the backward and the step alone. The parameters of the two
variants are compared after each of 6 iterations in lockstep before the timing (they must agree to float32
rounding: the sums differ only in the order of float64 additions); the timed step of the hooks variant reuses
the partials of its last backward.

    .venv/bin/python benchmarks/backward_hook_reduce.py [--layers 4] [--hidden 1024] [--rank 8] [--tokens 64]
"""
from __future__ import annotations

import argparse

import torch

import mgpo_kernels.backends.cpp  # noqa: F401  (loads torch.ops.mgpo.*)
from mgpo_kernels.backends.base import GlobalState, GroupTensors, StepConfig
from mgpo_kernels.backends.plan import PlanCache
from mgpo_kernels.bench.common import machine_line
from mgpo_kernels.bench.timing import paired_quantiles, percentile, time_interleaved


class LoraStack(torch.nn.Module):
    """``layers`` blocks of LLaMA's seven projections at ``hidden`` (MLP 2.6875x), each W x + B A x."""

    def __init__(self, layers: int, hidden: int, rank: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        mlp = int(hidden * 2.6875)
        shapes = [(hidden, hidden)] * 4 + [(mlp, hidden), (mlp, hidden), (hidden, mlp)]
        self.base, self.a, self.b = [], torch.nn.ParameterList(), torch.nn.ParameterList()
        for _ in range(layers):
            for out_f, in_f in shapes:
                self.base.append(torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5)
                self.a.append(torch.nn.Parameter(torch.randn(rank, in_f, generator=gen) / in_f ** 0.5))
                self.b.append(torch.nn.Parameter(torch.randn(out_f, rank, generator=gen) * 1e-2))

    def forward(self, x):
        h = x
        for i in range(0, len(self.base), 7):
            q, k, v = (self._lin(i + j, h) for j in range(3))
            attn = torch.softmax(q @ k.T / q.shape[-1] ** 0.5, dim=-1) @ v
            h = h + self._lin(i + 3, attn)
            mid = torch.nn.functional.silu(self._lin(i + 4, h)) * self._lin(i + 5, h)
            h = h + self._lin(i + 6, mid)
        return h.square().mean()

    def _lin(self, i, x):
        return x @ self.base[i].T + (x @ self.a[i].T) @ self.b[i].T


class Variant:
    """One optimizer over the stack's LoRA tensors, driving the extension's ops directly on its own state."""

    def __init__(self, model: LoraStack, hooks: bool, rho: float = 0.05):
        self.params = list(model.a) + list(model.b)
        z = torch.zeros_like
        self.ms = [z(p) for p in self.params]
        self.vs = [z(p) for p in self.params]
        self.steps = [torch.zeros(()) for _ in self.params]
        self.gstate = GlobalState.zeros(torch.device("cpu"))
        self.cfg = StepConfig(rho=rho, ema_beta=0.9, adaptive_norm=True, sign=1.0, max_grad_norm=None,
                              perturbed=True, gbar_floor=0.1)
        self.plans = PlanCache()
        self.hooks = hooks
        self.partials = torch.zeros(len(self.params), 4, dtype=torch.float64)
        if hooks:
            self.index = {id(p): i for i, p in enumerate(self.params)}
            self.one = [PlanCache() for _ in self.params]
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._reduce_one)

    def _group(self, idx):
        ps = [self.params[i] for i in idx]
        return GroupTensors(ps, [p.grad for p in ps], [self.ms[i] for i in idx], [self.vs[i] for i in idx],
                            [None] * len(idx), [self.steps[i] for i in idx], 1e-3, 0.9, 0.999, 1e-8, 0.0)

    def _reduce_one(self, p):
        i = self.index[id(p)]
        plan = self.one[i].build([self._group([i])], self.gstate, self.cfg)
        self.partials[i] = torch.ops.mgpo.reduce_sums(*plan)

    def step(self):
        plan = self.plans.build([self._group(range(len(self.params)))], self.gstate, self.cfg)
        if self.hooks:
            sums = self.partials.sum(0)  # fixed order: the same shape and thread count every step
            torch.ops.mgpo.finish_step(*plan, sums)
        else:
            torch.ops.mgpo.step(*plan)
        for p in self.params:
            p.grad = None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {k: LoraStack(args.layers, args.hidden, args.rank, seed=0) for k in ("fused", "hooks")}
    opts = {k: Variant(m, hooks=(k == "hooks")) for k, m in models.items()}
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(1))
    n = sum(p.numel() for p in opts["fused"].params)
    print(machine_line())
    print(f"LoRA stack: {args.layers} layers x 7 projections at hidden {args.hidden}, r={args.rank}: "
          f"{len(opts['fused'].params)} tensors, {n:,} trainable fp32 params; {args.tokens} tokens; "
          f"{torch.get_num_threads()} threads")

    worst = 0.0

    def iteration(k):
        def run():
            models[k](x).backward()
            opts[k].step()
        return run

    def compare():
        nonlocal worst
        for pa, pb in zip(opts["fused"].params, opts["hooks"].params):
            d = float(((pa - pb).abs().max() / pb.abs().max().clamp_min(1e-30)).detach())
            worst = max(worst, d)

    for _ in range(6):  # same inputs, same order: the two variants must stay together
        iteration("fused")()
        iteration("hooks")()
        compare()
    print(f"6 iterations in lockstep: largest relative difference of the parameters, hooks vs fused: {worst:.2e}")

    def backward_only(k):
        def run():
            models[k](x).backward()
            for p in opts[k].params:
                p.grad = None
        return run

    models["fused"](x).backward()
    grads = [p.grad.clone() for p in opts["fused"].params]
    for p in opts["fused"].params:
        p.grad = None

    def step_only(k):
        return opts[k].step  # the hooks variant: the partials its last backward left

    def fresh_grads(k):
        if k.startswith("step_"):
            for p, g in zip(opts[k[5:]].params, grads):
                p.grad = g.clone()

    contenders = {"iter_fused": iteration("fused"), "iter_hooks": iteration("hooks"),
                  "backward_plain": backward_only("fused"), "backward_hooks": backward_only("hooks"),
                  "step_fused": step_only("fused"), "step_hooks": step_only("hooks")}
    times = time_interleaved(contenders, args.reps, warmup_rounds=2, order="rotate", before=fresh_grads)
    med = {k: percentile(v, 50) for k, v in times.items()}
    print(f"\nmedians over {args.reps} interleaved repetitions:")
    for k, v in med.items():
        print(f"  {k:16s} {v * 1e3:9.2f} ms")
    for num, den in (("iter_hooks", "iter_fused"), ("backward_hooks", "backward_plain"),
                     ("step_hooks", "step_fused")):
        q = paired_quantiles(times[num], times[den])
        print(f"  {num:14s} / {den:14s}: paired median {q['median']:.3f} (p20 {q['p20']:.3f}, p80 {q['p80']:.3f})")



if __name__ == "__main__":
    main()
