"""Checkpoints that continue the uninterrupted run in either order of the loads (theta at rest: the model holds
theta between steps), the mode and options kept in param_groups, and the eval-mode step warning."""
from __future__ import annotations

import io
import warnings

import pytest
import torch

from mgpo_kernels import MGPO
from problems import Problem, rel_err

STEPS, SPLIT = 8, 4


def _run(opt, params, prob, steps):
    """A raw-tensor loop: it applies eps itself before the forward (no nn.Module call)."""
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        if isinstance(opt, MGPO):
            opt.apply_perturbation()
        prob.loss(params).backward()
        opt.step()


def _theta(opt, params):
    with opt.unperturbed():
        return [p.detach().clone() for p in params]


def _moments(opt, params):
    return [opt.state[p]["exp_avg"].clone() for p in params] + [opt.state[p]["exp_avg_sq"].clone() for p in params]


def _compare(a, b, tol=1e-6):
    for x, y in zip(a, b):
        assert rel_err(x, y) <= tol, rel_err(x, y)


def _uninterrupted(prob, backend, dtype, **kw):
    params = prob.params(dtype)
    opt = MGPO(params, backend=backend, **kw)
    _run(opt, params, prob, STEPS)
    return opt, params


KW = dict(lr=1e-2, rho=0.5, weight_decay=0.01)


def _trained(steps):
    prob = Problem()
    params = prob.params()
    opt = MGPO(params, **KW)
    _run(opt, params, prob, steps)
    return prob, params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("order", ["weights_first", "optimizer_first"])
@pytest.mark.parametrize("save_mode", ["train", "eval"])
def test_resume_from_any_checkpoint_order_equals_the_uninterrupted_run(backend, dtype, order, save_mode):
    """Model weights (theta at rest) and the optimizer state, saved in train or eval mode, loaded into fresh
    objects in either order: the run continues as if never interrupted."""
    prob = Problem()
    ref_opt, ref_params = _uninterrupted(prob, backend, dtype, **KW)

    params = prob.params(dtype)
    opt = MGPO(params, backend=backend, **KW)
    _run(opt, params, prob, SPLIT)
    model = [p.detach().clone() for p in params]
    if save_mode == "eval":
        opt.eval()
    buf = io.BytesIO()
    torch.save({"model": model, "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)

    params2 = prob.params(dtype)
    opt2 = MGPO(params2, backend=backend, **KW)

    def load_weights():
        with torch.no_grad():
            for p, v in zip(params2, ck["model"]):
                p.copy_(v)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if order == "weights_first":
            load_weights()
        opt2.load_state_dict(ck["opt"])
        if order == "optimizer_first":
            load_weights()
    assert opt2.training
    _run(opt2, params2, prob, STEPS - SPLIT)
    tol = 1e-6 if dtype == torch.float32 else 0.0
    _compare([p.detach() for p in params2], [p.detach() for p in ref_params], tol)
    _compare(_moments(opt2, params2), _moments(ref_opt, ref_params), tol)
    if dtype != torch.float32:
        _compare([opt2.state[p]["master_param"] for p in params2],
                 [ref_opt.state[p]["master_param"] for p in ref_params], tol)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_load_of_own_state_dict_is_the_identity(backend, mode):
    prob = Problem()
    params = prob.params()
    opt = MGPO(params, backend=backend, **KW)
    _run(opt, params, prob, 3)
    if mode == "eval":
        opt.eval()
    before = [p.detach().clone() for p in params]
    opt.load_state_dict(opt.state_dict())
    for a, b in zip(params, before):
        assert torch.equal(a.detach(), b)
    assert opt.training == (mode == "train")
    opt.train()  # and the run goes on as without the round trip
    _run(opt, params, prob, 1)
    prob2 = Problem()
    ref = prob2.params()
    ref_opt = MGPO(ref, backend=backend, **KW)
    _run(ref_opt, ref, prob2, 4)
    for a, b in zip(params, ref):
        assert torch.equal(a.detach(), b.detach())


def test_load_keeps_the_optimizers_mode_whatever_the_checkpoints():
    prob, params, opt = _trained(3)
    sd_train = opt.state_dict()
    theta = _theta(opt, params)
    opt2 = MGPO(prob.params(), **KW).eval()
    with torch.no_grad():
        for p, q in zip(opt2.param_groups[0]["params"], params):
            p.copy_(q)  # theta
    opt2.load_state_dict(sd_train)
    assert not opt2.training
    assert all(g["perturbed"] is False for g in opt2.param_groups)
    for p, t in zip(opt2.param_groups[0]["params"], theta):
        assert torch.equal(p.detach(), t)


def test_other_weights_are_kept_as_theta():
    """An optimizer state loaded into a model holding other weights: the weights are theta (nothing written),
    and the next forward perturbs them by the loaded eps."""
    prob, params, opt = _trained(3)
    sd = opt.state_dict()
    other = [torch.nn.Parameter(torch.randn_like(p)) for p in params]
    opt2 = MGPO(other, **KW)
    start = [p.detach().clone() for p in other]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(sd)
    for p, s0 in zip(other, start):
        assert torch.equal(p.detach(), s0)
    opt2.apply_perturbation()
    coef = opt2.global_state["coef"]
    assert float(coef) != 0.0
    for p, s0 in zip(other, start):
        assert torch.equal(p.detach(), s0 + coef * opt2.state[p]["exp_avg"])


def test_state_dict_loads_with_weights_only_and_old_style_options_still_load():
    prob = Problem()
    params = prob.params()
    opt = MGPO(params, **KW)
    _run(opt, params, prob, 2)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        assert g["rho"] == 0.5 and g["perturbed"] is True
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
    # a file of the earlier format: options under "mgpo", none in the groups
    old = {"state": sd["state"], "param_groups": [{k: v for k, v in g.items() if k not in
                                                   ("rho", "ema_beta", "adaptive_norm", "direction",
                                                    "max_grad_norm", "gbar_floor", "perturbed")}
                                                  for g in sd["param_groups"]],
           "mgpo": {**sd["mgpo"], "rho": 0.25}}
    opt2 = MGPO([torch.nn.Parameter(p.detach().clone()) for p in params], rho=0.05)
    opt2.load_state_dict(old)
    assert opt2.rho == 0.25 and opt2.param_groups[0]["gbar_floor"] == 0.1


def test_torch_adamw_state_dict_loads():
    prob = Problem()
    pa = prob.params()
    adamw = torch.optim.AdamW(pa, lr=1e-2)
    _run(adamw, pa, prob, 3)
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    opt = MGPO(pb, lr=1e-2, rho=0.0)
    opt.load_state_dict(adamw.state_dict())
    _run(adamw, pa, prob, 3)
    _run(opt, pb, prob, 3)
    _compare([p.detach() for p in pb], [p.detach() for p in pa], 1e-6)


# ------------------------------------------------------------------------------------------ options and mode
def test_options_live_in_param_groups_and_reach_the_step(backend):
    prob = Problem()
    pa, pb = prob.params(), prob.params()
    oa = MGPO(pa, backend=backend, lr=1e-2, rho=0.05)
    ob = MGPO(pb, backend=backend, lr=1e-2, rho=0.7)
    for g in oa.param_groups:
        g["rho"] = 0.7  # what a scheduler, or a wrapper that forwards param_groups, does
    assert oa.rho == 0.7
    _run(oa, pa, prob, 3)
    _run(ob, pb, prob, 3)
    for a, b in zip(pa, pb):
        assert torch.equal(a.detach(), b.detach())
    oa.rho = 0.1  # the property sets every group
    assert all(g["rho"] == 0.1 for g in oa.param_groups)
    with pytest.raises(ValueError, match="rho"):
        oa.rho = -1.0


def test_options_that_differ_between_groups_are_refused_before_anything_changes():
    prob = Problem()
    params = prob.params()
    opt = MGPO([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2)
    _run(opt, params, prob, 1)
    opt.param_groups[1]["rho"] = 0.3
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    prob.loss(params).backward()
    with pytest.raises(ValueError, match="options are global"):
        opt.step()
    for a, b in zip(params, before):
        assert torch.equal(a.detach(), b)
    opt.param_groups[1]["rho"] = "big"
    opt.param_groups[0]["rho"] = "big"
    with pytest.raises(ValueError, match="Invalid rho"):
        opt.step()


def test_mode_lives_in_param_groups_so_a_dict_copying_wrapper_cannot_leave_it_stale():
    """Lightning's LightningOptimizer copies the optimizer's __dict__ into a dynamic subclass; a mode kept as an
    attribute went stale when eval() was called on the wrapper."""
    prob = Problem()
    params = prob.params()
    opt = MGPO(params, **KW)
    _run(opt, params, prob, 2)
    theta = _theta(opt, params)
    wrapper = object.__new__(type("Wrapped" + type(opt).__name__, (type(opt),), {}))
    wrapper.__dict__ = dict(opt.__dict__)
    wrapper.eval()
    assert not opt.training
    for p, t in zip(params, theta):
        assert torch.equal(p.detach(), t)
    with opt.unperturbed():  # stays at theta, previous mode (eval) after
        pass
    assert not opt.training
    wrapper.rho = 0.9
    assert opt.rho == 0.9


def test_add_param_group_takes_the_current_mode_and_options():
    prob = Problem()
    params = prob.params()
    opt = MGPO([params[0]], rho=0.05)
    opt.rho = 0.3
    opt.eval()
    opt.add_param_group({"params": [params[1]]})
    assert opt.param_groups[1]["rho"] == 0.3 and opt.param_groups[1]["perturbed"] is False


def test_step_in_eval_mode_warns_once_and_is_a_plain_adamw_step(backend):
    prob = Problem()
    pa, pb = prob.params(), prob.params()
    oa = MGPO(pa, backend=backend, lr=1e-2, rho=0.5).eval()
    adamw = torch.optim.AdamW(pb, lr=1e-2)
    with pytest.warns(UserWarning, match="eval mode"):
        _run(oa, pa, prob, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(oa, pa, prob, 2)
    _run(adamw, pb, prob, 3)
    _compare([p.detach() for p in pa], [p.detach() for p in pb], 1e-6)


def test_deepcopy_keeps_options_mode_and_global_state():
    import copy

    prob = Problem()
    params = prob.params()
    opt = MGPO(params, **KW)
    _run(opt, params, prob, 2)
    opt.eval()
    cp = copy.deepcopy(opt)
    assert not cp.training and cp.rho == 0.5
    assert torch.equal(cp.global_state["coef"], opt.global_state["coef"])
