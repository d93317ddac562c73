"""Functional MGPO step, in the style of ``torch.optim.adamw.adamw``: for code that keeps its own state (custom
training frameworks, optimizer wrappers).  ``MGPO`` is this plus state allocation, validation and checkpoints.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch
from torch import Tensor

from . import backends as _backends
from .backends.base import GlobalState, GroupTensors, StepConfig

_DIRECTIONS = {"momentum": 1.0, "-momentum": -1.0}


def init_global_state(device) -> Dict[str, Tensor]:
    """The optimizer-wide scalars MGPO keeps (step, gbar, coef, skipped) as 0-d tensors on ``device``."""
    return GlobalState.zeros(torch.device(device)).tensors()


def mgpo(
    params: List[Tensor],
    grads: List[Optional[Tensor]],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    state_steps: List[Tensor],
    global_state: Dict[str, Tensor],
    *,
    master_params: Optional[List[Optional[Tensor]]] = None,
    lr: Union[float, Tensor] = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    rho: float = 0.05,
    ema_beta: float = 0.9,
    adaptive_norm: bool = True,
    direction: str = "momentum",
    max_grad_norm: Optional[float] = None,
    perturbed: bool = True,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    backend: str = "auto",
) -> None:
    """One MGPO step over one group of tensors, in place (see README for the equations).

    ``params`` hold theta + coef*m on entry when ``perturbed`` (train mode); exp_avgs/exp_avg_sqs are fp32;
    ``master_params[i]`` is the fp32 master of a bf16/fp16 parameter (None for fp32); ``grads[i]`` may be None.
    ``global_state`` comes from :func:`init_global_state` and is updated in place.
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"Invalid direction={direction!r}: valid directions are {', '.join(map(repr, _DIRECTIONS))}")
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == n):
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length")
    masters = list(master_params) if master_params is not None else [None] * n
    gstate = GlobalState(**{k: global_state[k] for k in ("step", "gbar", "coef", "skipped")})
    device = gstate.step.device
    group = GroupTensors(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), masters, list(state_steps),
                         lr, beta1, beta2, eps, weight_decay)
    cfg = StepConfig(rho=float(rho), ema_beta=float(ema_beta), adaptive_norm=bool(adaptive_norm),
                     sign=_DIRECTIONS[direction], max_grad_norm=max_grad_norm, perturbed=perturbed,
                     grad_scale=grad_scale, found_inf=found_inf)
    _backends.resolve(backend, device).step([group], gstate, cfg)
