"""Every backend against the independent float64 implementation of the paper's equations, and rho=0 against
torch.optim.AdamW, on a smooth non-quadratic loss over ragged shapes."""
from __future__ import annotations

import pytest
import torch

from f64_reference import F64MGPO
from mgpo_kernels import MGPO
from problems import Problem, rel_err

STEPS = 40

CASES = {
    "defaults": dict(lr=1e-2, rho=0.05),
    "large_rho": dict(lr=1e-2, rho=20.0),
    "weight_decay": dict(lr=1e-2, rho=0.3, weight_decay=0.1),
    "no_adaptive_norm": dict(lr=1e-2, rho=0.05, adaptive_norm=False),
    "minus_momentum": dict(lr=1e-2, rho=0.3, direction="-momentum"),
    "max_grad_norm": dict(lr=1e-2, rho=0.3, max_grad_norm=1.0),
    "nlg_defaults": dict(lr=1e-2, rho=0.01, ema_beta=0.8, betas=(0.8, 0.999)),
}


def _run(backend, kw, steps=STEPS, dtype=torch.float32, active_fn=None, rho_fn=None, shapes=None):
    prob = Problem() if shapes is None else Problem(shapes)
    params = prob.params(dtype)
    opt = MGPO(params, backend=backend, **kw)
    ref = F64MGPO(prob.init, **kw)
    for t in range(steps):
        active = active_fn(t) if active_fn else None
        if rho_fn is not None:
            opt.rho = ref.rho = rho_fn(t)
        opt.zero_grad(set_to_none=True)
        opt.apply_perturbation()  # a raw-tensor loop applies eps itself (no nn.Module call)
        prob.loss(params, active).backward()
        opt.step()
        ref.step(prob.grads_at(ref.perturbed(), active))
    return prob, params, opt, ref


def _check(params, opt, ref, tol):
    assert not opt.perturbation_applied
    for p, want in zip(params, ref.theta):
        assert rel_err(p.detach(), want) < tol, "parameters at rest differ from theta"
    opt.apply_perturbation()
    for p, want in zip(params, ref.perturbed()):
        assert rel_err(p.detach(), want) < tol, "perturbed parameters differ from theta + eps"
    opt.eval()
    for p, want in zip(params, ref.theta):
        assert rel_err(p.detach(), want) < tol, "restored parameters differ from theta"
    opt.train()


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(backend, case):
    _, params, opt, ref = _run(backend, CASES[case])
    assert opt.skipped_steps == 0
    _check(params, opt, ref, 2e-4)
    # the test must be able to fail: the perturbation is not negligible against the tolerance
    if case == "large_rho":
        pert = max(rel_err(a, b) for a, b in zip(ref.perturbed(), ref.theta))
        assert pert > 10 * 2e-4


def test_rho_changed_mid_run(backend):
    _, params, opt, ref = _run(backend, dict(lr=1e-2, rho=0.3), rho_fn=lambda t: 0.3 if t < 15 else (0.0 if t < 25 else 0.6))
    _check(params, opt, ref, 2e-4)


def test_parameter_without_grad_in_some_steps(backend):
    # tensor 2 gets no gradient on odd steps; tensor 4 none before step 10 (its state is created late)
    def active(t):
        return [True, True, t % 2 == 0, True, t >= 10]

    _, params, opt, ref = _run(backend, dict(lr=1e-2, rho=0.3), active_fn=active)
    _check(params, opt, ref, 2e-4)


def test_param_groups_with_different_hyperparameters(backend):
    prob = Problem()
    params = prob.params()
    groups = [
        {"params": params[:2], "lr": 2e-2, "betas": (0.8, 0.99)},
        {"params": params[2:], "lr": 5e-3, "weight_decay": 0.05},
    ]
    opt = MGPO(groups, lr=1e-2, rho=0.2, backend=backend)
    # the float64 side: two optimizers would split the global norms, so run per-group math by hand
    ref_a = F64MGPO(prob.init, lr=2e-2, betas=(0.8, 0.99), rho=0.2)
    ref_b = F64MGPO(prob.init, lr=5e-3, weight_decay=0.05, rho=0.2)
    # combine: one F64MGPO whose per-tensor hyper-parameters come from the groups
    ref = _GroupedF64([ref_a, ref_b], [0, 0, 1, 1, 1])
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        opt.apply_perturbation()
        prob.loss(params).backward()
        opt.step()
        ref.step(prob.grads_at(ref.perturbed()))
    _check(params, opt, ref, 2e-4)


class _GroupedF64:
    """Float64 MGPO over several param groups: per-group AdamW, global norms (written out, not reused)."""

    def __init__(self, refs, group_of):
        import math

        self.math = math
        self.refs, self.group_of = refs, group_of
        base = refs[0]
        self.theta = [t.clone() for t in base.theta]
        self.m = [None] * len(self.theta)
        self.v = [None] * len(self.theta)
        self.k = [0] * len(self.theta)
        self.pert = [torch.zeros_like(t) for t in self.theta]
        self.gbar, self.t = 0.0, 0

    def perturbed(self):
        return [a + b for a, b in zip(self.theta, self.pert)]

    def step(self, grads):
        math = self.math
        n = math.sqrt(sum(float((g * g).sum()) for g in grads))
        r0 = self.refs[0]
        self.gbar = n if self.t == 0 else r0.ema_beta * self.gbar + (1 - r0.ema_beta) * n
        self.t += 1
        for i, g in enumerate(grads):
            r = self.refs[self.group_of[i]]
            b1, b2 = r.betas
            if self.m[i] is None:
                self.m[i], self.v[i] = torch.zeros_like(g), torch.zeros_like(g)
            self.k[i] += 1
            th = self.theta[i] * (1 - r.lr * r.wd)
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            self.theta[i] = th - r.lr * (self.m[i] / (1 - b1 ** self.k[i])) / (
                (self.v[i] / (1 - b2 ** self.k[i])).sqrt() + r.eps_adam)
        mn = math.sqrt(sum(float((m * m).sum()) for m in self.m))
        self.pert = [r0.rho * m / (mn * self.gbar) for m in self.m]


def test_bf16_and_fp16_params(backend):
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        _, params, opt, ref = _run(backend, dict(lr=1e-2, rho=0.3), dtype=dtype, steps=30)
        masters = [opt.state[p]["master_param"] for p in params]
        for mst, want in zip(masters, ref.theta):
            assert mst.dtype == torch.float32
            assert rel_err(mst, want) < tol
        # at rest the parameter holds its master rounded; with eps applied, the rounded master + eps
        for p, mst in zip(params, masters):
            torch.testing.assert_close(p.detach(), mst.to(dtype), rtol=0, atol=0)
        coef = opt.state_dict()["mgpo"]["coef"]
        opt.apply_perturbation()
        for p, mst in zip(params, masters):
            m = opt.state[p]["exp_avg"]
            torch.testing.assert_close(p.detach(), (mst + coef * m).to(dtype), rtol=0, atol=0)
        opt.eval()
        for p, mst in zip(params, masters):
            torch.testing.assert_close(p.detach(), mst.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_rho_zero_is_adamw(backend, wd):
    prob = Problem()
    p_a, p_b = prob.params(), prob.params()
    opt_a = MGPO(p_a, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd, rho=0.0, backend=backend)
    opt_b = torch.optim.AdamW(p_b, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd)
    for _ in range(30):
        for opt, ps in ((opt_a, p_a), (opt_b, p_b)):
            opt.zero_grad()
            prob.loss(ps).backward()
            opt.step()
    for a, b in zip(p_a, p_b):
        assert rel_err(a.detach(), b.detach()) < 1e-6
    for a, b in zip(p_a, p_b):
        assert rel_err(opt_a.state[a]["exp_avg"], opt_b.state[b]["exp_avg"]) < 1e-6
        assert rel_err(opt_a.state[a]["exp_avg_sq"], opt_b.state[b]["exp_avg_sq"]) < 1e-6


@pytest.mark.parametrize("adaptive", [True, False])
def test_perturbation_norm_is_rho_over_gbar(backend, adaptive):
    prob = Problem()
    params = prob.params()
    opt = MGPO(params, lr=1e-2, rho=0.2, adaptive_norm=adaptive, backend=backend)
    for _ in range(5):
        opt.zero_grad()
        opt.apply_perturbation()
        prob.loss(params).backward()
        opt.step()
        theta = [p.detach().clone() for p in params]  # at rest
        opt.apply_perturbation()  # what the next training forward does
        pert = [p.detach().clone() for p in params]
        opt.eval()
        opt.train()
        norm = torch.sqrt(sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(pert, theta)))
        gbar = float(opt.state_dict()["mgpo"]["gbar"])
        want = 0.2 / gbar if adaptive else 0.2
        assert abs(float(norm) - want) / want < 1e-4
        # direction: along +m
        m = torch.cat([opt.state[p]["exp_avg"].flatten() for p in params]).double()
        d = torch.cat([(a.double() - b.double()).flatten() for a, b in zip(pert, theta)])
        assert float(torch.nn.functional.cosine_similarity(m, d, dim=0)) > 0.999


@pytest.mark.parametrize("lr_tensor", [False, True])
def test_first_updates_match_adamw_tightly(backend, lr_tensor):
    """The update itself (not only the parameters) matches torch.optim.AdamW: bias corrections in float64 as
    torch computes them (in fp32, 1 - 0.999^1 is off by 1.3e-5 relative)."""
    # parameters of the update's own size, so that fp32 rounding of p does not hide a wrong update
    init = [1e-3 * torch.randn(s) for s in ((8, 300), (17,), (3, 5, 7))]
    p_a = [torch.nn.Parameter(t.clone()) for t in init]
    p_b = [torch.nn.Parameter(t.clone()) for t in init]
    lr = torch.tensor(1e-3) if lr_tensor else 1e-3
    opt_a = MGPO(p_a, lr=lr, betas=(0.9, 0.999), weight_decay=0.1, rho=0.0, backend=backend)
    opt_b = torch.optim.AdamW(p_b, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1)
    for _ in range(3):
        before = [p.detach().clone() for p in p_a]
        grads = [torch.randn_like(p) for p in p_a]
        for opt, ps in ((opt_a, p_a), (opt_b, p_b)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        for a, b, p0 in zip(p_a, p_b, before):
            assert rel_err(a.detach() - p0, b.detach() - p0) < 1e-6
