"""Pure PyTorch MGPO: the fallback everywhere and the yardstick for every kernel.

Same data path as the fused backends (reduce -> scalar stage -> update), written for clarity, not speed:
fp32 math, per-tensor ops, temporaries allowed.  No host synchronisation: every decision (skip, t=1, zero norm)
is a ``torch.where`` on device tensors.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .base import SUMS_PER_GROUP, Backend, GlobalState, GroupTensors, StepConfig


def reduce_sums(groups: List[GroupTensors], device: torch.device) -> Tensor:
    """The global sums of base.SUMS_PER_GROUP layout, float64."""
    rows = []
    for g in groups:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        s_gg, s_mg, s_mm, s_mm_ng = zero, zero, zero, zero
        for grad, m in zip(g.grads, g.exp_avgs):
            if grad is None:
                s_mm_ng = s_mm_ng + m.double().square().sum()
            else:
                gd = grad.double()
                md = m.double()
                s_gg = s_gg + gd.square().sum()
                s_mg = s_mg + (md * gd).sum()
                s_mm = s_mm + md.square().sum()
        rows.append(torch.stack([s_gg, s_mg, s_mm, s_mm_ng]))
    if not rows:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.cat(rows)


def scalar_stage(sums: Tensor, beta1s: List[float], gstate: GlobalState, cfg: StepConfig):
    """From the global sums to (c, skip, gbar_new, coef_new), all 0-d device tensors.

    c is the factor that turns a raw gradient into g_t (unscale, then clip); skip is a bool tensor.
    """
    s = sums.view(-1, SUMS_PER_GROUP)
    s_gg = s[:, 0].sum()
    inv_scale = torch.ones((), dtype=torch.float64, device=sums.device)
    if cfg.grad_scale is not None:
        inv_scale = 1.0 / cfg.grad_scale.double().to(sums.device)
    raw_norm = s_gg.sqrt() * inv_scale  # ||g|| after unscaling, before clipping
    clip = torch.ones_like(raw_norm)
    if cfg.max_grad_norm is not None:
        # torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1 (in fp32).
        clip = (cfg.max_grad_norm / (raw_norm.float() + 1e-6)).clamp(max=1.0).double()
    c = inv_scale * clip
    n_t = raw_norm * clip
    skip = ~torch.isfinite(s_gg)
    if cfg.found_inf is not None:
        skip = skip | (cfg.found_inf.to(sums.device) > 0)

    first = gstate.step == 0
    gbar_old = gstate.gbar.double()
    gbar_new = torch.where(first, n_t, cfg.ema_beta * gbar_old + (1.0 - cfg.ema_beta) * n_t)

    mm = torch.zeros((), dtype=torch.float64, device=sums.device)
    for k, b1 in enumerate(beta1s):
        gg, mg, m_g, m_ng = s[k, 0], s[k, 1], s[k, 2], s[k, 3]
        mm = mm + b1 * b1 * m_g + 2.0 * b1 * (1.0 - b1) * c * mg + (1.0 - b1) ** 2 * c * c * gg + m_ng
    m_norm = mm.clamp(min=0.0).sqrt()
    # the bound on the perturbation (base.StepConfig.gbar_floor), the only place it lives
    gbar_eff = gbar_new.clamp(min=cfg.gbar_floor) if cfg.gbar_floor else gbar_new
    denom = m_norm * gbar_eff if cfg.adaptive_norm else m_norm
    coef_new = cfg.sign * cfg.rho / denom
    ok = torch.isfinite(coef_new) & (denom > 0)
    coef_new = torch.where(ok, coef_new, torch.zeros_like(coef_new))
    return c.float(), skip, gbar_new.float(), coef_new.float()


def _keep(skip: Tensor, old: Tensor, new: Tensor) -> Tensor:
    return torch.where(skip, old, new)


class ReferenceBackend(Backend):
    name = "reference"

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        return None

    @classmethod
    def priority(cls, device: torch.device) -> int:
        return 0

    @torch.no_grad()
    def step(self, groups: List[GroupTensors], gstate: GlobalState, cfg: StepConfig) -> None:
        device = gstate.step.device
        sums = reduce_sums(groups, device)
        if cfg.reduce_hook is not None:
            cfg.reduce_hook(sums)
        c, skip, gbar_new, coef_new = scalar_stage(sums, [g.beta1 for g in groups], gstate, cfg)
        # theta at rest: remove the eps a training forward applied (coef_old * m), write theta_{t+1}, apply none
        coef_old = gstate.coef
        restore = coef_old if cfg.perturbed else torch.zeros_like(coef_old)

        for g in groups:
            # no torch.tensor(python value) here: a host->device copy would break CUDA-graph capture
            # a one-element lr of any shape ([1], [1, 1]) as a 0-d scalar: broadcasting its shape would fail half-way
            lr = (g.lr.detach().reshape(()).float().to(device) if isinstance(g.lr, Tensor)
                  else torch.full((), g.lr, device=device))
            # AdamW's scalars as torch.optim.AdamW computes them: float64, rounded to fp32 once where used
            lr64 = lr.double()
            decay = (1.0 - lr64 * g.weight_decay).float()
            for i, p in enumerate(g.params):
                grad, m, v, master, step_t = g.grads[i], g.exp_avgs[i], g.exp_avg_sqs[i], g.masters[i], g.steps[i]
                theta = master.clone() if master is not None else p.float() - restore * m
                if grad is None:
                    m_new, v_new, step_new = m, v, step_t
                    theta_new = theta
                else:
                    gt = grad.float() * c
                    step_new = step_t + 1
                    theta_new = theta * decay
                    m_new = m * g.beta1 + gt * (1.0 - g.beta1)
                    v_new = v * g.beta2 + gt * gt * (1.0 - g.beta2)
                    bc1 = 1.0 - torch.pow(g.beta1, step_new.double())
                    bc2 = 1.0 - torch.pow(g.beta2, step_new.double())
                    step_size = (lr64 / bc1).float()
                    denom = v_new.sqrt() / bc2.sqrt().float() + g.eps
                    theta_new = theta_new - step_size * m_new / denom
                # a skipped step changes nothing but still removes eps: p = theta_t
                p.copy_(_keep(skip, theta.to(p.dtype), theta_new.to(p.dtype)))
                if master is not None:
                    master.copy_(_keep(skip, master, theta_new))
                if grad is not None:
                    m.copy_(_keep(skip, m, m_new))
                    v.copy_(_keep(skip, v, v_new))
                    step_t.copy_(_keep(skip, step_t, step_new))

        gstate.gbar.copy_(_keep(skip, gstate.gbar, gbar_new))
        gstate.coef.copy_(_keep(skip, gstate.coef, coef_new))
        gstate.step.add_((~skip).float())
        gstate.skipped.add_(skip.long())


BACKEND = ReferenceBackend
