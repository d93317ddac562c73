"""Edges where MGPO used to be silently wrong: vanishing gradients (the bounded perturbation), lr tensors, corrupt
checkpoints, foreign state entries, layouts the fused kernels refuse, duplicate parameters, functional calls, and
torch AdamW's defaults."""
from __future__ import annotations

import inspect
import io

import pytest
import torch

from mgpo_kernels import MGPO
from mgpo_kernels.functional import apply_perturbation, init_global_state, mgpo
from problems import Problem

SHAPES = [(1,), (7,), (16, 9), (3, 5)]


def _same_grads_run(opt_cls_kwargs, grads_seq, init):
    """Feed a fixed gradient sequence; returns theta (unperturbed) after it, and max |p| seen (perturbed too)."""
    params = [torch.nn.Parameter(t.clone()) for t in init]
    cls, kw = opt_cls_kwargs
    opt = cls(params, **kw)
    peak = 0.0
    for grads in grads_seq:
        if isinstance(opt, MGPO):
            opt.apply_perturbation()  # as a training forward would (no module here)
            peak = max(peak, max(float(p.detach().abs().max()) for p in params))
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        peak = max(peak, max(float(p.detach().abs().max()) for p in params))
    if isinstance(opt, MGPO):
        opt.eval()
    return [p.detach().clone() for p in params], peak


def _grads(n_real, n_zero, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = [[scale * torch.randn(s, generator=g) for s in SHAPES] for _ in range(n_real)]
    return real + [[torch.zeros(s) for s in SHAPES] for _ in range(n_zero)]


def _init(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]  # O(1) weights


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_zero_gradients_keep_the_weights_finite_and_theta_on_adamws_path(backend, rho):
    seq = _grads(5, 400)
    init = _init()
    theta, peak = _same_grads_run((MGPO, dict(lr=1e-3, rho=rho, backend=backend)), seq, init)
    want, _ = _same_grads_run((torch.optim.AdamW, dict(lr=1e-3)), seq, init)
    assert peak < 10.0 + rho * 10, peak  # |theta| ~ 1, ||eps|| <= rho / gbar_floor
    for a, b in zip(theta, want):
        assert float((a - b).abs().max()) <= 1e-5


def test_the_paper_formula_without_the_bound_is_still_available():
    seq = _grads(5, 150)
    init = _init()
    _, peak = _same_grads_run((MGPO, dict(lr=1e-3, rho=0.05, gbar_floor=None, backend="reference")), seq, init)
    assert peak > 100.0  # the unbounded formula: eps = rho m/|m|/gbar grows as gbar decays


@pytest.mark.parametrize("scale", [1e-15, 1e-20, 1e-30])
def test_tiny_gradients_keep_the_weights_finite_and_on_adamws_path(backend, scale):
    seq = _grads(20, 0, scale=scale)
    init = _init()
    theta, peak = _same_grads_run((MGPO, dict(lr=1e-3, rho=0.05, backend=backend)), seq, init)
    want, _ = _same_grads_run((torch.optim.AdamW, dict(lr=1e-3)), seq, init)
    assert peak < 10.0, peak
    for a, b in zip(theta, want):
        assert float((a - b).abs().max()) <= 1e-5


def test_bound_is_inactive_at_normal_gradient_scales(backend):
    """gbar >= gbar_floor: the default bound gives the paper's formula bit for bit."""
    seq = _grads(10, 0, scale=1.0)
    init = _init()
    a, _ = _same_grads_run((MGPO, dict(lr=1e-3, rho=0.05, backend=backend)), seq, init)
    b, _ = _same_grads_run((MGPO, dict(lr=1e-3, rho=0.05, gbar_floor=None, backend=backend)), seq, init)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_bound_limits_the_perturbation_norm(backend):
    params = [torch.nn.Parameter(t.clone()) for t in _init()]
    opt = MGPO(params, lr=1e-3, rho=0.05, gbar_floor=0.1, backend=backend)
    for g in _grads(3, 0, scale=1e-6):
        opt.apply_perturbation()
        for p, gr in zip(params, g):
            p.grad = gr.clone()
        opt.step()
    theta = [p.detach().clone() for p in params]
    opt.apply_perturbation()
    eps = torch.cat([(p.detach() - a).flatten() for a, p in zip(theta, params)])
    assert float(eps.norm()) == pytest.approx(0.05 / 0.1, rel=1e-3)


# ------------------------------------------------------------------------------------------ strict inputs
def _stepped(backend="reference"):
    prob = Problem()
    params = prob.params()
    opt = MGPO(params, lr=1e-2, rho=0.5, backend=backend)
    for _ in range(2):
        opt.zero_grad()
        opt.apply_perturbation()
        prob.loss(params).backward()
        opt.step()
    return prob, params, opt


def _unchanged(params, opt, before):
    ps, gs = before
    for a, b in zip(params, ps):
        assert torch.equal(a.detach(), b)
    for k, v in opt.global_state.items():
        assert torch.equal(v, gs[k]), k


def _before(params, opt):
    return [p.detach().clone() for p in params], opt.global_state


def test_lr_tensor_of_several_elements_is_refused_everywhere(backend):
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="lr"):
        MGPO([p], lr=torch.tensor([1e-3, 2e-3]), backend=backend)
    opt = MGPO([p], lr=1e-3, backend=backend)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "lr": torch.tensor([1e-3, 1e-3])})
    assert len(opt.param_groups) == 1
    prob, params, opt = _stepped(backend)
    opt.param_groups[0]["lr"] = torch.tensor([1e-3, 2e-3])
    before = _before(params, opt)
    opt.zero_grad()
    prob.loss(params).backward()
    with pytest.raises(ValueError, match="lr of param group 0"):
        opt.step()
    _unchanged(params, opt, before)


@pytest.mark.parametrize("key,value,match", [
    ("coef", float("nan"), "coef"), ("gbar", -5.0, "gbar"), ("step", 2.5, "step"),
    ("gbar", float("inf"), "gbar"), ("coef", torch.ones(2), "coef"),
])
def test_corrupt_global_scalars_are_refused_and_change_nothing(key, value, match):
    prob, params, opt = _stepped()
    sd = opt.state_dict()
    bad = dict(sd, mgpo={**sd["mgpo"], key: torch.as_tensor(value)})
    before = _before(params, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    _unchanged(params, opt, before)
    # the same through the per-parameter mirror a distributed checkpoint keeps
    mirror = {"state": {i: {**st, f"mgpo_{key}": torch.as_tensor(value)} for i, st in sd["state"].items()},
              "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(mirror)
    _unchanged(params, opt, before)


def test_non_dict_entries_in_state_are_tolerated_as_torch_does():
    prob, params, opt = _stepped()
    opt.state["note"] = 1  # torch's own hook tests put such entries there
    sd = opt.state_dict()
    assert sd["state"]["note"] == 1
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    opt.zero_grad()
    prob.loss(params).backward()
    opt.step()


def test_auto_falls_back_when_the_fused_kernels_refuse_a_layout():
    base = torch.randn(8, 6)
    view = torch.nn.Parameter(base[:, ::2])  # a non-dense view: shares storage with stride 2
    assert not view.is_contiguous()
    with pytest.warns(UserWarning, match="not dense"):
        opt = MGPO([view], lr=1e-2, rho=0.5)
    assert opt.backend != "cpp"
    ref_p = torch.nn.Parameter(view.detach().clone())
    ref = MGPO([ref_p], lr=1e-2, rho=0.5, backend="reference")
    for _ in range(3):
        g = torch.randn(view.shape)
        view.grad, ref_p.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(view.detach(), ref_p.detach(), rtol=1e-6, atol=1e-7)


def test_the_same_parameter_twice_in_a_group_is_refused(backend):
    p = torch.nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match="appears twice"):
        MGPO([p, p], backend=backend)
    q = torch.nn.Parameter(torch.randn(5))
    opt = MGPO([q], backend=backend)
    with pytest.raises(ValueError, match="appears twice"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1


def test_defaults_equal_torch_adamws():
    ours = inspect.signature(MGPO.__init__).parameters
    torchs = inspect.signature(torch.optim.AdamW.__init__).parameters
    for name in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                 "differentiable", "fused"):
        assert ours[name].default == torchs[name].default, name
    p = torch.nn.Parameter(torch.randn(3))
    assert MGPO([p]).defaults["weight_decay"] == torch.optim.AdamW([p]).defaults["weight_decay"]


# ------------------------------------------------------------------------------------------ functional
def test_functional_takes_every_group_in_one_call_and_matches_the_optimizer(backend):
    prob = Problem()
    pa, pb = prob.params(), prob.params()
    opt = MGPO([{"params": pa[:2], "lr": 1e-2}, {"params": pa[2:], "lr": 3e-3, "betas": (0.8, 0.99)}],
               rho=0.5, backend=backend)
    states = [dict(exp_avgs=[torch.zeros_like(p) for p in ps], exp_avg_sqs=[torch.zeros_like(p) for p in ps],
                   state_steps=[torch.zeros(()) for _ in ps]) for ps in (pb[:2], pb[2:])]
    gs = init_global_state("cpu")
    for _ in range(4):
        opt.zero_grad()
        opt.apply_perturbation()
        prob.loss(pa).backward()
        opt.step()
        for p in pb:
            p.grad = None
        held = [dict(params=pb[:2], exp_avgs=states[0]["exp_avgs"]), dict(params=pb[2:], exp_avgs=states[1]["exp_avgs"])]
        apply_perturbation(held, gs, backend=backend)  # theta at rest, by hand
        prob.loss(pb).backward()
        groups = [dict(params=pb[:2], grads=[p.grad for p in pb[:2]], lr=1e-2, **states[0]),
                  dict(params=pb[2:], grads=[p.grad for p in pb[2:]], lr=3e-3, betas=(0.8, 0.99), **states[1])]
        mgpo(groups, gs, rho=0.5, backend=backend, perturbed=True)
    for a, b in zip(pa, pb):
        assert torch.equal(a.detach(), b.detach())
    assert float(gs["step"]) == 4.0


def test_functional_refuses_the_per_group_call_shape():
    p = torch.randn(4)
    with pytest.raises(TypeError, match="param-group dicts"):
        mgpo([p], init_global_state("cpu"))  # a list of tensors, as torch's functional adamw takes
    with pytest.raises(TypeError, match="param-group dicts"):
        mgpo({"params": [p]}, init_global_state("cpu"))  # one group alone


def test_functional_auto_resolves_as_the_class_does():
    """One resolver: on a parameter the fused kernels refuse (not dense), backend="auto" picks the same backend for
    the functional form as for MGPO, with the same warning, instead of raising."""
    import warnings

    def strided():
        return torch.randn(8, 10)[:, ::2].requires_grad_(True)

    p = strided()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        opt = MGPO([p], lr=1e-2, rho=0.5)
    q = strided()
    st = dict(exp_avgs=[torch.zeros(8, 5)], exp_avg_sqs=[torch.zeros(8, 5)], state_steps=[torch.zeros(())])
    gs = init_global_state("cpu")
    from mgpo_kernels import functional as F

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        mgpo([dict(params=[q.detach()], grads=[torch.randn(8, 5)], lr=1e-2, **st)], gs, rho=0.5)
    assert F._INSTANCES[gs["step"]][1].name == opt.backend
    assert float(gs["step"]) == 1.0
