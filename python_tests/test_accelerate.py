"""MGPO in your own accelerate loop (accelerate 1.x, CPU): checkpoints, prepare(), accumulation, clipping, wrappers.

Every resume test compares against an uninterrupted run built from fresh model/optimizer/Accelerator objects.
"""
from __future__ import annotations

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
safetensors_torch = pytest.importorskip("safetensors.torch")

from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from mgpo_kernels import MGPO  # noqa: E402
from mgpo_kernels.integrations.common import check_wrapper_options, find_mgpo  # noqa: E402

BACKEND = "reference"  # the wrappers are backend-agnostic; the kernels are tested elsewhere
KW = dict(lr=1e-2, rho=0.05, ema_beta=0.9, weight_decay=0.01, backend=BACKEND)
D_IN, D_OUT, MICRO = 12, 5, 8


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 24), torch.nn.Tanh(), torch.nn.Linear(24, D_OUT))


def batch(k: int, n: int = MICRO):
    """Micro-batch number ``k``: the same data whatever run or process asks for it."""
    g = torch.Generator().manual_seed(1000 + k)
    x = torch.randn(n, D_IN, generator=g)
    y = torch.randn(n, D_OUT, generator=g)
    return x, y


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def fresh_accelerator(**kw) -> Accelerator:
    """A new Accelerator as a new process would have it (accelerate keeps its state in process-wide singletons)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=True, **kw)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_same_run(model_a, opt_a, model_b, opt_b, tol=1e-6):
    """Weights (as they are now, both in the same mode) and moments to ``tol`` relative, same global step."""
    ma, mb = find_mgpo(opt_a), find_mgpo(opt_b)
    assert ma.training == mb.training
    for (n, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert rel(pa.detach(), pb.detach()) <= tol, (n, rel(pa.detach(), pb.detach()))
        for key in ("exp_avg", "exp_avg_sq"):
            assert rel(ma.state[pa][key], mb.state[pb][key]) <= tol, (n, key)
    ga, gb = ma.global_state, mb.global_state
    assert int(ga["step"]) == int(gb["step"])
    for key in ("gbar", "coef"):
        assert rel(ga[key], gb[key]) <= tol, key


def train(accelerator, model, opt, sched, start: int, stop: int, accum: int = 1, clip=None):
    """Optimizer steps ``start``..``stop-1`` of accelerate's documented accumulate loop; returns the pre-clip
    gradient norms that ``accelerator.clip_grad_norm_`` reported."""
    model.train()
    norms = []
    for k in range(start * accum, stop * accum):
        x, y = batch(k)
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model, x, y))
            if clip is not None and accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), clip)))
            opt.step()
            sched.step()
            opt.zero_grad()
    return norms


def build(seed: int, accum: int = 1, **mgpo_kw):
    acc = fresh_accelerator(gradient_accumulation_steps=accum)
    model = make_model(seed)
    opt = MGPO(model.parameters(), **{**KW, **mgpo_kw})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    model, opt, sched = acc.prepare(model, opt, sched)
    return acc, model, opt, sched


# ------------------------------------------------------------------------------------------ save_state / load_state
@pytest.mark.parametrize("accum, unperturbed_save", [(1, False), (2, False), (2, True)])
def test_save_state_load_state_resume_matches_uninterrupted(tmp_path, accum, unperturbed_save):
    """As accelerate's docs show (mid-training), or inside unperturbed(): the saved model holds theta (theta at
    rest), and the checkpoint continues the uninterrupted run."""
    steps, cut = 8, 4
    acc, model, opt, sched = build(seed=0, accum=accum)
    train(acc, model, opt, sched, 0, steps, accum)
    full = (model, opt)

    acc, model, opt, sched = build(seed=0, accum=accum)
    train(acc, model, opt, sched, 0, cut, accum)
    assert find_mgpo(opt).training and not find_mgpo(opt).perturbation_applied
    theta_at_cut = [p.detach().clone() for p in model.parameters()]
    if unperturbed_save:
        with find_mgpo(opt).unperturbed():
            acc.save_state(str(tmp_path / "ckpt"))
    else:
        acc.save_state(str(tmp_path / "ckpt"))
    # the test can tell theta from theta + eps: the next training forward moves the parameters
    with torch.no_grad():
        eps = [find_mgpo(opt).global_state["coef"] * find_mgpo(opt).state[p]["exp_avg"] for p in model.parameters()]
    assert max(rel(q + e, q) for q, e in zip(theta_at_cut, eps)) > 1e-3
    saved = safetensors_torch.load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for (n, _), q in zip(model.named_parameters(), theta_at_cut):
        assert rel(saved[n], q) <= 1e-7, n

    # a new process: new objects, other random weights; everything must come from the checkpoint
    acc, model, opt, sched = build(seed=123, accum=accum)
    acc.load_state(str(tmp_path / "ckpt"))
    assert find_mgpo(opt).training
    for p, q in zip(model.parameters(), theta_at_cut):
        assert rel(p.detach(), q) <= 1e-7
    assert sched.scheduler.last_epoch == cut
    train(acc, model, opt, sched, cut, steps, accum)
    assert_same_run(model, opt, *full)


def make_lora_model(seed: int) -> torch.nn.Module:
    """LoRA adapters (B starts at zero, PEFT's default) on the MLP's two linear layers."""
    peft = pytest.importorskip("peft")
    base = make_model(seed)
    for p in base.parameters():
        p.requires_grad_(False)
    return peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))


@pytest.mark.parametrize("lora", [False, True])
def test_prepare_on_optimizer_with_state_keeps_theta(lora):
    """AcceleratedOptimizer.__init__ round-trips state_dict() -> load_state_dict() (device placement): the
    parameters stay theta, and the next training forward still applies eps."""
    model = make_lora_model(0) if lora else make_model(0)
    opt = MGPO([p for p in model.parameters() if p.requires_grad], **KW)
    for k in range(3):
        opt.zero_grad()
        loss_fn(model, *batch(k)).backward()
        opt.step()
    theta = [p.detach().clone() for p in model.parameters()]
    acc = fresh_accelerator()
    pmodel, wrapped = acc.prepare(model, opt)
    assert isinstance(wrapped, AcceleratedOptimizer) and find_mgpo(wrapped) is opt and opt.training
    for p, q in zip(pmodel.parameters(), theta):
        assert rel(p.detach(), q) <= 1e-7
    loss_fn(pmodel, *batch(5)).backward()
    assert opt.perturbation_applied
    assert max(rel(p.detach(), q) for p, q in zip(pmodel.parameters(), theta)) > 1e-4


def test_load_checkpoint_by_hand_then_prepare_continues_the_run(tmp_path):
    """The other order users write: theta and the optimizer state loaded before prepare()."""
    steps, cut = 7, 3
    ref = make_model(0)
    ref_opt = MGPO(ref.parameters(), **KW)
    for k in range(steps):
        ref_opt.zero_grad()
        loss_fn(ref, *batch(k)).backward()
        ref_opt.step()

    model = make_model(0)
    opt = MGPO(model.parameters(), **KW)
    for k in range(cut):
        opt.zero_grad()
        loss_fn(model, *batch(k)).backward()
        opt.step()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")  # theta at rest

    model = make_model(7)
    opt = MGPO(model.parameters(), **KW)
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    acc = fresh_accelerator()
    model, wrapped = acc.prepare(model, opt)
    for k in range(cut, steps):
        wrapped.zero_grad()
        acc.backward(loss_fn(model, *batch(k)))
        wrapped.step()
    assert_same_run(model, wrapped, ref, ref_opt)


# ------------------------------------------------------------------------------------------ accumulate, clipping
def test_accumulate_loop_equals_one_step_on_the_whole_batch():
    """accelerator.accumulate(model) with 2 micro-batches: one MGPO step per window, both micro-batches evaluated at
    the same perturbed point, the same result as one step on the concatenated batch."""
    steps = 5
    acc, model, opt, sched = build(seed=0, accum=2)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append([p.detach().clone() for p in m.parameters()]))
    train(acc, model, opt, sched, 0, steps, accum=2)
    assert int(find_mgpo(opt).global_state["step"]) == steps
    for w in range(steps):  # the two forwards of a window see the same (perturbed) weights
        for a, b in zip(seen[2 * w], seen[2 * w + 1]):
            assert torch.equal(a, b)

    ref = make_model(0)
    ref_opt = MGPO(ref.parameters(), **KW)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    for w in range(steps):
        (x0, y0), (x1, y1) = batch(2 * w), batch(2 * w + 1)
        ref_opt.zero_grad()
        loss_fn(ref, torch.cat([x0, x1]), torch.cat([y0, y1])).backward()
        ref_opt.step()
        ref_sched.step()
    assert_same_run(model, opt, ref, ref_opt, tol=1e-5)


def test_accelerator_clip_grad_norm_equals_fused_max_grad_norm():
    """clip_grad_norm_ before step() (accelerate's loop) == MGPO(max_grad_norm=c) without it: both clip the raw
    gradient with torch's formula and MGPO's gbar sees the clipped norm either way."""
    c, steps = 0.05, 6
    acc, m1, o1, s1 = build(seed=0, accum=2)
    norms = train(acc, m1, o1, s1, 0, steps, accum=2, clip=c)
    assert len(norms) == steps and min(norms) > 2 * c, norms  # clipping is active in every step
    acc, m2, o2, s2 = build(seed=0, accum=2, max_grad_norm=c)
    train(acc, m2, o2, s2, 0, steps, accum=2)
    assert_same_run(m1, o1, m2, o2, tol=2e-5)
    # without clipping the runs differ: the comparison above can fail
    acc, m3, o3, s3 = build(seed=0, accum=2)
    train(acc, m3, o3, s3, 0, steps, accum=2)
    assert max(rel(a.detach(), b.detach()) for a, b in zip(m3.parameters(), m2.parameters())) > 1e-3


def _scaled_run(clip_outside: bool, inf_at: int, steps: int = 6, c: float = 0.05):
    """AcceleratedOptimizer(MGPO, scaler=GradScaler) as accelerate builds it for fp16 on a GPU, driven on the CPU."""
    fresh_accelerator()
    model = make_model(0)
    opt = MGPO(model.parameters(), **KW, max_grad_norm=None if clip_outside else c)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    wrapped = AcceleratedOptimizer(opt, scaler=scaler)
    skipped = []
    for k in range(steps):
        wrapped.zero_grad()
        scaler.scale(loss_fn(model, *batch(k))).backward()
        if k == inf_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        if clip_outside:  # what accelerator.clip_grad_norm_ does under fp16: unscale_, then torch's clip
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), c)
        wrapped.step()
        skipped.append(wrapped.step_was_skipped)
    return model, wrapped, skipped


def test_grad_scaler_unscale_and_clip_equals_fused_and_skips_overflow():
    m1, o1, sk1 = _scaled_run(clip_outside=True, inf_at=3)
    m2, o2, sk2 = _scaled_run(clip_outside=False, inf_at=3)
    # MGPO skips the overflow step inside its own step() (as torch's fused AdamW does); accelerate's
    # step_was_skipped only knows that step() was called, so it reports False and AcceleratedScheduler still steps
    assert not any(sk1) and not any(sk2)
    assert find_mgpo(o1).skipped_steps == find_mgpo(o2).skipped_steps == 1
    assert int(find_mgpo(o1).global_state["step"]) == 5
    assert not hasattr(find_mgpo(o1), "grad_scale")  # GradScaler removes what it set
    assert_same_run(m1, o1, m2, o2, tol=2e-5)


# ------------------------------------------------------------------------------------------ through the wrapper
def test_mode_and_options_through_accelerated_optimizer():
    acc, model, wrapped, sched = build(seed=0)
    train(acc, model, wrapped, sched, 0, 3)
    mgpo = find_mgpo(wrapped)
    theta = [p.detach().clone() for p in model.parameters()]
    loss_fn(model, *batch(40)).backward()  # a training forward applies eps
    assert mgpo.perturbation_applied
    pert = [p.detach().clone() for p in model.parameters()]
    assert max(rel(a, b) for a, b in zip(pert, theta)) > 1e-3
    wrapped.eval()  # removes it: theta
    assert not mgpo.training and not mgpo.perturbation_applied
    for p, q in zip(model.parameters(), theta):
        assert rel(p.detach(), q) <= 1e-6
    loss_fn(model, *batch(41)).backward()  # eval mode: nothing applied
    assert not mgpo.perturbation_applied
    wrapped.train()
    assert mgpo.training and not mgpo.perturbation_applied
    with find_mgpo(wrapped).unperturbed():
        for p, q in zip(model.parameters(), theta):
            assert rel(p.detach(), q) <= 1e-6
    assert mgpo.training
    wrapped.zero_grad()
    # the same run from here on as without the detour (its gradients were dropped, eps applied again)
    ref_acc, ref_model, ref_opt, ref_sched = build(seed=0)
    train(ref_acc, ref_model, ref_opt, ref_sched, 0, 3)
    assert_same_run(model, wrapped, ref_model, ref_opt, tol=1e-6)

    # options through param_groups reach MGPO: the run equals one built with the new value from that step on
    ref_acc, ref_model, ref_opt, ref_sched = build(seed=0)
    train(ref_acc, ref_model, ref_opt, ref_sched, 0, 3)
    for g in wrapped.param_groups:
        g["rho"] = 0.2
    assert mgpo.rho == 0.2
    find_mgpo(ref_opt).rho = 0.2
    train(acc, model, wrapped, sched, 3, 5)
    train(ref_acc, ref_model, ref_opt, ref_sched, 3, 5)
    assert_same_run(model, wrapped, ref_model, ref_opt, tol=1e-6)
    no_change = build(seed=0)
    train(*no_change, 0, 5)
    assert max(rel(a.detach(), b.detach()) for a, b in zip(no_change[1].parameters(), model.parameters())) > 1e-4


def test_option_set_on_the_wrapper_does_not_look_accepted():
    from mgpo_kernels.integrations.hf import MGPOCallback

    _, _, wrapped, _ = build(seed=0)
    check_wrapper_options(wrapped)  # nothing set: fine
    wrapped.rho = 0.3  # an attribute of AcceleratedOptimizer; MGPO never reads it
    assert find_mgpo(wrapped, check_options=False).rho == KW["rho"]
    with pytest.raises(AttributeError, match=r"rho.*param_groups"):
        find_mgpo(wrapped)  # where MGPO can check, the stray attribute is refused
    with pytest.raises(AttributeError, match=r"rho.*param_groups"):
        check_wrapper_options(wrapped)
    with pytest.raises(AttributeError, match="AcceleratedOptimizer"):
        MGPOCallback().on_train_begin(None, None, None, optimizer=wrapped)
    with pytest.raises(AttributeError, match="rho"):
        MGPOCallback().on_step_begin(None, None, None, optimizer=wrapped)
    del wrapped.rho
    wrapped.max_grad_norm = 1.0
    with pytest.raises(AttributeError, match="max_grad_norm"):
        check_wrapper_options(wrapped)
