"""Theta at rest: the parameters hold theta everywhere except inside a training forward/backward.

Every test compares with an independent run: the float64 reference (f64_reference.F64MGPO, which keeps eps as
explicit tensors) driven by the same data, an uninterrupted MGPO run, or torch's AdamW at rho = 0.
"""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from f64_reference import F64MGPO
from mgpo_kernels import MGPO

OPTS = dict(lr=3e-2, rho=0.05, ema_beta=0.9, weight_decay=0.01)


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batch(t, n=5):
    gen = torch.Generator().manual_seed(1000 + t)
    return torch.randn(n, 6, generator=gen), torch.randn(n, 3, generator=gen)


def loss_of(model, x, y):
    return ((model(x.to(next(model.parameters()).dtype)) - y.to(next(model.parameters()).dtype)) ** 2).mean()


def ref_grads(model, thetas, x, y):
    """float64 gradients of the loss at the given parameter values (an independent forward)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: t.detach().double().clone().requires_grad_(True) for n, t in zip(names, thetas)}
    m64 = copy.deepcopy(model).double()
    out = functional_call(m64, params, (x.double(),))
    loss = ((out - y.double()) ** 2).mean()
    return list(torch.autograd.grad(loss, list(params.values())))


def assert_close(actual, expected, rtol=2e-5, what=""):
    for i, (a, e) in enumerate(zip(actual, expected)):
        a, e = a.detach().double(), e.detach().double()
        err = float((a - e).norm() / (e.norm() + 1e-12))
        assert err <= rtol, f"{what} tensor {i}: relative error {err:.3g}"


def lockstep(model, opt, ref, t):
    """Step t of the model with MGPO (its forward applies eps) and of the float64 reference at its own theta + eps."""
    x, y = batch(t)
    loss_of(model, x, y).backward()
    ref.step(ref_grads(model, ref.perturbed(), x, y))
    opt.step()
    opt.zero_grad()


def train(model, opt, steps, start=0, accum=1):
    for t in range(start, start + steps):
        for k in range(accum):
            x, y = batch(10 * t + k)
            (loss_of(model, x, y) / accum).backward()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("accum", [1, 2])
def test_params_hold_theta_between_steps_and_theta_plus_eps_in_the_forward(backend, accum):
    model = make_model()
    opt = MGPO(model.parameters(), backend=backend, **OPTS)
    ref = F64MGPO(list(model.parameters()), **{k: v for k, v in OPTS.items()})
    seen = []
    model[2].register_forward_pre_hook(lambda mod, args: seen.append([p.detach().clone() for p in model.parameters()]))
    for t in range(6):
        seen.clear()
        grads = None
        for k in range(accum):
            x, y = batch(10 * t + k)
            (loss_of(model, x, y) / accum).backward()
            g = ref_grads(model, ref.perturbed(), x, y)
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        for s in seen:  # every micro-batch's forward saw theta + eps
            assert_close(s, ref.perturbed(), what=f"forward of step {t}")
        assert opt.perturbation_applied == (t > 0)
        opt.step()
        opt.zero_grad()
        ref.step([g / accum for g in grads])
        assert not opt.perturbation_applied
        assert_close(list(model.parameters()), ref.theta, what=f"theta after step {t}")
    assert any(float(e.abs().max()) > 0 for e in ref.pert)  # the test exercised a nonzero eps


def test_rho_zero_is_adamw_with_a_model(backend):
    model, twin = make_model(), make_model()
    opt = MGPO(model.parameters(), backend=backend, **{**OPTS, "rho": 0.0})
    adamw = torch.optim.AdamW(twin.parameters(), lr=OPTS["lr"], weight_decay=OPTS["weight_decay"])
    train(model, opt, 5)
    train(twin, adamw, 5)
    assert_close(list(model.parameters()), list(twin.parameters()), rtol=1e-6)
    assert not opt.perturbation_applied


def test_modules_that_do_not_trigger_the_apply_pass():
    model, other = make_model(), make_model(seed=1)
    opt = MGPO(model.parameters(), **OPTS)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    train(model, opt, 2)
    theta = [p.detach().clone() for p in model.parameters()]
    x, y = batch(99)
    with torch.no_grad():  # a frozen use (teacher, generation)
        model(x)
    model.eval()  # evaluation, even with grad enabled
    loss_of(model, x, y).backward()
    model.train()
    opt.zero_grad()
    loss_of(other, x, y).backward()  # a second model with its own optimizer
    other_opt.step()
    assert not opt.perturbation_applied
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), theta))
    loss_of(model, x, y).backward()  # the training forward
    assert opt.perturbation_applied
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), theta))


def test_activation_checkpointing_recomputes_at_theta_plus_eps(backend):
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    plain, ck = make_model(), Ckpt(make_model())
    o1 = MGPO(plain.parameters(), backend=backend, **OPTS)
    o2 = MGPO(ck.parameters(), backend=backend, **OPTS)
    train(plain, o1, 4)
    train(ck, o2, 4)
    assert_close(list(ck.parameters()), list(plain.parameters()), rtol=1e-6)


def test_raw_tensor_loop_warns_without_apply_and_is_exact_with_it():
    torch.manual_seed(3)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(7, 4)

    def run(apply):
        p = w.detach().clone().requires_grad_(True)
        opt = MGPO([p], **OPTS)
        caught = []
        for _ in range(4):
            if apply:
                opt.apply_perturbation()
            ((x @ p).tanh() ** 2).sum().backward()
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                opt.step()
            caught += [str(r.message) for r in rec]
            opt.zero_grad()
        return p, caught

    p_plain, caught = run(apply=False)
    assert any("apply_perturbation()" in m for m in caught) and len(caught) == 1
    p_ok, caught = run(apply=True)
    assert not caught
    ref = F64MGPO([w], **OPTS)
    for _ in range(4):
        q = ref.perturbed()[0].clone().requires_grad_(True)
        ((x.double() @ q).tanh() ** 2).sum().backward()
        ref.step([q.grad])
    assert_close([p_ok], ref.theta)
    assert not torch.allclose(p_plain, p_ok)


# ---------------------------------------------------------------------------------------------- readers
def test_weight_average_is_of_theta():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = make_model()
    opt = MGPO(model.parameters(), **OPTS)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ref = F64MGPO(list(model.parameters()), **OPTS)
    avg = None
    for t in range(5):
        lockstep(model, opt, ref, t)
        ema.update_parameters(model)  # the first update copies, later ones are the EMA
        avg = [th.clone() for th in ref.theta] if avg is None else [0.9 * a + 0.1 * th for a, th in zip(avg, ref.theta)]
    assert_close(list(ema.module.parameters()), avg, rtol=5e-5)


def test_eval_and_unperturbed_hold_theta():
    model = make_model()
    opt = MGPO(model.parameters(), **OPTS)
    train(model, opt, 2)
    theta = [p.detach().clone() for p in model.parameters()]
    x, y = batch(7)
    loss_of(model, x, y).backward()  # eps applied
    assert opt.perturbation_applied
    with opt.unperturbed():
        assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(model.parameters(), theta))
        loss_of(model, x, y).backward()  # a training forward in eval mode applies nothing
        assert not opt.perturbation_applied
    opt.zero_grad()
    assert opt.training and not opt.perturbation_applied
    loss_of(model, x, y).backward()
    assert opt.perturbation_applied


# ---------------------------------------------------------------------------------------------- writers
def test_a_write_between_steps_is_taken_as_theta(backend):
    """AdaLoRA's update_and_allocate, a pruning, a rollback: the written value is theta."""
    model = make_model()
    opt = MGPO(model.parameters(), backend=backend, **OPTS)
    ref = F64MGPO(list(model.parameters()), **OPTS)
    mask = torch.rand(8, 6) < 0.5
    for t in range(5):
        lockstep(model, opt, ref, t)
        with torch.no_grad():  # prune: the written entries are exactly zero at rest
            model[0].weight[mask] = 0.0
        ref.theta[0][mask] = 0.0
        assert bool((model[0].weight[mask] == 0).all())
    assert_close(list(model.parameters()), ref.theta)


def test_optimizer_reset_does_not_bake_eps_into_theta():
    model, fresh = make_model(), make_model()
    opt = MGPO(model.parameters(), **OPTS)
    train(model, opt, 3)
    opt.state.clear()
    with torch.no_grad():
        for a, b in zip(fresh.parameters(), model.parameters()):
            a.copy_(b)
    opt2 = MGPO(fresh.parameters(), **OPTS)
    opt._gstate.step.zero_(), opt._gstate.gbar.zero_(), opt._gstate.coef.zero_()
    train(model, opt, 3, start=3)
    train(fresh, opt2, 3, start=3)
    assert_close(list(model.parameters()), list(fresh.parameters()), rtol=1e-6)


def test_keep_the_best_rollback_continues_from_the_snapshot(backend):
    model = make_model()
    opt = MGPO(model.parameters(), backend=backend, **OPTS)
    train(model, opt, 3)
    snap = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    train(model, opt, 2, start=3)  # worse: roll back
    model.load_state_dict(snap[0])
    opt.load_state_dict(snap[1])
    train(model, opt, 2, start=10)
    twin = make_model()
    o2 = MGPO(twin.parameters(), backend=backend, **OPTS)
    train(twin, o2, 3)
    train(twin, o2, 2, start=10)
    assert_close(list(model.parameters()), list(twin.parameters()), rtol=1e-6)


# ---------------------------------------------------------------------------------------------- checkpoints
def _first_grad_out_of_order(model, opt, t):
    """Step t of a run where the last layer trains before the first (progressive unfreezing, set_adapter)."""
    x, y = batch(t)
    loss_of(model, x, y).backward()
    if t < 2:
        model[0].weight.grad = None
        model[0].bias.grad = None
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("via", ["same_optimizer", "torch_save_fresh"])
def test_resume_after_out_of_order_first_gradients(backend, via):
    def run(steps, start=0, model=None, opt=None):
        model = model or make_model()
        opt = opt or MGPO(model.parameters(), backend=backend, **OPTS)
        for t in range(start, start + steps):
            _first_grad_out_of_order(model, opt, t)
        return model, opt

    model, opt = run(4)
    if via == "same_optimizer":
        before = [p.detach().clone() for p in model.parameters()]
        opt.load_state_dict(opt.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    else:
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        ck = torch.load(buf, weights_only=True)
        model = make_model(seed=5)
        model.load_state_dict(ck["model"])
        opt = MGPO(model.parameters(), backend=backend, **OPTS)
        opt.load_state_dict(ck["opt"])
    model, _ = run(3, start=4, model=model, opt=opt)
    twin, _ = run(7)
    assert_close(list(model.parameters()), list(twin.parameters()), rtol=1e-6)


def test_load_state_dict_hooks_changes_are_kept():
    model = make_model()
    opt = MGPO(model.parameters(), **OPTS)
    train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())

    def pre(o, d):
        d = copy.deepcopy(d)
        for st in d["state"].values():
            st["exp_avg_sq"] = st["exp_avg_sq"] * 4.0
        return d

    def post(o):
        for st in o.state.values():
            st["exp_avg"].mul_(0.5)

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(sd)
    for i, p in enumerate(model.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], sd["state"][i]["exp_avg"] * 0.5)
        assert torch.equal(opt.state[p]["exp_avg_sq"], sd["state"][i]["exp_avg_sq"] * 4.0)


def test_bf16_weights_loaded_then_optimizer_state(backend):
    model = make_model(dtype=torch.bfloat16)
    opt = MGPO(model.parameters(), backend=backend, **OPTS)
    train(model, opt, 3)
    ck = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, 2, start=3)
    # the same checkpoint's weights, then its optimizer state: exact resume, no warning
    m2 = make_model(seed=9, dtype=torch.bfloat16)
    m2.load_state_dict(ck["model"])
    o2 = MGPO(m2.parameters(), backend=backend, **OPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o2.load_state_dict(ck["opt"])
    assert all(torch.equal(a, b) for a, b in zip(m2.parameters(), ck["model"].values()))
    for p in m2.parameters():
        assert o2.state[p]["exp_avg"].dtype == torch.float32 and o2.state[p]["master_param"].dtype == torch.float32
    train(m2, o2, 2, start=3)
    assert all(torch.equal(a, b) for a, b in zip(m2.parameters(), model.parameters()))
    # the optimizer state first, then the same checkpoint's weights: exact too (the fp32 masters are kept)
    m4 = make_model(seed=10, dtype=torch.bfloat16)
    o4 = MGPO(m4.parameters(), backend=backend, **OPTS)
    o4.load_state_dict(ck["opt"])
    m4.load_state_dict(ck["model"])
    train(m4, o4, 2, start=3)
    assert all(torch.equal(a, b) for a, b in zip(m4.parameters(), model.parameters()))
    # other weights, then the state: the weights are kept as theta (the masters take their values)
    m3 = make_model(seed=11, dtype=torch.bfloat16)
    kept = [p.detach().clone() for p in m3.parameters()]
    o3 = MGPO(m3.parameters(), backend=backend, **OPTS)
    o3.load_state_dict(ck["opt"])
    assert all(torch.equal(a, b) for a, b in zip(m3.parameters(), kept))
    o3.apply_perturbation()
    assert not all(torch.equal(a, b) for a, b in zip(m3.parameters(), kept))
    o3.eval()
    assert all(torch.equal(a, b) for a, b in zip(m3.parameters(), kept))
    assert all(torch.equal(o3.state[p]["master_param"].to(p.dtype), p) for p in m3.parameters())


def test_bf16_weights_written_after_the_optimizer_state_are_theta(backend):
    model = make_model(dtype=torch.bfloat16)
    opt = MGPO(model.parameters(), backend=backend, **OPTS)
    train(model, opt, 3)
    with torch.no_grad():
        model[0].weight[:2] = 0.0  # a write between steps (pruning), or weights loaded after the optimizer state
    x, y = batch(50)
    loss_of(model, x, y).backward()  # applies eps from the written theta
    with opt.unperturbed():
        assert bool((model[0].weight[:2] == 0).all())


def test_state_dict_while_eps_is_applied_warns():
    model = make_model()
    opt = MGPO(model.parameters(), **OPTS)
    train(model, opt, 2)
    x, y = batch(3)
    loss_of(model, x, y).backward()
    with pytest.warns(UserWarning, match="between a training forward and step"):
        opt.state_dict()


def _legacy_0_1_0_dict(opt, model, perturbed_weights: bool):
    """A state dict as mgpo_kernels 0.1.0 wrote it: fingerprints of theta and theta + eps per parameter, the
    model (saved beside it) holding theta + eps when it was saved in train mode."""
    sd = opt.state_dict()
    coef = opt._gstate.coef
    for i, p in enumerate(model.parameters()):
        st = sd["state"][i]
        theta = p.detach().double()
        pert = (p.detach() + st["exp_avg"] * coef).double()
        st["mgpo_fingerprint"] = torch.stack([theta.sum(), theta.square().sum(), pert.sum(), pert.square().sum()])
    del sd["mgpo"]["format"]
    sd["mgpo"]["perturbed"] = perturbed_weights
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    if perturbed_weights:
        for (k, w), p in zip(weights.items(), model.parameters()):
            w.add_(opt.state[p]["exp_avg"] * coef)
    return sd, weights


def test_a_0_1_0_checkpoint_loads_exactly_or_is_refused():
    model = make_model()
    opt = MGPO(model.parameters(), **OPTS)
    train(model, opt, 3)
    sd, weights = _legacy_0_1_0_dict(opt, model, perturbed_weights=True)
    theta = [p.detach().clone() for p in model.parameters()]
    m2 = make_model(seed=4)
    m2.load_state_dict(weights)  # theta + eps, as 0.1.0 saved it
    o2 = MGPO(m2.parameters(), **OPTS)
    o2.load_state_dict(copy.deepcopy(sd))
    assert_close(list(m2.parameters()), theta, rtol=1e-6)  # eps removed: theta at rest
    train(m2, o2, 2, start=3)
    train(model, opt, 2, start=3)
    assert_close(list(m2.parameters()), list(model.parameters()), rtol=1e-6)
    m3 = make_model(seed=8)  # other weights: refused, nothing loaded
    o3 = MGPO(m3.parameters(), **OPTS)
    with pytest.raises(ValueError, match="0.1.0"):
        o3.load_state_dict(copy.deepcopy(sd))
    assert len(o3.state) == 0


# ---------------------------------------------------------------------------------------------- tensor lr
@pytest.mark.parametrize("shape", [(1, 1), (1,)])
def test_tensor_lr_of_any_one_element_shape(backend, shape):
    model, twin = make_model(), make_model()
    opt = MGPO(model.parameters(), backend=backend, **{**OPTS, "lr": torch.full(shape, OPTS["lr"])})
    o2 = MGPO(twin.parameters(), backend=backend, **OPTS)
    train(model, opt, 3)
    train(twin, o2, 3)
    assert_close(list(model.parameters()), list(twin.parameters()), rtol=1e-6)


def test_tensor_lr_with_a_0d_parameter(backend):
    w = torch.randn((), requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    opt = MGPO([w, b], backend=backend, lr=torch.tensor([0.01]))
    (w * b.sum()).backward()
    opt.step()
    assert float(opt.state[w]["step"]) == 1 and float(opt.state[b]["step"]) == 1


def test_a_failing_step_changes_nothing(backend):
    model = make_model()
    opt = MGPO(model.parameters(), backend=backend, **OPTS)
    train(model, opt, 2)
    x, y = batch(5)
    loss_of(model, x, y).backward()
    model[2].bias.grad = torch.zeros(3).to_sparse()  # a sparse gradient: refused
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises((ValueError, RuntimeError)):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    after = opt.state_dict()
    for i in state["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(after["state"][i][k], state["state"][i][k])


# ---------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("what", ["model", "train_step"])
def test_compiled_model_or_training_step_equals_eager(what):
    import torch._dynamo as dynamo

    def run(compiled):
        dynamo.reset()
        model = make_model()
        opt = MGPO(model.parameters(), **OPTS)
        fwd = torch.compile(model, backend="aot_eager") if (compiled and what == "model") else model

        def train_step(x, y):
            loss = ((fwd(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()

        step = torch.compile(train_step, backend="aot_eager") if (compiled and what == "train_step") else train_step
        for t in range(5):
            step(*batch(t))
        return model, opt

    eager, o1 = run(False)
    comp, o2 = run(True)
    assert_close(list(comp.parameters()), list(eager.parameters()), rtol=1e-6)
    assert not o2.perturbation_applied
    assert float(o2.global_state["coef"]) != 0.0


# ---------------------------------------------------------------------------------------------- CUDA (gpu_check.sh)
CUDA_BACKENDS = []
if torch.cuda.is_available():
    from mgpo_kernels import available_backends

    CUDA_BACKENDS = [b for b in available_backends("cuda") if b != "reference"]


@pytest.mark.skipif(not CUDA_BACKENDS, reason="needs a CUDA device (run by benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("backend", CUDA_BACKENDS or ["none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_apply_pass_and_steps_match_the_reference(backend, dtype):
    """The fused apply pass (one launch) and the step's restore on CUDA, against the reference backend."""
    from mgpo_kernels.backends.base import Backend

    runs = {}
    for b in (backend, "reference"):
        model = make_model(dtype=dtype).cuda()
        opt = MGPO(model.parameters(), backend=b, **OPTS)
        for t in range(4):
            x, y = batch(t)
            loss_of(model, x.cuda(), y.cuda()).backward()
            assert opt.perturbation_applied == (t > 0)
            opt.step()
            opt.zero_grad()
        runs[b] = (model, opt)
    model, opt = runs[backend]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(list(model.parameters()), list(runs["reference"][0].parameters()), rtol=tol)
    groups = opt._groups(with_grads=False)
    gen = [p.detach().clone() for p in model.parameters()]
    import dataclasses

    Backend.perturb(None, [dataclasses.replace(groups[0], params=gen)], opt._gstate.coef, apply=True)
    opt.apply_perturbation()
    for p, w in zip(model.parameters(), gen):
        assert torch.equal(p.detach(), w)


def test_a_checkpoint_written_by_0_1_0_continues_the_0_1_0_run():
    """A real 0.1.0 file (python_tests/data/make_0_1_0_checkpoint.py, git 322cd83): model weights saved mid-training
    (theta + eps) and the optimizer state; loaded here in the usual order and continued, it ends where the
    uninterrupted 0.1.0 run ended; loaded into other weights it is refused with nothing loaded."""
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mgpo-0.1.0-checkpoint.pt")
    ck = torch.load(path, weights_only=True)
    assert "mgpo_fingerprint" in ck["opt"]["state"][0]
    model = make_model(seed=3)
    model.load_state_dict(ck["model"])
    opt = MGPO(model.parameters(), lr=3e-2, rho=0.05, weight_decay=0.01, backend="reference")
    opt.load_state_dict(ck["opt"])
    assert not opt.perturbation_applied
    for t in range(3, 6):
        x, y = batch(t)
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    assert_close(list(model.parameters()), ck["theta_after_6"], rtol=1e-6)
    other = make_model(seed=4)
    o2 = MGPO(other.parameters(), lr=3e-2, rho=0.05, weight_decay=0.01)
    with pytest.raises(ValueError, match="0.1.0"):
        o2.load_state_dict(ck["opt"])
    assert len(o2.state) == 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_recomputes_at_theta_plus_eps(reentrant):
    """transformers' gradient checkpointing (reentrant or not) with a PEFT LoRA model: the recomputation inside the
    backward sees the applied eps, so the run equals the one without checkpointing."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def run(ckpt):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        m = LlamaForCausalLM(cfg)
        if ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            m.enable_input_require_grads()
        m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian"))
        m.train()
        opt = MGPO([p for p in m.parameters() if p.requires_grad], lr=1e-2, rho=0.5)
        for t in range(4):
            ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(t))
            m(input_ids=ids, labels=ids).loss.backward()
            assert opt.perturbation_applied == (t > 0)
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in m.parameters() if p.requires_grad]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, ckpt = run(False), run(True)
    assert_close(ckpt, plain, rtol=1e-6)
