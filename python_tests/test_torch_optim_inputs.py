"""MGPO driven over PyTorch's own AdamW test inputs (``torch.testing._internal.common_optimizers.optim_db``).

Only the inputs are torch's (constructor kwargs, the configurations it refuses); the checks are ours:
rho=0 must be torch AdamW with the same kwargs; at rho>0 the ``torch.optim.Optimizer`` contracts must hold
(state_dict round trips in both modes, deepcopy, step and state-dict hooks, tensor lr, add_param_group,
closures); what torch refuses MGPO refuses too, with nothing changed.  Skipped: only what MGPO refuses by
design, after checking that it does refuse it, so a skip cannot hide a silent acceptance.
"""
from __future__ import annotations

import copy
import inspect
import io
import re
import warnings

import pytest
import torch
import torch.backends
import torch.nn.functional as F
from torch import nn

from mgpo_kernels import MGPO


def _import_torch_optimizer_inputs():
    """torch's testing package changes torch for the whole process at import: it freezes the torch.backends
    flags (its own suite sets them in context managers only; e.g. Lightning's Trainer(deterministic=True) sets
    torch.backends.cudnn.benchmark and raises RuntimeError while they are frozen) and wraps ScriptFunction and
    ScriptMethod calls.  Undone right after the import: every other test of the session must see torch as
    users do."""
    frozen = torch.backends.flags_frozen()
    calls = torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__
    from torch.testing._internal import common_optimizers

    if not frozen and torch.backends.flags_frozen():
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True  # torch's default
    torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = calls
    return common_optimizers


_torch_inputs = _import_torch_optimizer_inputs()
OptimizerErrorEnum = _torch_inputs.OptimizerErrorEnum
ADAMW_INFO = next(info for info in _torch_inputs.optim_db if info.optim_cls is torch.optim.AdamW)
RHO = 0.3  # large enough that a perturbation applied twice or lost shows far above rounding
STEPS = 3
# MGPO refuses these AdamW flags when True (it raises a ValueError naming the flag)
BY_DESIGN = {
    "amsgrad": "AMSGrad's running max of second moments is not part of the paper's AdamW update",
    "maximize": "MGPO minimises (negate the loss to maximise)",
    "differentiable": "MGPO's fused step is not differentiable",
}
# choose how AdamW runs, not what it computes: MGPO accepts and ignores them
IMPL_FLAGS = ("foreach", "fused", "capturable")


def _inputs():
    """torch's AdamW inputs for the CPU, then those it lists only for CUDA (capturable configs and foreach
    variants: MGPO ignores these flags, so they apply on the CPU too), with the foreach/fused/differentiable
    variants torch's own suite adds; the first of each description wins."""
    seen, out = set(), []
    for device in ("cpu", "cuda"):
        for inp in _torch_inputs._get_optim_inputs_including_global_cliquey_kwargs(device, torch.float32,
                                                                                    ADAMW_INFO):
            if inp.desc not in seen:
                seen.add(inp.desc)
                out.append(inp)
    return out


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


INPUTS = _inputs()
INPUT_IDS = [_slug(i.desc) for i in INPUTS]


def _refused_flag(kwargs):
    return next((k for k in BY_DESIGN if kwargs.get(k)), None)


def _base_inputs():
    """The base configurations (no flag variant) MGPO does not refuse, one per distinct MGPO configuration
    (capturable only differs from default by a flag MGPO ignores)."""
    seen, out = [], []
    for inp in INPUTS:
        if " & " in inp.desc or _refused_flag(inp.kwargs) is not None:
            continue
        key = repr({k: v for k, v in inp.kwargs.items() if k not in IMPL_FLAGS})
        if key not in seen:
            seen.append(key)
            out.append(inp)
    return out


BASE = _base_inputs()  # for the contract tests
BASE_IDS = [_slug(i.desc) for i in BASE]
ERRORS = ADAMW_INFO.optim_error_inputs_func("cpu", torch.float32)
ERROR_IDS = [f"{k}_{_slug(e.optimizer_error_input.desc)}" for k, e in enumerate(ERRORS)]


# ------------------------------------------------------------------------------------------- helpers
def _mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _batches(n):
    return [(torch.randn(5, 3), torch.randn(5, 2)) for _ in range(n)]


def _backward(model, batch):
    x, y = batch
    loss = F.mse_loss(model(x), y)
    loss.backward()
    return loss


def _train(model, opt, batches):
    for b in batches:
        opt.zero_grad(set_to_none=True)
        _backward(model, b)
        opt.step()


def _adamw(params, kwargs):
    """torch's AdamW as the reference.  capturable (CUDA graphs) is dropped: torch refuses it on CPU tensors at
    the first step; foreach/fused are dropped too where torch refuses the combination here."""
    kwargs = {k: v for k, v in kwargs.items() if k != "capturable"}
    params = list(params)
    try:
        return torch.optim.AdamW(params, **kwargs)
    except (ValueError, RuntimeError):
        return torch.optim.AdamW(params, **{k: v for k, v in kwargs.items() if k not in IMPL_FLAGS})


def _mgpo(params, kwargs, backend, rho):
    return MGPO(params, backend=backend, rho=rho, **copy.deepcopy(kwargs))


def _require_supported(kwargs, backend):
    """pytest.skip for an input MGPO refuses by design, after checking that it does refuse it, and clearly."""
    flag = _refused_flag(kwargs)
    if flag is None:
        return
    with pytest.raises(ValueError, match=flag):
        _mgpo(_mlp().parameters(), kwargs, backend, rho=0.0)
    pytest.skip(f"MGPO refuses {flag}=True by design: {BY_DESIGN[flag]}")


def _params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_same_params(a, b, exact=False, msg=""):
    a = list(a.parameters()) if isinstance(a, nn.Module) else list(a)
    b = list(b.parameters()) if isinstance(b, nn.Module) else list(b)
    assert len(a) == len(b)
    for k, (x, y) in enumerate(zip(a, b)):
        if exact:
            assert torch.equal(x.detach(), y.detach()), f"{msg} param {k}: max diff {(x - y).abs().max():.3e}"
        else:
            torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-6, atol=1e-7, msg=f"{msg} param {k}")


def _assert_same_tree(a, b, path="state_dict"):
    """Nested dicts/lists/tuples of tensors and plain values are equal (tensors exactly)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _assert_same_tree(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{path}[{k}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _setup(inp, backend, rho=RHO, steps=2):
    """A model and its MGPO with ``inp``'s kwargs, trained ``steps`` steps (state and perturbation exist)."""
    model = _mlp()
    opt = _mgpo(model.parameters(), inp.kwargs, backend, rho)
    _train(model, opt, _batches(steps))
    return model, opt


def test_importing_torchs_inputs_left_torch_as_it_was():
    assert not torch.backends.flags_frozen()
    was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = not was  # what Lightning's Trainer does; raises while the flags are frozen
    torch.backends.cudnn.benchmark = was
    assert torch._C.ScriptFunction.__call__.__module__ != _torch_inputs.__name__.rsplit(".", 1)[0] + ".common_utils"


# ------------------------------------------------------------------------------------------- defaults
def test_constructor_takes_every_adamw_keyword_with_its_default():
    mgpo = inspect.signature(MGPO.__init__).parameters
    for name, p in inspect.signature(torch.optim.AdamW.__init__).parameters.items():
        if name in ("self", "params"):
            continue
        assert name in mgpo, f"MGPO does not take AdamW's {name!r}"
        assert mgpo[name].default == p.default, f"{name}: MGPO default {mgpo[name].default!r}, AdamW {p.default!r}"


def test_defaults_equal_adamw(backend):
    """MGPO(params) is a drop-in for AdamW(params): the hyper-parameters both hold agree."""
    model = _mlp()
    opt = MGPO(model.parameters(), backend=backend)
    ref = torch.optim.AdamW(_mlp().parameters())
    for where, mine, theirs in (("defaults", opt.defaults, ref.defaults),
                                ("param_groups[0]", opt.param_groups[0], ref.param_groups[0])):
        for key in ("lr", "betas", "eps", "weight_decay"):
            assert key in mine, f"{where} lacks {key!r}"
        for key in set(mine) & set(theirs) - {"params", "param_names"}:
            assert mine[key] == theirs[key], f"{where}[{key!r}]: MGPO {mine[key]!r}, AdamW {theirs[key]!r}"


# ------------------------------------------------------------------------------------------- rho = 0
@pytest.mark.parametrize("inp", INPUTS, ids=INPUT_IDS)
def test_rho0_matches_adamw(inp, backend):
    _require_supported(inp.kwargs, backend)
    model = _mlp()
    ref_model = copy.deepcopy(model)
    opt = _mgpo(model.parameters(), inp.kwargs, backend, rho=0.0)
    ref = _adamw(ref_model.parameters(), copy.deepcopy(inp.kwargs))
    for b in _batches(STEPS):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad(set_to_none=True)
            _backward(m, b)
            o.step()
    _assert_same_params(model, ref_model, msg=inp.desc)


@pytest.mark.parametrize("what", ["float64", "complex64", "sparse gradient"])
def test_refused_by_design(what, backend):
    """torch's suite runs AdamW on float64 and complex parameters; MGPO refuses them (fp32 moments, real-valued
    norms), and sparse gradients (dense fused kernels): check the refusal is clear and changes nothing."""
    if what == "sparse gradient":
        p = nn.Parameter(torch.randn(4, 3))
        opt = MGPO([p], backend=backend)
        before = p.detach().clone()
        p.grad = torch.randn(4, 3).to_sparse()
        with pytest.raises((RuntimeError, TypeError, ValueError), match="sparse"):
            opt.step()
        assert torch.equal(p.detach(), before) and not opt.state
    else:
        dtype = getattr(torch, what)
        with pytest.raises(TypeError, match="complex" if dtype.is_complex else "float64"):
            MGPO([nn.Parameter(torch.randn(4, 3, dtype=dtype))], backend=backend)
    pytest.skip(f"MGPO refuses {what} by design (checked: clear error, nothing changed)")


# ------------------------------------------------------------------------------------------- rho > 0: contracts
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("inp", BASE, ids=BASE_IDS)
def test_state_dict_round_trip_is_identity(inp, mode, backend):
    model, opt = _setup(inp, backend)
    if mode == "eval":
        opt.eval()
    twin_model, twin = copy.deepcopy((model, opt))
    before = _params_of(model)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # a checkpoint file, read back as torch.load does by default
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    _assert_same_params(model, before, exact=True, msg=f"after load_state_dict in {mode} mode:")
    assert opt.training == (mode == "train")
    _assert_same_tree(opt.state_dict(), twin.state_dict())
    if mode == "eval":
        opt.train()
        twin.train()
        _assert_same_params(model, twin_model, exact=True, msg="after train():")
    batches = _batches(2)
    _train(model, opt, batches)
    _train(twin_model, twin, batches)
    _assert_same_params(model, twin_model, exact=True, msg="continued:")


@pytest.mark.parametrize("inp", BASE, ids=BASE_IDS)
def test_state_dict_without_the_group_keys_torch_does_not_have(inp, backend):
    """As torch's test_can_load_older_state_dict drops the flags added to its groups later: a state dict whose
    groups hold only AdamW's keys (MGPO's per-group options and mode removed, as in a checkpoint written before
    they were per group) loads, fills every group with them again, and the run continues uninterrupted."""
    model, opt = _setup(inp, backend)
    twin_model, twin = copy.deepcopy((model, opt))
    adamw_keys = set(torch.optim.AdamW([nn.Parameter(torch.zeros(1))]).param_groups[0])
    sd = copy.deepcopy(opt.state_dict())
    extra = set(sd["param_groups"][0]) - adamw_keys - {"params", "param_names"}
    for g in sd["param_groups"]:
        for k in extra:
            del g[k]
    before = _params_of(model)
    opt.load_state_dict(sd)
    _assert_same_params(model, before, exact=True, msg="after loading:")
    for key in extra:
        assert all(key in g for g in opt.param_groups), f"{key!r} not restored in the param groups"
    batches = _batches(2)
    _train(model, opt, batches)
    _train(twin_model, twin, batches)
    _assert_same_params(model, twin_model, exact=True, msg="continued:")


@pytest.mark.parametrize("inp", BASE, ids=BASE_IDS)
def test_step_without_gradients_is_a_no_op(inp, backend):
    """As torch's test_step_is_noop_when_params_have_no_grad: no gradient anywhere -> nothing changes (the
    parameters keep their perturbation, the state and the step count stay)."""
    model, opt = _setup(inp, backend)
    opt.zero_grad(set_to_none=True)
    before, sd = _params_of(model), copy.deepcopy(opt.state_dict())
    opt.step()
    _assert_same_params(model, before, exact=True, msg="after a step without gradients:")
    _assert_same_tree(opt.state_dict(), sd)


@pytest.mark.parametrize("inp", BASE, ids=BASE_IDS)
def test_deepcopy_is_independent_and_steps_alike(inp, backend):
    model, opt = _setup(inp, backend)
    copy_model, copy_opt = copy.deepcopy((model, opt))
    before, sd_before = _params_of(model), copy.deepcopy(opt.state_dict())
    batches = _batches(2)
    _train(copy_model, copy_opt, batches)
    _assert_same_params(model, before, exact=True, msg="original after stepping the copy:")
    _assert_same_tree(opt.state_dict(), sd_before)
    _train(model, opt, batches)
    _assert_same_params(model, copy_model, exact=True, msg="original vs copy:")
    opt.eval()
    copy_opt.eval()
    _assert_same_params(model, copy_model, exact=True, msg="theta:")


@pytest.mark.parametrize("inp", BASE, ids=BASE_IDS)
def test_step_hooks(inp, backend):
    """Pre/post hooks (per optimizer and global) run around every step, in order; a pre-hook's change to the
    gradients is what the step uses; removed hooks no longer run."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model, opt = _setup(inp, backend)
    twin_model, twin = copy.deepcopy((model, opt))
    calls = []

    def pre(o, args, kwargs):
        assert o is opt and args[1:] == () and kwargs == {}  # torch passes (self,) as args
        calls.append("pre")
        for p in model.parameters():
            p.grad.mul_(3.0).add_(0.01)

    handles = [opt.register_step_pre_hook(pre),
               opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
               register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre") if o is opt else None),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post") if o is opt else None)]
    try:
        batch = _batches(1)
        _train(model, opt, batch)
        assert calls == ["global pre", "pre", "post", "global post"]
        twin.zero_grad(set_to_none=True)
        _backward(twin_model, batch[0])
        for p in twin_model.parameters():
            p.grad.mul_(3.0).add_(0.01)
        twin.step()
        _assert_same_params(model, twin_model, exact=True, msg="hooked step vs gradients changed by hand:")
    finally:
        for h in handles:
            h.remove()
    _train(model, opt, _batches(1))
    assert len(calls) == 4


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("inp", BASE, ids=BASE_IDS)
def test_state_dict_hooks(inp, mode, backend):
    """state_dict/load_state_dict pre- and post-hooks run and their results are used; hooks that put a non-dict
    entry into ``optimizer.state`` (as torch's own hook tests do) are tolerated; the round trip stays exact."""
    model, opt = _setup(inp, backend)
    if mode == "eval":
        opt.eval()
    twin_model, twin = copy.deepcopy((model, opt))
    before = _params_of(model)
    ran = []

    def sd_pre(o):
        ran.append("sd pre")
        o.state["marker"] = 1  # a non-dict, non-parameter entry

    def sd_post(o, sd):
        ran.append("sd post")
        assert sd["state"].pop("marker") == 1
        sd["from_post_hook"] = True
        return sd

    def load_pre(o, sd):
        ran.append("load pre")
        assert sd.pop("from_post_hook") is True
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.003
        return sd

    def load_post(o):
        ran.append("load post")
        o.state["saw_lr"] = o.param_groups[0]["lr"]

    opt.register_state_dict_pre_hook(sd_pre)
    opt.register_state_dict_post_hook(sd_post)
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(load_post)
    sd = opt.state_dict()
    assert ran == ["sd pre", "sd post"] and sd["from_post_hook"] is True
    opt.load_state_dict(sd)
    assert ran[2:] == ["load pre", "load post"]
    assert opt.param_groups[0]["lr"] == 0.003 and opt.state["saw_lr"] == 0.003
    _assert_same_params(model, before, exact=True, msg=f"after hooked load_state_dict in {mode} mode:")
    opt.state_dict()  # the non-dict entries left by the hooks do not break it
    # the same lr on the twin: the rest of the run must be the uninterrupted one
    for g in twin.param_groups[:1]:
        g["lr"] = 0.003
    opt.train()
    twin.train()
    batches = _batches(2)
    _train(model, opt, batches)
    _train(twin_model, twin, batches)
    _assert_same_params(model, twin_model, exact=True, msg="continued:")


@pytest.mark.parametrize("inp", BASE, ids=BASE_IDS)
def test_tensor_lr(inp, backend):
    """lr as a 0-d tensor (torch's way to change it without recompiling): at rho=0 AdamW with the same tensor lr;
    at rho>0 the float lr's run; an in-place change of the tensor between steps is followed by both."""
    lr0 = float(inp.kwargs.get("lr", 1e-3))
    kw = {**copy.deepcopy(inp.kwargs), "lr": torch.tensor(lr0)}
    batches = _batches(4)

    def run(model, opt, lr_of):
        for t, b in enumerate(batches):
            if t == 2:
                for g in opt.param_groups:
                    if isinstance(g["lr"], torch.Tensor):
                        g["lr"].fill_(lr_of(t))
                    else:
                        g["lr"] = lr_of(t)
            opt.zero_grad(set_to_none=True)
            _backward(model, b)
            opt.step()

    new_lr = lambda t: 2.5 * lr0  # noqa: E731
    m0 = _mlp()
    m_ref, m_float = copy.deepcopy(m0), copy.deepcopy(m0)
    run(m0, _mgpo(m0.parameters(), kw, backend, rho=0.0), new_lr)
    run(m_ref, _adamw(m_ref.parameters(), copy.deepcopy(kw)), new_lr)
    _assert_same_params(m0, m_ref, msg="rho=0, tensor lr vs AdamW:")
    m_tensor = copy.deepcopy(m_float)
    run(m_tensor, _mgpo(m_tensor.parameters(), kw, backend, rho=RHO), new_lr)
    run(m_float, _mgpo(m_float.parameters(), {**kw, "lr": lr0}, backend, rho=RHO), new_lr)
    _assert_same_params(m_tensor, m_float, msg="rho>0, tensor lr vs float lr:")


@pytest.mark.parametrize("inp", BASE, ids=BASE_IDS)
def test_add_param_group(inp, backend):
    """A group added after some steps (own lr and weight_decay, the rest from the defaults): at rho=0 AdamW doing
    the same; at rho>0 the run that had the group from the start without gradients until then."""
    extra = {"lr": 0.02, "weight_decay": 0.05}
    batches = _batches(4)

    def run(model, opt, add_later):
        for t, b in enumerate(batches):
            if t == 2 and add_later:
                opt.add_param_group({"params": list(model[2].parameters()), **extra})
            opt.zero_grad(set_to_none=True)
            _backward(model, b)
            if t < 2:  # the second layer is not trained yet
                for p in model[2].parameters():
                    p.grad = None
            opt.step()

    m0 = _mlp()
    m_ref, m_late, m_early = (copy.deepcopy(m0) for _ in range(3))
    opt = _mgpo(m0[0].parameters(), inp.kwargs, backend, rho=0.0)
    run(m0, opt, add_later=True)
    run(m_ref, _adamw(m_ref[0].parameters(), copy.deepcopy(inp.kwargs)), add_later=True)
    _assert_same_params(m0, m_ref, msg="rho=0, added group vs AdamW:")

    late = _mgpo(m_late[0].parameters(), inp.kwargs, backend, rho=RHO)
    run(m_late, late, add_later=True)
    for key, value in late.param_groups[0].items():  # the options and the mode too, not only AdamW's keys
        if key not in ("params", "param_names", *extra):
            assert key in late.param_groups[1] and late.param_groups[1][key] == value, key
    early = _mgpo([{"params": list(m_early[0].parameters())},
                   {"params": list(m_early[2].parameters()), **extra}], inp.kwargs, backend, rho=RHO)
    run(m_early, early, add_later=False)
    _assert_same_params(m_late, m_early, msg="rho>0, added later vs from the start:")
    late.eval()
    early.eval()
    _assert_same_params(m_late, m_early, msg="rho>0 theta, added later vs from the start:")


@pytest.mark.parametrize("inp", BASE, ids=BASE_IDS)
def test_closure(inp, backend):
    """step(closure) returns the closure's loss, evaluates it with grad enabled at the point the parameters hold,
    and steps exactly as backward() + step() does."""
    model, opt = _setup(inp, backend)
    twin_model, twin = copy.deepcopy((model, opt))
    for b in _batches(2):
        seen = []

        def closure():
            assert torch.is_grad_enabled()
            opt.zero_grad(set_to_none=True)
            loss = _backward(model, b)
            seen.append(loss)
            return loss

        out = opt.step(closure)
        assert len(seen) == 1 and out is seen[0]
        twin.zero_grad(set_to_none=True)
        ref_loss = _backward(twin_model, b)
        twin.step()
        assert torch.equal(out.detach(), ref_loss.detach())
        _assert_same_params(model, twin_model, exact=True, msg="closure vs backward + step:")


def test_named_parameters_as_adamw(backend):
    """torch optimizers take ``model.named_parameters()`` (the names go to param_groups' "param_names" and the
    state dict): at rho=0 the same run as AdamW, and the same names saved."""
    model = _mlp()
    ref_model = copy.deepcopy(model)
    opt = MGPO(model.named_parameters(), backend=backend, rho=0.0)
    ref = torch.optim.AdamW(ref_model.named_parameters(), weight_decay=opt.defaults["weight_decay"])
    b = _batches(STEPS)
    _train(model, opt, b)
    _train(ref_model, ref, b)
    _assert_same_params(model, ref_model, msg="named parameters, vs AdamW:")
    assert opt.param_groups[0]["param_names"] == ref.param_groups[0]["param_names"]
    assert opt.state_dict()["param_groups"][0]["param_names"] == ref.state_dict()["param_groups"][0]["param_names"]


# ------------------------------------------------------------------------------------------- error inputs
def _culprits(params, kwargs):
    """The kwargs whose removal makes torch's AdamW accept the input (what the error is about)."""
    out = []
    for key in kwargs:
        rest = {k: v for k, v in kwargs.items() if k != key}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.optim.AdamW(_fresh_params(params), **rest)
        except Exception:
            continue
        out.append(key)
    return out


def _fresh_params(params):
    return [nn.Parameter(torch.randn(2, 3))] if params is None else copy.deepcopy(params)


def _check_refusal(exc, err, culprits):
    """torch's exception type (or a ValueError/TypeError), and a message that says what is wrong: torch's own
    message, or one naming the offending argument."""
    assert isinstance(exc, (err.error_type, ValueError, TypeError)), f"{type(exc).__name__}: {exc}"
    msg = str(exc)
    assert re.search(err.error_regex, msg) or any(c in msg for c in culprits), (
        f"the message does not say what is wrong (expected torch's {err.error_regex!r} or a mention of "
        f"{culprits}): {type(exc).__name__}: {msg}")


@pytest.mark.parametrize("err", ERRORS, ids=ERROR_IDS)
def test_error_inputs(err, backend):
    """Construction with an input torch refuses: MGPO refuses it too; where torch only warns (duplicate
    parameters in a group), MGPO warns or refuses, and if it runs, it runs as AdamW does.  An input torch
    refuses only for an implementation flag MGPO ignores (foreach with a tensor lr...) may be accepted: then
    it must be AdamW without that flag."""
    inp = err.optimizer_error_input
    assert err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR  # torch lists no step-time AdamW error on CPU
    kwargs = inp.kwargs
    if issubclass(err.error_type, Warning):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            params = _fresh_params(inp.params)
            try:
                opt = MGPO(params, backend=backend, rho=0.0, **copy.deepcopy(kwargs))
            except (ValueError, TypeError) as exc:  # duplicates may be refused, with a message that says so
                assert "duplicate" in str(exc), f"{type(exc).__name__}: {exc}"
                return
        assert any(issubclass(w.category, err.error_type) and re.search(err.error_regex, str(w.message))
                   for w in caught), [str(w.message) for w in caught]
        ref_params = copy.deepcopy(params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = torch.optim.AdamW(ref_params, **copy.deepcopy(kwargs))
        for _ in range(STEPS):
            g = torch.randn_like(params[0])
            for ps, o in ((params, opt), (ref_params, ref)):
                for p in set(ps):
                    p.grad = g.clone()
                o.step()
        _assert_same_params(params, ref_params, msg="accepted duplicate parameters, vs AdamW:")
        return

    culprits = _culprits(inp.params, kwargs)
    with pytest.raises(err.error_type, match=err.error_regex):  # the input means what torch says it does
        torch.optim.AdamW(_fresh_params(inp.params), **copy.deepcopy(kwargs))
    params = _fresh_params(inp.params)
    try:
        MGPO(params, backend=backend, **copy.deepcopy(kwargs))
    except Exception as exc:  # noqa: BLE001 - the type is checked below
        _check_refusal(exc, err, culprits)
        return
    ignored = [c for c in culprits if c in IMPL_FLAGS]
    assert ignored, f"MGPO accepted an input torch refuses ({inp.desc}: {err.error_regex})"
    # accepted: must be AdamW without the flag MGPO ignores
    model = _mlp()
    ref_model = copy.deepcopy(model)
    opt = _mgpo(model.parameters(), kwargs, backend, rho=0.0)
    ref = torch.optim.AdamW(ref_model.parameters(), **{k: v for k, v in copy.deepcopy(kwargs).items()
                                                       if k not in ignored})
    _train(model, opt, (b := _batches(STEPS)))
    _train(ref_model, ref, b)
    _assert_same_params(model, ref_model, msg=f"accepted {inp.desc}, vs AdamW without {ignored}:")


def _snapshot(model, opt):
    return _params_of(model), copy.deepcopy(opt.state_dict()), len(opt.param_groups)


def _assert_unchanged(model, opt, snap, what):
    params, sd, n_groups = snap
    assert len(opt.param_groups) == n_groups, f"{what}: a param group was added"
    _assert_same_params(model, params, exact=True, msg=f"{what}:")
    _assert_same_tree(opt.state_dict(), sd)


@pytest.mark.parametrize("err", [e for e in ERRORS if e.optimizer_error_input.params is None
                                 and not issubclass(e.error_type, Warning)],
                         ids=[i for i, e in zip(ERROR_IDS, ERRORS) if e.optimizer_error_input.params is None
                              and not issubclass(e.error_type, Warning)])
def test_error_inputs_leave_a_running_optimizer_unchanged(err, backend):
    """The refused hyper-parameters in add_param_group (torch checks them there too), and a refused lr put into
    a group between steps (step() must check it before modifying anything): refused, nothing changed."""
    kwargs = err.optimizer_error_input.kwargs
    model, opt = _setup(BASE[0], backend)
    snap = _snapshot(model, opt)
    extra = nn.Parameter(torch.randn(3))
    ref = torch.optim.AdamW([nn.Parameter(torch.randn(2))])
    try:
        ref.add_param_group({"params": [nn.Parameter(torch.randn(3))], **copy.deepcopy(kwargs)})
        torch_refuses = False
    except Exception:  # noqa: BLE001
        torch_refuses = True
    culprits = _culprits(None, kwargs)
    if torch_refuses:
        try:
            opt.add_param_group({"params": [extra], **copy.deepcopy(kwargs)})
        except Exception as exc:  # noqa: BLE001
            _check_refusal(exc, err, culprits)
            _assert_unchanged(model, opt, snap, "after a refused add_param_group")
        else:
            assert any(c in IMPL_FLAGS for c in culprits), f"add_param_group accepted {kwargs}"
            opt.param_groups.pop()
            opt.state.pop(extra, None)
    lr = kwargs.get("lr")
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.param_groups[0]["lr"] = lr.clone()
        with pytest.raises(ValueError, match="lr"):
            opt.step()
        opt.param_groups[0]["lr"] = snap[1]["param_groups"][0]["lr"]
        _assert_unchanged(model, opt, snap, "after a step refused for its lr")
