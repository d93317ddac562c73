"""The step plan: one step's tensors and hyper-parameters as the fused backends' ops take them.

Both fused backends (``cpp``: ``torch.ops.mgpo.*`` of csrc/; ``triton``: the custom ops of triton.py) take the
same argument list, in this order (csrc/step_plan.h says what each is)::

    params, grads, exp_avgs, exp_avg_sqs, masters, master_index, steps, group_sizes, hyper, lr_tensors,
    gstate, grad_scale, found_inf

``hyper`` is one float64 CPU table: the optimizer-wide options (``HYPER_OPTIONS``), then ``HYPER_PER_GROUP``
values per group; a float lr is in the table, a tensor lr in ``lr_tensors`` (read on the device at every step).
A :class:`PlanCache` keeps the flattened lists while the optimizer passes the same (cached) group lists, and the
table while the hyper-parameters do not change, so a steady training loop builds neither; a backend that holds the
persistent lists on its side (the cpp backend's ``_C.KeptPlan``) keeps that held copy in it too, under the same
rule.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional

import torch
from torch import Tensor

from .base import GlobalState, GroupTensors, StepConfig

#: The table's layout (csrc/step_plan.h: HyperOption, HyperGroup; a test compares them).
HYPER_OPTIONS = ("rho", "ema_beta", "adaptive_norm", "sign", "has_max_grad_norm", "max_grad_norm", "perturbed",
                 "gbar_floor")
HYPER_PER_GROUP = ("lr", "beta1", "beta2", "eps", "weight_decay")

#: What a step writes (the others are read only): params, exp_avgs, exp_avg_sqs, masters, steps, gstate.
PLAN_MUTATES = ("params", "exp_avgs", "exp_avg_sqs", "masters", "steps", "gstate")


def plan_schema(mutable: bool) -> str:
    """The arguments' schema as csrc/ops.cpp writes it (``plan_args``), with the alias annotations of the
    written tensors if ``mutable`` (a test compares the two)."""
    tags = iter("abcdef")
    out = []
    for typ, name in (("Tensor[]", "params"), ("Tensor?[]", "grads"), ("Tensor[]", "exp_avgs"),
                      ("Tensor[]", "exp_avg_sqs"), ("Tensor[]", "masters"), ("int[]", "master_index"),
                      ("Tensor[]", "steps"), ("int[]", "group_sizes"), ("Tensor", "hyper"),
                      ("Tensor?[]", "lr_tensors"), ("Tensor[]", "gstate"), ("Tensor?", "grad_scale"),
                      ("Tensor?", "found_inf")):
        if mutable and name in PLAN_MUTATES:
            typ = f"Tensor({next(tags)}!)[]"
        out.append(f"{typ} {name}")
    return ", ".join(out)


class StepPlan(NamedTuple):
    params: List[Tensor]
    grads: List[Optional[Tensor]]
    exp_avgs: List[Tensor]
    exp_avg_sqs: List[Tensor]
    masters: List[Tensor]  # only the fp32 masters of bf16/fp16 params (an op's mutable list may not hold None)
    master_index: List[int]  # tensor i's master is masters[master_index[i]], or none (-1)
    steps: List[Tensor]
    group_sizes: List[int]
    hyper: Tensor
    lr_tensors: List[Optional[Tensor]]
    gstate: List[Tensor]  # [step, gbar, coef, skipped]
    grad_scale: Optional[Tensor]
    found_inf: Optional[Tensor]


def hyper_values(groups: List[GroupTensors], cfg: StepConfig) -> List[float]:
    vals = [float(cfg.rho), float(cfg.ema_beta), float(bool(cfg.adaptive_norm)), float(cfg.sign),
            float(cfg.max_grad_norm is not None), 0.0 if cfg.max_grad_norm is None else float(cfg.max_grad_norm),
            float(bool(cfg.perturbed)), float(cfg.gbar_floor or 0.0)]
    for g in groups:
        lr = 0.0 if isinstance(g.lr, Tensor) else float(g.lr)
        vals += [lr, float(g.beta1), float(g.beta2), float(g.eps), float(g.weight_decay)]
    return vals


def lr_tensors(groups: List[GroupTensors], device: torch.device) -> List[Optional[Tensor]]:
    out: List[Optional[Tensor]] = []
    for g in groups:
        lr = g.lr
        if not isinstance(lr, Tensor):
            out.append(None)
            continue
        if lr.device.type == "cpu" and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "MGPO: lr is a CPU tensor, whose value would be frozen into the CUDA graph being captured; "
                "put the lr tensor on the parameters' device (the kernels read it there at every replay)"
            )
        out.append(lr.detach())
    return out


def flatten(groups: List[GroupTensors]) -> tuple:
    """params, grads, exp_avgs, exp_avg_sqs, masters, master_index, steps, group_sizes over all groups."""
    params, grads, ms, vs, masters, master_index, steps = [], [], [], [], [], [], []
    for g in groups:
        params += g.params
        grads += g.grads
        ms += g.exp_avgs
        vs += g.exp_avg_sqs
        steps += g.steps
        for x in g.masters:
            if x is None:
                master_index.append(-1)
            else:
                master_index.append(len(masters))
                masters.append(x)
    return params, grads, ms, vs, masters, master_index, steps, [len(g.params) for g in groups]


class PlanCache:
    """One backend instance's plan lists: the flat lists (all but the gradients, which are taken fresh at every
    step) are rebuilt only when the optimizer passes other list objects (other parameters with gradients, a new
    state), the table only when a value changes.  ``hold`` (the cpp backend's ``_C.KeptPlan``), if given, makes the
    backend's own copy of the persistent lists (``held``), under the same rule.  The cache keeps the source lists,
    so their identity cannot be confused with new lists at a reused address; it never keeps a gradient."""

    def __init__(self, hold: Optional[Callable] = None):
        self._hold = hold
        self._src = None  # the groups' lists the entries below were made from
        self._flat = None
        self._held = None  # (the global state's tensors, the held copy)
        self._hyper_key = None
        self._hyper = None

    def lists(self, groups: List[GroupTensors]) -> tuple:
        """``flatten(groups)`` without the gradients (None in their place), from the cache while the lists are
        those of the last call."""
        src = [(g.params, g.exp_avgs, g.exp_avg_sqs, g.masters, g.steps) for g in groups]
        old = self._src
        if old is None or len(old) != len(src) or any(a is not b for o, s in zip(old, src) for a, b in zip(o, s)):
            self._src, self._held = src, None  # the old held copy is released before a new one is made
            flat = flatten(groups)
            self._flat = (flat[0], None) + tuple(flat[2:])
        return self._flat

    def build(self, groups: List[GroupTensors], gstate: GlobalState, cfg: StepConfig) -> StepPlan:
        device = gstate.step.device
        vals = hyper_values(groups, cfg)
        gs = [gstate.step, gstate.gbar, gstate.coef, gstate.skipped]
        if torch.compiler.is_compiling():
            flat, hyper = flatten(groups), torch.tensor(vals, dtype=torch.float64)
        else:
            flat = self.lists(groups)
            flat = flat[:1] + ([gr for g in groups for gr in g.grads],) + flat[2:]
            if vals != self._hyper_key:
                self._hyper_key, self._hyper = vals, torch.tensor(vals, dtype=torch.float64)
            hyper = self._hyper
            if self._hold is not None and (self._held is None or any(a is not b for a, b in zip(self._held[0], gs))):
                self._held = None
                self._held = (gs, self._hold(*flat[:1], *flat[2:], gs))  # params, exp_avgs, ..., group_sizes, gstate
        return StepPlan(*flat, hyper, lr_tensors(groups, device), gs, _device_scalar(cfg.grad_scale, device),
                        _device_scalar(cfg.found_inf, device))

    @property
    def held(self):
        """The held copy of the lists of the last :meth:`build` (None before one, under torch.compile, or once
        :meth:`lists` saw other lists)."""
        return None if self._held is None else self._held[1]


def _device_scalar(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """GradScaler's scale / found_inf as the kernels read them: one float32 on the parameters' device."""
    if t is None:
        return None
    if t.dtype != torch.float32 or t.device != device:
        t = t.to(device=device, dtype=torch.float32)
    return t.reshape(1) if t.dim() != 1 else t
