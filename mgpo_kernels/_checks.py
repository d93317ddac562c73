"""Every check of MGPO's inputs: hyper-parameters, options, AdamW flags, parameters and gradients; and, from the
checked values, a new param group and a step's configuration, and the warnings about a step taken at theta.

Each check raises before anything is modified and names the value at fault, so a refused call leaves the
parameters and the optimizer state as they were.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Iterable

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DIRECTIONS = {"momentum": 1.0, "-momentum": -1.0}

#: MGPO's own options, kept in every param group (as schedule-free keeps its own), so they reach MGPO through any
#: wrapper that forwards ``param_groups`` and a scheduler can drive them.  They are global (the norms are): every
#: group must hold the same value.
OPTION_DEFAULTS: Dict[str, Any] = dict(rho=0.05, ema_beta=0.9, adaptive_norm=True, direction="momentum",
                                       max_grad_norm=None, gbar_floor=0.1)
OPTION_NAMES = tuple(OPTION_DEFAULTS)
#: the mode, also in every param group: True in train mode (a training forward applies eps); the name is 0.1.0's
MODE_KEY = "perturbed"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_lr(lr, where: str = "") -> None:
    at = f" ({where})" if where else ""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid lr{at}: a tensor lr must have exactly one element, got shape {tuple(lr.shape)}")
        if lr.is_complex() or not (lr.is_floating_point() or lr.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"Invalid lr{at}: a tensor lr must be real, got dtype {lr.dtype}")
        v = float(lr.detach().reshape(()).cpu()) if lr.device.type == "cpu" else None
    else:
        v = lr
        if not _is_number(v):
            raise ValueError(f"Invalid learning rate lr={lr!r}{at}: must be a finite number >= 0")
    if v is not None and (not math.isfinite(v) or v < 0):
        raise ValueError(f"Invalid learning rate lr={lr!r}{at}: must be a finite number >= 0")


def check_group_hparams(lr, betas, eps, weight_decay, where: str = "") -> None:
    check_lr(lr, where)
    at = f" ({where})" if where else ""
    if not _is_number(eps) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"Invalid eps={eps!r}{at}: must be a finite number > 0")
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"Invalid betas={betas!r}{at}: must be a pair (beta1, beta2)") from None
    if isinstance(b1, Tensor) != isinstance(b2, Tensor):
        raise ValueError(f"Invalid betas={betas!r}{at}: betas must be either both floats or both Tensors (as torch's)")
    for name, b in (("betas[0]", b1), ("betas[1]", b2)):
        if isinstance(b, Tensor) and b.numel() == 1:
            b = float(b)
        if not _is_number(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid {name}={b!r}{at}: must be in [0, 1)")
    if not _is_number(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"Invalid weight_decay={weight_decay!r}{at}: must be a finite number >= 0")


UNSUPPORTED_ADAMW_FLAGS = {
    "amsgrad": "MGPO's update is the paper's AdamW; AMSGrad's max of second moments is not implemented",
    "maximize": "MGPO minimises; negate the loss to maximise",
    "differentiable": "MGPO's step is not differentiable (fused kernels)",
}


def check_adamw_flags(flags: Dict[str, Any], where: str) -> None:
    """torch.optim.AdamW's flags, accepted for drop-in use: amsgrad, maximize and differentiable must be
    False/None; foreach, fused and capturable only choose how AdamW runs, which the backend decides here."""
    for name, why in UNSUPPORTED_ADAMW_FLAGS.items():
        if flags.get(name):
            raise ValueError(f"{where}: {name}={flags[name]!r} is not supported ({why})")


def check_option(name: str, value) -> None:
    if name == "rho":
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"Invalid rho={value!r}: must be a finite number >= 0")
    elif name == "ema_beta":
        if not _is_number(value) or not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid ema_beta={value!r}: must be in [0, 1)")
    elif name == "adaptive_norm":
        if not isinstance(value, bool):
            raise ValueError(f"Invalid adaptive_norm={value!r}: must be True or False")
    elif name == "direction":
        if not isinstance(value, str) or value not in DIRECTIONS:
            raise ValueError(f"Invalid direction={value!r}: valid directions are {', '.join(map(repr, DIRECTIONS))}")
    elif name == "max_grad_norm":
        if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
            raise ValueError(f"Invalid max_grad_norm={value!r}: must be None or a finite number > 0")
    elif name == "gbar_floor":
        if value is not None and (not _is_number(value) or not math.isfinite(value) or value < 0):
            raise ValueError(f"Invalid gbar_floor={value!r}: must be None (the paper's unbounded formula) or a "
                             "finite number >= 0")
    else:  # pragma: no cover - internal
        raise KeyError(name)


def global_options(param_groups) -> Dict[str, Any]:
    """MGPO's options as the param groups hold them now: checked, and the same in every group."""
    g0 = param_groups[0]
    vals = {k: g0.get(k, OPTION_DEFAULTS[k]) for k in OPTION_NAMES}
    for k, v in vals.items():
        check_option(k, v)
    for gi, g in enumerate(param_groups[1:], 1):
        for k, v0 in vals.items():
            v = g.get(k, v0)
            if v != v0 or isinstance(v, bool) != isinstance(v0, bool):
                raise ValueError(
                    f"param group {gi} has {k}={v!r} but group 0 has {k}={v0!r}: MGPO's options are global (its "
                    f"norms are), set the same value in every group: for g in opt.param_groups: g[{k!r}] = ..."
                )
    return vals


def check_param_list(params: Iterable[Tensor], gi: int, devices: set) -> None:
    """Floating dtype we support, one device overall (``devices`` accumulates), no parameter twice."""
    seen = set()
    for pi, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"MGPO params must be tensors; param {pi} of group {gi} is a {type(p).__name__}")
        if id(p) in seen:
            raise ValueError(
                f"param {pi} of group {gi} appears twice in the group: MGPO refuses duplicate parameters (torch "
                "warns and updates such a parameter twice per step); list each parameter once"
            )
        seen.add(id(p))
        if not p.is_floating_point():
            raise TypeError(
                f"MGPO needs floating-point parameters; param {pi} of group {gi} has dtype {p.dtype}"
                + (" (complex parameters are not supported)" if p.is_complex() else "")
            )
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"MGPO supports float32, bfloat16 and float16 parameters; param {pi} of group {gi} has dtype {p.dtype}"
            )
        if devices and p.device not in devices:
            raise ValueError(
                "MGPO needs all parameters on one device (its norms are global); got "
                f"{sorted(map(str, devices | {p.device}))}"
            )
        devices.add(p.device)


def check_params(param_groups, empty_device=None) -> torch.device:
    devices: set = set()
    for gi, group in enumerate(param_groups):
        check_param_list(group["params"], gi, devices)
    if not devices:
        if empty_device is not None:
            return torch.device(empty_device)
        raise ValueError("MGPO got no parameters")
    return next(iter(devices))


def check_step_lrs(param_groups) -> None:
    """A group's lr may be replaced between steps (schedulers, users): it must still be one number."""
    for gi, g in enumerate(param_groups):
        lr = g["lr"]
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError(f"Invalid lr of param group {gi}: a tensor lr must have exactly one element, got shape "
                             f"{tuple(lr.shape)}")


def validate_grads(param_groups, device: torch.device) -> None:
    """Every check of a step's gradients, before anything is modified (one cheap test per parameter; the detailed
    checks with their messages only for a parameter that fails it)."""
    strided = torch.strided
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            gr = p.grad
            if p.device == device and p.dtype in SUPPORTED_DTYPES and (
                gr is None
                or (gr.layout == strided and gr.dtype == p.dtype and gr.shape == p.shape and gr.device == device)
            ):
                continue
            explain_bad_param(gi, pi, p, device)


def explain_bad_param(gi: int, pi: int, p: Tensor, device: torch.device) -> None:
    if p.device != device:
        raise ValueError(
            f"MGPO needs all parameters on one device: param {pi} of group {gi} is on {p.device}, "
            f"the optimizer's state is on {device}"
        )
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"MGPO supports float32, bfloat16 and float16 parameters; param {pi} of group {gi} has dtype {p.dtype}"
        )
    gr = p.grad
    if gr.is_sparse or gr.layout != torch.strided:
        raise RuntimeError(f"MGPO does not support sparse gradients (param {pi} of group {gi})")
    if gr.is_complex():
        raise RuntimeError(f"MGPO does not support complex gradients (param {pi} of group {gi})")
    if gr.dtype != p.dtype:
        raise TypeError(
            f"gradient dtype {gr.dtype} does not match parameter dtype {p.dtype} (param {pi} of group {gi})"
        )
    if gr.shape != p.shape:
        raise ValueError(
            f"gradient shape {tuple(gr.shape)} does not match parameter shape {tuple(p.shape)} "
            f"(param {pi} of group {gi})"
        )
    if gr.device != p.device:
        raise ValueError(f"gradient on {gr.device} but parameter on {p.device} (param {pi} of group {gi})")


def check_global_scalar(name: str, value, where: str) -> None:
    """A loaded optimizer-wide scalar (step, gbar, coef, skipped): one finite number, counts whole and >= 0."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{where}: {name} must be a 0-d tensor or a number, got shape {tuple(value.shape)}")
        if value.is_complex():
            raise ValueError(f"{where}: {name} must be real, got dtype {value.dtype}")
        v = float(value.detach().reshape(()).double().cpu())
    elif _is_number(value):
        v = float(value)
    else:
        raise ValueError(f"{where}: {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{where}: {name}={v} is not finite; the checkpoint is corrupt")
    if name in ("step", "skipped") and (v < 0 or v != int(v)):
        raise ValueError(f"{where}: {name}={v} must be a whole count >= 0")
    if name == "gbar" and v < 0:
        raise ValueError(f"{where}: gbar={v} must be >= 0 (it is an average of norms)")


# ---------------------------------------------------------------------------------------------- MGPO's own checks
def check_constructor(lr, betas, eps, weight_decay, options: Dict[str, Any], backend: str, backend_names,
                      distributed: str, distributed_modes, flags: Dict[str, Any]) -> None:
    """Every argument of ``MGPO(...)`` but the parameters."""
    check_group_hparams(lr, betas, eps, weight_decay)
    check_adamw_flags(flags, "MGPO")
    for k, v in options.items():
        check_option(k, v)
    if backend != "auto" and backend not in backend_names:
        raise ValueError(f"unknown backend {backend!r}; valid backends are {', '.join(('auto',) + backend_names)}")
    if distributed not in distributed_modes:
        raise ValueError(f"Invalid distributed={distributed!r}: valid values are "
                         f"{', '.join(map(repr, distributed_modes))}")


def new_group(opt, param_group: dict) -> dict:
    """A param group as ``MGPO.add_param_group`` adds it: the options and the mode of the optimizer's groups (they
    are global), the defaults, then every value and parameter checked.  A set of parameters is left to torch to
    refuse (it is unordered)."""
    g = dict(param_group)
    params = g["params"]
    if isinstance(params, set):
        return g
    g["params"] = [params] if isinstance(params, Tensor) else list(params)
    # (name, tensor) pairs, as from named_parameters(): torch splits the names off; the tensors are checked
    tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in g["params"]]
    if opt.param_groups:  # options and mode are global: a new group takes the optimizer's current ones
        for k in OPTION_NAMES + (MODE_KEY,):
            g.setdefault(k, opt.param_groups[0].get(k, opt.defaults.get(k)))
    for k, v in opt.defaults.items():
        g.setdefault(k, v)
    check_group_hparams(g["lr"], g["betas"], g["eps"], g["weight_decay"], "param group")
    check_adamw_flags(g, "param group")
    for k in OPTION_NAMES:
        check_option(k, g[k])
    check_param_list(tensors, len(opt.param_groups), {opt._device} if "_device" in opt.__dict__ else set())
    return g


def step_config(opt, hook, perturbed: bool = False):
    """The step's ``StepConfig`` from the optimizer's groups (options checked equal in every group, lrs checked),
    GradScaler's inputs (``opt.grad_scale``/``found_inf``, set by ``GradScaler.step``) and the all-reduce ``hook``;
    ``perturbed``: the parameters hold theta + eps (a training forward applied it)."""
    from .backends.base import StepConfig

    o = global_options(opt.param_groups)
    check_step_lrs(opt.param_groups)
    return StepConfig(
        rho=float(o["rho"]), ema_beta=float(o["ema_beta"]), adaptive_norm=o["adaptive_norm"],
        sign=DIRECTIONS[o["direction"]],
        max_grad_norm=None if o["max_grad_norm"] is None else float(o["max_grad_norm"]),
        perturbed=perturbed, grad_scale=getattr(opt, "grad_scale", None), found_inf=getattr(opt, "found_inf", None),
        reduce_hook=hook, gbar_floor=float(o["gbar_floor"] or 0.0))


def reduce_hook(opt):
    """The all-reduce of the global sums this step needs (FSDP2, a sharded optimizer), or None; the layout of the
    parameters over the processes is decided once, at the first step (``_distributed.detect_layout``)."""
    from . import _distributed

    if torch.compiler.is_compiling():
        return _distributed.reduce_hook(opt.param_groups, "local", opt._process_group)
    layout = opt.__dict__.get("_layout_decided")
    if layout is None:
        layout = _distributed.detect_layout(opt.param_groups, opt._device, opt._distributed_mode, opt._process_group)
        opt.__dict__["_layout_decided"] = layout
    return _distributed.reduce_hook(opt.param_groups, layout, opt._process_group)


def warn_eval_step(opt) -> None:
    if not opt.__dict__.get("_warned_eval_step") and not torch.compiler.is_compiling():
        opt.__dict__["_warned_eval_step"] = True
        warnings.warn(
            "MGPO.step() was called in eval mode: the gradients were taken at theta and no perturbation is "
            "applied, so this is a plain AdamW step, and so is every step until train() is called. Call "
            "opt.train() (or leave `with opt.unperturbed():`) before the next forward pass.",
            stacklevel=5,  # the caller of step(), through torch's step wrapper and no_grad
        )


def warn_missed_apply(opt) -> None:
    rest = opt._at_rest
    if rest.armed and not rest.applied and not rest.warned_missed and not torch.compiler.is_compiling():
        rest.warned_missed = True
        warnings.warn(
            "MGPO.step(): no training forward applied the perturbation since the last step (no module holding "
            "MGPO's parameters was called in training mode with grad enabled), so this gradient was taken at "
            "theta and this is a plain AdamW step. A loop that computes the loss without calling the model as "
            "an nn.Module (raw tensors, a functional_call) must call opt.apply_perturbation() before its "
            "forward; a loop that trains with the model in eval mode should call model.train().",
            stacklevel=4,  # the caller of step(), through torch's step wrapper and no_grad
        )
