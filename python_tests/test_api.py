"""The drop-in API: modes, checkpoints, GradScaler, skipping non-finite steps, and errors that change nothing."""
from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch

from mgpo_kernels import MGPO, _host_cache, available_backends, backend_reasons
from problems import Problem, rel_err


def _train(opt, params, prob, steps, active=None):
    """A raw-tensor loop (no nn.Module call): it applies eps itself before the forward (theta at rest)."""
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        if isinstance(opt, MGPO):
            opt.apply_perturbation()
        prob.loss(params, active).backward()
        opt.step()


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _assert_unchanged(before, opt, params):
    ps, sd = before
    for a, b in zip(params, ps):
        assert torch.equal(a.detach(), b)
    now = opt.state_dict()
    assert now["mgpo"].keys() == sd["mgpo"].keys()
    for k, v in sd["mgpo"].items():
        if k == "skipped":  # the one thing a skipped step changes
            continue
        assert (torch.equal(now["mgpo"][k], v) if torch.is_tensor(v) else now["mgpo"][k] == v), k
    assert now["state"].keys() == sd["state"].keys()
    for i, st in sd["state"].items():
        for k, v in st.items():
            assert torch.equal(now["state"][i][k], v), (i, k)
    assert now["param_groups"] == sd["param_groups"]


def test_available_backends_lists_reference_and_reasons():
    names = available_backends()
    assert names[0] == "reference"
    reasons = backend_reasons()
    for n, why in reasons.items():
        assert (why is None) == (n in names)
        if why is not None:
            assert isinstance(why, str) and len(why) > 10


def test_auto_never_picks_triton_on_cpu():
    p = torch.nn.Parameter(torch.randn(3))
    assert MGPO([p]).backend in ("cpp", "reference")
    assert MGPO([p]).backend == ("cpp" if "cpp" in available_backends() else "reference")


# ------------------------------------------------------------------------------------------ modes

def test_eval_train_round_trip(backend):
    prob = Problem()
    params = prob.params()
    opt = MGPO(params, lr=1e-2, rho=5.0, backend=backend)
    _train(opt, params, prob, 6)
    theta = [p.detach().clone() for p in params]  # at rest after a step
    coef = opt.state_dict()["mgpo"]["coef"]
    opt.train()
    opt.train()  # idempotent, and moves nothing
    for p, t in zip(params, theta):
        assert torch.equal(p.detach(), t)
    opt.apply_perturbation()
    opt.apply_perturbation()  # once per step
    pert = [p.detach().clone() for p in params]
    for p, t, q in zip(params, theta, pert):
        assert torch.equal(q, t + coef * opt.state[p]["exp_avg"])
    opt.eval()
    for p, t, q in zip(params, theta, pert):
        m = opt.state[p]["exp_avg"]
        want = q - coef * m
        # theta to within 1 ulp of fp32
        got = p.detach()
        assert torch.all((got - want).abs() <= torch.finfo(torch.float32).eps * want.abs().clamp_min(1e-30) * 1.0001)
        assert torch.all((got - t).abs() <= 2 * torch.finfo(torch.float32).eps * t.abs().clamp_min(1e-30))
        assert not torch.equal(got, q)  # the perturbation was really removed
    theta = [p.detach().clone() for p in params]
    opt.eval()  # idempotent
    opt.apply_perturbation()  # eval mode: nothing is applied
    for p, t in zip(params, theta):
        assert torch.equal(p.detach(), t)
    opt.train()
    with opt.unperturbed():
        opt.apply_perturbation()
        for p, t in zip(params, theta):
            assert torch.equal(p.detach(), t)
    assert opt.training
    # inside eval mode, unperturbed() leaves it in eval mode
    opt.eval()
    with opt.unperturbed():
        pass
    for p, t in zip(params, theta):
        assert torch.equal(p.detach(), t)


def test_step_in_eval_mode_is_still_correct(backend):
    prob = Problem()
    pa, pb = prob.params(), prob.params()
    oa = MGPO(pa, lr=1e-2, rho=5.0, backend=backend)
    ob = MGPO(pb, lr=1e-2, rho=5.0, backend=backend)
    for t in range(12):
        for opt, ps in ((oa, pa), (ob, pb)):
            opt.zero_grad()
            prob.loss(ps).backward()
        if t % 3 == 1:  # A steps in eval mode, then re-applies the perturbation
            oa.eval()
            oa.step()
            oa.train()
        else:
            oa.step()
        ob.step()
    for a, b in zip(pa, pb):
        assert rel_err(a.detach(), b.detach()) < 1e-5


def test_step_in_eval_mode_leaves_unperturbed_weights(backend):
    prob = Problem()
    params = prob.params()
    opt = MGPO(params, lr=1e-2, rho=5.0, backend=backend)
    _train(opt, params, prob, 3)
    opt.eval()
    opt.zero_grad()
    prob.loss(params).backward()
    opt.step()
    theta = [p.detach().clone() for p in params]
    opt.eval()  # already unperturbed: nothing moves
    for p, t in zip(params, theta):
        assert torch.equal(p.detach(), t)
    opt.train()  # moves nothing either (theta at rest) ...
    assert all(torch.equal(p.detach(), t) for p, t in zip(params, theta))
    opt.apply_perturbation()  # ... the next training forward applies eps
    assert any(not torch.equal(p.detach(), t) for p, t in zip(params, theta))


# ------------------------------------------------------------------------------------------ checkpoints

def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_equals_uninterrupted(backend, dtype):
    prob = Problem()
    kw = dict(lr=1e-2, rho=5.0, weight_decay=0.01, max_grad_norm=5.0, backend=backend)
    params = prob.params(dtype)
    opt = MGPO(params, **kw)
    _train(opt, params, prob, 8)
    opt.rho = 3.0  # changed options travel with the checkpoint
    with opt.unperturbed():
        model_ckpt = _roundtrip([p.detach().clone() for p in params])
    opt_ckpt = _roundtrip(opt.state_dict())
    _train(opt, params, prob, 8)

    params2 = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    opt2 = MGPO(params2, **{**kw, "rho": 0.01})
    with torch.no_grad():
        for p, w in zip(params2, model_ckpt):
            p.copy_(w)
    opt2.load_state_dict(opt_ckpt)
    assert opt2.rho == 3.0
    _train(opt2, params2, prob, 8)
    tol = 1e-6 if dtype == torch.float32 else 0.0
    for a, b in zip(params, params2):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=tol, atol=tol)


def test_torch_adamw_state_dict_loads(backend):
    prob = Problem()
    pa, pb = prob.params(), prob.params()
    adam_a = torch.optim.AdamW(pa, lr=1e-2, weight_decay=0.0)
    _train(adam_a, pa, prob, 5)
    with torch.no_grad():
        for a, b in zip(pa, pb):
            b.copy_(a)
    opt = MGPO(pb, lr=1e-2, rho=0.0, backend=backend)
    opt.load_state_dict(_roundtrip(adam_a.state_dict()))
    _train(adam_a, pa, prob, 5)
    _train(opt, pb, prob, 5)
    for a, b in zip(pa, pb):
        assert rel_err(b.detach(), a.detach()) < 1e-6
    assert float(opt.state[pb[0]]["step"]) == 10.0


def test_state_dict_is_torch_adamw_compatible(backend):
    prob = Problem()
    params = prob.params()
    opt = MGPO(params, lr=1e-2, backend=backend)
    _train(opt, params, prob, 3)
    sd = _roundtrip(opt.state_dict())
    for st in sd["state"].values():
        assert {"step", "exp_avg", "exp_avg_sq"} <= set(st)
    pa = prob.params()
    adam = torch.optim.AdamW(pa, lr=1e-2)
    adam.load_state_dict(sd)  # torch ignores our extra top-level key
    assert float(adam.state[pa[0]]["step"]) == 3.0


def test_mismatched_state_dict_raises_and_changes_nothing(backend):
    prob = Problem()
    params = prob.params()
    opt = MGPO(params, lr=1e-2, rho=1.0, backend=backend)
    _train(opt, params, prob, 3)
    good = opt.state_dict()
    before = _snapshot(opt, params)

    bad_shape = copy.deepcopy(good)
    bad_shape["state"][2]["exp_avg"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad_shape)
    _assert_unchanged(before, opt, params)

    bad_groups = copy.deepcopy(good)
    bad_groups["param_groups"][0]["params"] = bad_groups["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="parameters"):
        opt.load_state_dict(bad_groups)
    _assert_unchanged(before, opt, params)

    bad_opt = copy.deepcopy(good)
    bad_opt["mgpo"]["rho"] = -1.0
    with pytest.raises(ValueError, match="rho"):
        opt.load_state_dict(bad_opt)
    _assert_unchanged(before, opt, params)


# ------------------------------------------------------------------------------------------ GradScaler, non-finite

def test_grad_scaler_matches_unscaled_and_skips_inf(backend):
    prob = Problem()
    pa, pb = prob.params(), prob.params()
    oa = MGPO(pa, lr=1e-2, rho=5.0, max_grad_norm=10.0, backend=backend)
    ob = MGPO(pb, lr=1e-2, rho=5.0, max_grad_norm=10.0, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    for t in range(8):
        oa.zero_grad()
        scaler.scale(prob.loss(pa)).backward()
        if t == 4:
            before = _snapshot(oa, pa)
            pa[1].grad[3] = float("inf")
            scaler.step(oa)
            scaler.update()
            _assert_unchanged(before, oa, pa)
            assert oa.skipped_steps == 1
            continue
        scaler.step(oa)
        scaler.update()
        ob.zero_grad()
        prob.loss(pb).backward()
        ob.step()
    assert not hasattr(oa, "grad_scale")
    for a, b in zip(pa, pb):
        assert rel_err(a.detach(), b.detach()) < 1e-6


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_skips_the_whole_step(backend, bad):
    prob = Problem()
    params = prob.params()
    opt = MGPO(params, lr=1e-2, rho=5.0, backend=backend)
    _train(opt, params, prob, 3)
    before = _snapshot(opt, params)
    opt.zero_grad()
    prob.loss(params).backward()
    params[3].grad[0, 0] = bad
    opt.step()
    _assert_unchanged(before, opt, params)
    assert opt.skipped_steps == 1
    _train(opt, params, prob, 2)
    assert opt.state_dict()["mgpo"]["step"] == 5
    assert all(torch.isfinite(p).all() for p in params)


def test_closure_is_called_like_torch(backend):
    prob = Problem()
    params = prob.params()
    opt = MGPO(params, lr=1e-2, backend=backend)

    def closure():
        opt.zero_grad()
        loss = prob.loss(params)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and float(opt.state_dict()["mgpo"]["step"]) == 1.0


def test_grad_scaler_sees_amp_support():
    assert MGPO._step_supports_amp_scaling is True


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1e-8), "eps"),
        (dict(betas=(1.0, 0.999)), "betas"),
        (dict(betas=(0.9, -0.1)), "betas"),
        (dict(ema_beta=1.0), "ema_beta"),
        (dict(ema_beta=-0.5), "ema_beta"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(rho=-0.01), "rho"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(direction="sideways"), "momentum"),
        (dict(backend="cuda-magic"), "reference"),
        (dict(amsgrad=True), "amsgrad"),
        (dict(maximize=True), "maximize"),
        (dict(differentiable=True), "differentiable"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=match):
        MGPO([p], **kwargs)


def test_adamw_constructor_flags_carry_over(backend):
    """An AdamW configuration (foreach/fused/capturable and the False defaults of the others) builds an MGPO that
    steps as one built without them; a param group or state dict asking for AMSGrad is refused, not ignored."""
    prob = Problem()
    pa, pb = prob.params(), prob.params()
    oa = MGPO(pa, lr=1e-2, backend=backend, amsgrad=False, maximize=False, foreach=True, fused=True,
              capturable=True, differentiable=False)
    ob = MGPO(pb, lr=1e-2, backend=backend)
    _train(oa, pa, prob, 3)
    _train(ob, pb, prob, 3)
    for a, b in zip(pa, pb):
        assert torch.equal(a.detach(), b.detach())
    with pytest.raises(ValueError, match="amsgrad"):
        oa.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "amsgrad": True})
    adam = torch.optim.AdamW(prob.params(), lr=1e-2, amsgrad=True)
    before = _snapshot(ob, pb)
    with pytest.raises(ValueError, match="amsgrad"):
        ob.load_state_dict(adam.state_dict())
    _assert_unchanged(before, ob, pb)


def test_bad_param_group_raises():
    p, q = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = MGPO([p])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [q], "lr": -1})
    assert len(opt.param_groups) == 1


def test_setting_a_bad_option_raises_and_keeps_the_old_value():
    opt = MGPO([torch.nn.Parameter(torch.randn(4))], rho=0.05)
    with pytest.raises(ValueError, match="rho"):
        opt.rho = -1.0
    assert opt.rho == 0.05


def test_unusable_backend_says_why():
    reasons = backend_reasons()
    p = torch.nn.Parameter(torch.randn(4))
    for name, why in reasons.items():
        if why is not None:
            with pytest.raises(RuntimeError, match=name):
                MGPO([p], backend=name)
    if torch.cuda.is_available() is False:
        with pytest.raises(ValueError, match="valid backends"):
            MGPO([p], backend="cuda")


def test_non_floating_and_unsupported_params_raise():
    with pytest.raises(TypeError, match="floating"):
        MGPO([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match="complex"):
        MGPO([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="float64"):
        MGPO([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))])


def test_params_on_two_devices_raise():
    p = torch.nn.Parameter(torch.randn(3))
    q = torch.nn.Parameter(torch.randn(3, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        MGPO([p, q])


def _bad_grad_cases():
    def sparse(p):
        p.grad = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), p.shape)

    def dtype(p):
        p.grad_dtype = None  # torch itself refuses a grad of another dtype unless told otherwise
        p.grad = torch.randn(p.shape, dtype=torch.float64)

    def complex_(p):
        p.grad_dtype = None
        p.grad = torch.randn(p.shape, dtype=torch.complex64)

    return [(sparse, "sparse"), (dtype, "dtype"), (complex_, "complex")]


@pytest.mark.parametrize("index", [0, 1], ids=["1_element", "7_elements"])
@pytest.mark.parametrize("case", range(3))
def test_bad_gradients_raise_and_change_nothing(backend, case, index):
    """After two steps (so the step takes the cached host path, where the cpp backend validates in C++), a bad
    gradient is refused with a message that names the problem, and nothing changes."""
    mutate, match = _bad_grad_cases()[case]
    prob = Problem([(1,), (7,)])
    params = prob.params()
    opt = MGPO(params, lr=1e-2, rho=1.0, backend=backend)
    _train(opt, params, prob, 2)
    before = _snapshot(opt, params)
    opt.zero_grad()
    prob.loss(params).backward()
    mutate(params[index])
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        opt.step()
    _assert_unchanged(before, opt, params)


def test_complex_gradient_raises(backend):
    p = torch.nn.Parameter(torch.randn(4))
    opt = MGPO([p], backend=backend)
    p.grad_dtype = None
    p.grad = torch.randn(4, dtype=torch.complex64)
    with pytest.raises((RuntimeError, TypeError), match="complex"):
        opt.step()
    assert len(opt.state) == 0


# ------------------------------------------------------------------------------------------ no host sync, functional

class _NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on aten._local_scalar_dense, which every .item()/bool(tensor)/float(tensor) goes through."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host synchronisation (.item()/bool/float of a tensor) inside step()")
        return func(*args, **(kwargs or {}))


def test_step_never_reads_a_device_scalar_on_the_host(backend):
    prob = Problem()
    params = prob.params()
    opt = MGPO(params, lr=1e-2, rho=1.0, max_grad_norm=1.0, backend=backend)
    lr_tensor_opt = MGPO(prob.params(), lr=torch.tensor(1e-2), backend=backend)
    for o, ps in ((opt, params), (lr_tensor_opt, lr_tensor_opt.param_groups[0]["params"])):
        for _ in range(3):
            o.zero_grad()
            prob.loss(ps).backward()
            with _NoHostSync():
                o.step()
    # and the mode does catch a sync
    with pytest.raises(AssertionError, match="host synchronisation"):
        with _NoHostSync():
            torch.ones(()).item()


def test_add_param_group_with_bad_params_changes_nothing():
    opt = MGPO([torch.nn.Parameter(torch.randn(4))])
    with pytest.raises(TypeError, match="float64"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, dtype=torch.float64))]})
    with pytest.raises(ValueError, match="one device"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, device="meta"))]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "lr": 0.5})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.5


def test_load_state_dict_into_the_same_optimizer_uses_the_loaded_state(backend):
    """The per-step tensor lists are cached between steps: a load must not leave the old state in use."""
    prob = Problem()
    params = prob.params()
    opt = MGPO(params, lr=1e-2, rho=2.0, backend=backend)
    _train(opt, params, prob, 3)
    weights = [p.detach().clone() for p in params]  # theta at rest
    sd = _roundtrip(opt.state_dict())
    _train(opt, params, prob, 4)

    fresh = prob.params()
    opt_fresh = MGPO(fresh, lr=1e-2, rho=2.0, backend=backend)
    for opt_, ps in ((opt, params), (opt_fresh, fresh)):
        with torch.no_grad():
            for p, w in zip(ps, weights):
                p.copy_(w)
        opt_.load_state_dict(sd)
        _train(opt_, ps, prob, 3)
    for a, b in zip(params, fresh):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ the cached host path

def _uncached_step(opt):
    opt.__dict__.pop("_group_cache", None)  # forces the full path (validation, state lookup, new lists)
    opt.step()


def test_cached_host_path_follows_every_change(backend):
    """The per-step tensor lists are cached while the same parameters have gradients; a run that changes which
    parameters have gradients, adds a param group and reassigns ``p.data`` must be bitwise the run without it."""
    prob = Problem()
    pa, pb = prob.params(), prob.params()
    extra_a, extra_b = (torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(5)))
                        for _ in range(2))
    oa = MGPO(pa, lr=1e-2, rho=2.0, backend=backend)
    ob = MGPO(pb, lr=1e-2, rho=2.0, backend=backend)
    schedule = [None, None, [True, False, True, True, True], [True, False, True, True, True], None,
                "add_group", None, "reassign", None, None]
    for event in schedule:
        active = event if isinstance(event, list) else None
        if event == "add_group":
            oa.add_param_group({"params": [extra_a], "lr": 3e-2})
            ob.add_param_group({"params": [extra_b], "lr": 3e-2})
            pa.append(extra_a)
            pb.append(extra_b)
        if event == "reassign":  # new storage behind the same Parameter (as model.to() may do)
            old = pa[2].data
            pa[2].data = pa[2].data.clone()
            pb[2].data = pb[2].data.clone()
        for ps, opt, step in ((pa, oa, MGPO.step), (pb, ob, _uncached_step)):
            opt.zero_grad(set_to_none=True)
            loss = prob.loss(ps[:5], active)
            if len(ps) > 5:
                loss = loss + (ps[5] ** 2).sum()
            loss.backward()
            step(opt)
        if event == "reassign":
            assert not torch.equal(pa[2].data, old)  # the step wrote the parameter's new storage
        for a, b in zip(pa, pb):
            assert torch.equal(a.detach(), b.detach())
    assert "_group_cache" in oa.__dict__
    sa, sb = oa.state_dict(), ob.state_dict()
    for i in sa["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]), (i, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_eval_train_agree_bitwise_with_the_generic_perturb(backend, dtype):
    """A backend's apply pass and eval() (cpp: one fused launch each) do the step's arithmetic, as the generic
    Backend.perturb does: same bits from the same state."""
    from mgpo_kernels.backends.base import Backend

    prob = Problem()
    params = prob.params(dtype)
    opt = MGPO(params, lr=1e-2, rho=3.0, backend=backend)
    _train(opt, params, prob, 4)
    groups = opt._groups(with_grads=False)
    coef = opt.global_state["coef"]
    assert float(coef) != 0.0
    theta = [p.detach().clone() for p in params]
    opt.apply_perturbation()
    gen = [t.clone() for t in theta]
    Backend.perturb(None, [dataclasses.replace(groups[0], params=gen)], coef, apply=True)
    for p, w in zip(params, gen):
        assert torch.equal(p.detach(), w)
    if dtype == torch.float32:
        assert any(not torch.equal(p.detach(), t) for p, t in zip(params, theta))
    copies = [p.detach().clone() for p in params]
    opt.eval()
    want = [c.clone() for c in copies]
    for w, m, master in zip(want, groups[0].exp_avgs, groups[0].masters):
        w.copy_(master) if master is not None else w.sub_(m * coef)
    for p, w in zip(params, want):
        assert torch.equal(p.detach(), w)


def test_gradient_layout_does_not_matter(backend):
    """A gradient assigned as a transposed or strided view gives the same step as its contiguous copy."""
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(9, 9, generator=gen), torch.randn(40, 9, generator=gen), torch.randn(33, generator=gen)]
    pa = [torch.nn.Parameter(t.clone()) for t in init]
    pb = [torch.nn.Parameter(t.clone()) for t in init]
    oa, ob = MGPO(pa, lr=1e-2, rho=2.0, backend=backend), MGPO(pb, lr=1e-2, rho=2.0, backend=backend)
    for _ in range(3):
        grads = [torch.randn(9, 9, generator=gen).t(), torch.randn(9, 40, generator=gen).t(),
                 torch.randn(66, generator=gen)[::2]]
        for a, b, g in zip(pa, pb, grads):
            a.grad, b.grad = g, g.contiguous()
        oa.step()
        ob.step()
        for a, b in zip(pa, pb):
            assert torch.equal(a.detach(), b.detach())


def test_state_tensors_replaced_between_steps_are_used(backend):
    """The common 'move the optimizer state' loops (``state[k] = v.to(device)`` or a new dict per parameter, here
    with clones) between two steps replace the tensors the cached host path holds: the next step must update the
    new ones."""
    prob = Problem()
    pa, pb = prob.params(torch.bfloat16), prob.params(torch.bfloat16)  # bf16: master_param is replaced too
    oa, ob = MGPO(pa, lr=1e-2, rho=2.0, backend=backend), MGPO(pb, lr=1e-2, rho=2.0, backend=backend)
    for t in range(5):
        if t >= 2:
            assert _host_cache.lookup(oa) is not None  # steady state: the cached lists are used
        if t == 2:  # tensors replaced inside the state dicts
            for st in oa.state.values():
                for k, v in st.items():
                    if torch.is_tensor(v):
                        st[k] = v.clone()
        if t == 3:  # the state dicts themselves replaced
            for p in list(oa.state):
                oa.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in oa.state[p].items()}
        if t in (2, 3):
            assert _host_cache.lookup(oa) is None  # noticed
        _train(oa, pa, prob, 1)
        ob.__dict__.pop("_group_cache", None)
        _train(ob, pb, prob, 1)
    for a, b in zip(pa, pb):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(pa, pb):
        for k in ("exp_avg", "exp_avg_sq", "master_param", "step"):
            assert torch.equal(oa.state[a][k], ob.state[b][k]), k


def test_deepcopy_and_pickle_give_a_working_optimizer(backend):
    """torch's Optimizer pickles only defaults/state/param_groups: MGPO's own state (gbar, coef, options, mode)
    must travel too. A deep copy made mid-run continues exactly as the original."""
    import pickle

    prob = Problem()
    params = prob.params()
    opt = MGPO(params, lr=1e-2, rho=2.0, max_grad_norm=1.0, backend=backend)
    _train(opt, params, prob, 3)
    model_copy, opt_copy = copy.deepcopy((params, opt))  # one memo: the copy's param groups hold the copied params
    assert opt_copy.rho == 2.0 and opt_copy.max_grad_norm == 1.0 and opt_copy.backend == opt.backend
    _train(opt, params, prob, 3)
    _train(opt_copy, model_copy, prob, 3)
    for a, b in zip(params, model_copy):
        assert torch.equal(a.detach(), b.detach())
    assert torch.equal(opt.global_state["coef"], opt_copy.global_state["coef"])
    params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    _train(opt2, params2, prob, 1)
    _train(opt, params, prob, 1)
    for a, b in zip(params, params2):
        assert torch.equal(a.detach(), b.detach())


def test_no_gradient_outlives_zero_grad(backend):
    """The per-step caches hold no gradient: after zero_grad(set_to_none=True) the gradients of every step are
    freed (a cached copy of the first step's gradients once kept a whole extra set alive)."""
    import gc
    import weakref

    prob = Problem()
    params = prob.params()
    opt = MGPO(params, lr=1e-2, rho=0.5, backend=backend)
    refs = []
    for _ in range(3):
        opt.apply_perturbation()
        prob.loss(params).backward()
        refs += [weakref.ref(p.grad) for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)
