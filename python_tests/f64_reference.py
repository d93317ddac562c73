"""An independent float64 implementation of MGPO, written from the equations (paper Eqs. 2-6).

It shares no code with mgpo_kernels and keeps the perturbation eps as explicit tensors (the package keeps only
the coefficient), so agreement between the two checks the coefficient bookkeeping too.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch


class F64MGPO:
    def __init__(self, thetas: List[torch.Tensor], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 rho=0.05, ema_beta=0.9, adaptive_norm=True, direction="momentum", max_grad_norm=None,
                 gbar_floor=0.1, group_of: Optional[List[int]] = None, group_lrs: Optional[List[float]] = None):
        self.theta = [t.detach().double().clone() for t in thetas]
        self.lr, self.betas, self.eps_adam, self.wd = lr, betas, eps, weight_decay
        self.rho, self.ema_beta, self.adaptive, self.max_grad_norm = rho, ema_beta, adaptive_norm, max_grad_norm
        self.gbar_floor = gbar_floor or 0.0  # the bound on the perturbation: 1/gbar uses max(gbar, gbar_floor)
        self.sign = {"momentum": 1.0, "-momentum": -1.0}[direction]
        self.group_of = group_of or [0] * len(thetas)
        self.group_lrs = group_lrs
        self.m: List[Optional[torch.Tensor]] = [None] * len(thetas)
        self.v: List[Optional[torch.Tensor]] = [None] * len(thetas)
        self.k = [0] * len(thetas)  # per-parameter AdamW step
        self.pert = [torch.zeros_like(t) for t in self.theta]
        self.gbar = 0.0
        self.t = 0
        self.skipped = 0

    def perturbed(self) -> List[torch.Tensor]:
        return [th + e for th, e in zip(self.theta, self.pert)]

    def step(self, grads: List[Optional[torch.Tensor]]) -> None:
        gs = [None if g is None else g.double() for g in grads]
        n = math.sqrt(sum(float((g * g).sum()) for g in gs if g is not None))
        if not math.isfinite(n):
            self.skipped += 1
            return
        if self.max_grad_norm is not None:
            clip = min(1.0, self.max_grad_norm / (n + 1e-6))
            gs = [None if g is None else g * clip for g in gs]
            n = n * clip
        self.gbar = n if self.t == 0 else self.ema_beta * self.gbar + (1 - self.ema_beta) * n
        self.t += 1
        b1, b2 = self.betas
        for i, g in enumerate(gs):
            if g is None:
                continue
            lr = self.lr if self.group_lrs is None else self.group_lrs[self.group_of[i]]
            if self.m[i] is None:
                self.m[i] = torch.zeros_like(self.theta[i])
                self.v[i] = torch.zeros_like(self.theta[i])
            self.k[i] += 1
            th = self.theta[i] * (1 - lr * self.wd)
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            mhat = self.m[i] / (1 - b1 ** self.k[i])
            vhat = self.v[i] / (1 - b2 ** self.k[i])
            self.theta[i] = th - lr * mhat / (vhat.sqrt() + self.eps_adam)
        mnorm = math.sqrt(sum(float((m * m).sum()) for m in self.m if m is not None))
        scale = mnorm * (max(self.gbar, self.gbar_floor) if self.adaptive else 1.0)
        for i, m in enumerate(self.m):
            if m is None or scale == 0 or not math.isfinite(scale):
                self.pert[i] = torch.zeros_like(self.theta[i])
            else:
                self.pert[i] = self.sign * self.rho * m / scale
