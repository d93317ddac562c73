"""Functional MGPO step, in the style of ``torch.optim.adamw.adamw``: for code that keeps its own state (custom
training frameworks, optimizer wrappers).  ``MGPO`` is this plus state allocation, validation, checkpoints and the
forward hook that applies eps just in time.

Theta at rest, by hand: :func:`mgpo` leaves theta_{t+1} in the parameters; call :func:`apply_perturbation` before
the next forward/backward (it adds eps = coef * m), and pass ``perturbed=True`` to the next :func:`mgpo` call, which
removes it in its update.

MGPO's norms are global, so one call takes *every* param group of a step: a call per group (as with torch's
functional adamw) would normalise each group by its own norms and count the step once per group.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from torch import Tensor

from . import _checks
from . import backends as _backends
from .backends.base import GlobalState, GroupTensors, StepConfig

_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps")
_GROUP_KEYS = set(_LISTS) | {"master_params", "lr", "betas", "eps", "weight_decay"}


def init_global_state(device) -> Dict[str, Tensor]:
    """The optimizer-wide scalars MGPO keeps (step, gbar, coef, skipped) as 0-d tensors on ``device``."""
    import torch

    return GlobalState.zeros(torch.device(device)).tensors()


def _group(gi: int, g: Mapping[str, Any]) -> GroupTensors:
    if not isinstance(g, Mapping):
        raise TypeError(
            f"functional.mgpo takes a list of param groups (dicts with {', '.join(_LISTS)}, lr, betas, eps, "
            f"weight_decay), one call for all the groups of a step; group {gi} is a {type(g).__name__}"
        )
    unknown = set(g) - _GROUP_KEYS
    if unknown:
        raise ValueError(f"group {gi}: unknown keys {sorted(unknown)}; a group has {sorted(_GROUP_KEYS)}")
    missing = [k for k in _LISTS if k not in g]
    if missing:
        raise ValueError(f"group {gi} lacks {missing}")
    n = len(g["params"])
    if any(len(g[k]) != n for k in _LISTS):
        raise ValueError(f"group {gi}: {', '.join(_LISTS)} must have the same length")
    masters = list(g["master_params"]) if g.get("master_params") is not None else [None] * n
    if len(masters) != n:
        raise ValueError(f"group {gi}: master_params must have one entry (or None) per parameter")
    lr, betas = g.get("lr", 1e-3), g.get("betas", (0.9, 0.999))
    eps, wd = g.get("eps", 1e-8), g.get("weight_decay", 1e-2)
    _checks.check_group_hparams(lr, betas, eps, wd, f"group {gi}")
    b1, b2 = betas
    return GroupTensors(list(g["params"]), list(g["grads"]), list(g["exp_avgs"]), list(g["exp_avg_sqs"]), masters,
                        list(g["state_steps"]), lr, float(b1), float(b2), float(eps), float(wd))


def mgpo(
    param_groups: Sequence[Mapping[str, Any]],
    global_state: Dict[str, Tensor],
    *,
    rho: float = _checks.OPTION_DEFAULTS["rho"],
    ema_beta: float = _checks.OPTION_DEFAULTS["ema_beta"],
    adaptive_norm: bool = _checks.OPTION_DEFAULTS["adaptive_norm"],
    direction: str = _checks.OPTION_DEFAULTS["direction"],
    max_grad_norm: Optional[float] = _checks.OPTION_DEFAULTS["max_grad_norm"],
    gbar_floor: Optional[float] = _checks.OPTION_DEFAULTS["gbar_floor"],
    perturbed: bool = True,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    reduce_hook: Optional[Callable[[Tensor], None]] = None,
    backend: str = "auto",
) -> None:
    """One MGPO step over all param groups, in place (see README for the equations).

    Each group is a dict: ``params`` (holding theta + coef*m on entry when ``perturbed``: eps was applied by
    :func:`apply_perturbation`; they hold theta_{t+1} on return),
    ``grads`` (entries may be None), ``exp_avgs``, ``exp_avg_sqs`` (fp32), ``state_steps`` (fp32 0-d tensors),
    optional ``master_params`` (the fp32 master of each bf16/fp16 parameter, None for fp32), and ``lr``, ``betas``,
    ``eps``, ``weight_decay`` (torch AdamW's defaults).  ``global_state`` comes from :func:`init_global_state` and
    is updated in place.  ``reduce_hook`` is called on the float64 global sums before they are used (a sharded
    caller all-reduces them there).
    """
    if isinstance(param_groups, Mapping) or not isinstance(param_groups, Sequence) or (
        param_groups and isinstance(param_groups[0], Tensor)
    ):
        raise TypeError(
            "functional.mgpo(param_groups, global_state, ...) takes a list of param-group dicts: MGPO's norms are "
            "global, so every group of a step goes in one call"
        )
    if not param_groups:
        raise ValueError("functional.mgpo got no param groups")
    groups = [_group(gi, g) for gi, g in enumerate(param_groups)]
    for k, v in dict(rho=rho, ema_beta=ema_beta, adaptive_norm=adaptive_norm, direction=direction,
                     max_grad_norm=max_grad_norm, gbar_floor=gbar_floor).items():
        _checks.check_option(k, v)
    missing = [k for k in ("step", "gbar", "coef", "skipped") if k not in global_state]
    if missing:
        raise ValueError(f"global_state lacks {missing}; make it with init_global_state(device)")
    gstate = GlobalState(**{k: global_state[k] for k in ("step", "gbar", "coef", "skipped")})
    cfg = StepConfig(rho=float(rho), ema_beta=float(ema_beta), adaptive_norm=bool(adaptive_norm),
                     sign=_checks.DIRECTIONS[direction], max_grad_norm=max_grad_norm, perturbed=perturbed,
                     grad_scale=grad_scale, found_inf=found_inf, reduce_hook=reduce_hook,
                     gbar_floor=float(gbar_floor or 0.0))
    _backend_for(global_state["step"], backend, groups).step(groups, gstate, cfg)


def apply_perturbation(
    param_groups: Sequence[Mapping[str, Any]], global_state: Dict[str, Tensor], *, apply: bool = True,
    backend: str = "auto",
) -> None:
    """Add eps = coef * m to the parameters (``apply=False``: remove it), in one multi-tensor pass.

    The groups are those of :func:`mgpo` (only ``params``, ``exp_avgs`` and ``master_params`` are read; ``grads``
    may be omitted).  Call it between a :func:`mgpo` call and the next forward; the next :func:`mgpo` call, with
    ``perturbed=True``, removes eps in its update.
    """
    if isinstance(param_groups, Mapping) or not isinstance(param_groups, Sequence) or not param_groups:
        raise TypeError("functional.apply_perturbation(param_groups, global_state) takes a list of param-group dicts")
    groups = []
    for gi, g in enumerate(param_groups):
        g = dict(g)
        g.setdefault("grads", [None] * len(g.get("params", ())))
        g.setdefault("exp_avg_sqs", g.get("exp_avgs", []))
        g.setdefault("state_steps", [None] * len(g.get("params", ())))
        groups.append(_group(gi, g))
    if "coef" not in global_state:
        raise ValueError("global_state lacks 'coef'; make it with init_global_state(device)")
    import torch

    with torch.no_grad():
        _backend_for(global_state["step"], backend, groups).perturb(groups, global_state["coef"], apply=apply)


#: one backend instance per global state (keyed by its step tensor), as one MGPO has one: the fused backends keep
#: per-instance tables that later calls of the same run reuse (and that a captured CUDA graph keeps reading)
_INSTANCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _backend_for(step: Tensor, name: str, groups: List[GroupTensors]):
    """The backend of this global state, resolved as ``MGPO`` resolves it (``backends.resolve``: "auto" also
    skips a backend that refuses one of the parameters' layouts, saying so once)."""
    held = _INSTANCES.get(step)
    if held is None or held[0] != name:
        held = (name, _backends.resolve(name, step.device, [{"params": g.params} for g in groups]))
        _INSTANCES[step] = held
    return held[1]


__all__: List[str] = ["init_global_state", "mgpo", "apply_perturbation"]
