"""Moving the parameters between theta and theta + eps outside a step's update, and theta at rest after a step.

The transitions of ``opt._at_rest`` (_at_rest.py) that write parameters: ``apply`` (the apply pass, run by the hook
at the first training forward after a step, or by ``MGPO.apply_perturbation()``), ``remove`` (``eval()``, or a load
between that forward and its step), and ``stepped`` / ``stepped_without_grads`` (after ``step()``: theta_{t+1} at
rest, the hook armed).  The arithmetic is the backend's ``perturb`` (the step's own element math).
"""
from __future__ import annotations

import torch

from . import _at_rest, _checkpoint, _host_cache
from .backends.base import StepConfig


@torch.no_grad()
def apply(opt) -> None:
    """MGPO.apply_perturbation(): p = theta + coef * m in one pass, unless in eval mode, already applied or known
    zero (before the first step, rho = 0)."""
    rest = opt._at_rest
    if rest.applied or not opt.training:
        return
    link = opt.__dict__.get("_deepspeed")
    if link is not None:  # eps goes into DeepSpeed's model copy; its fp32 masters stay theta
        _at_rest.disarm(rest)
        if rest.maybe_nonzero:
            link.apply()
            rest.applied = True
        return
    compiling = torch.compiler.is_compiling()
    # the step's cached lists while the parameters and the state are the ones it cached (no load since)
    groups = None if compiling else _host_cache.lookup(opt, with_grads=False)
    if groups is None and not compiling:
        _checkpoint.adopt_bypassed_load(opt)  # a wrapper that filled opt.state itself (ZeRO's load)
    _at_rest.disarm(rest)
    if not rest.maybe_nonzero:
        return
    coef = opt._gstate.coef
    if groups is None:
        groups = _host_cache.collect(opt, with_grads=False)
    if rest.has_masters:
        _checkpoint.sync_masters(groups)  # a bf16/fp16 parameter written since the step: its value is theta
    if coef.device.type == "cpu" and float(coef) == 0.0:  # nothing to add (no host sync on a CPU tensor)
        return
    if any(g.params for g in groups):
        opt._backend.perturb(groups, coef, apply=True)
    rest.applied = True
    share_with_ranks(opt)


@torch.no_grad()
def remove(opt) -> None:
    """Remove the eps a training forward applied (eval() or a load before the step that would have)."""
    rest = opt._at_rest
    if not rest.applied:
        return
    link = opt.__dict__.get("_deepspeed")
    if link is not None:
        return link.remove()
    opt._backend.perturb(_host_cache.collect(opt, with_grads=False), opt._gstate.coef, apply=False)
    rest.applied = False
    share_with_ranks(opt)


def share_with_ranks(opt) -> None:
    zero = opt.__dict__.get("_sharding_parent")
    if zero is not None:  # a collective: the ranks hold copies of the parameters this rank owns (ZeRO)
        zero._sync_params()


def stepped(opt, cfg: StepConfig) -> None:
    """After a step: theta_{t+1} is at rest; in train mode the next training forward applies eps_{t+1}."""
    rest = opt._at_rest
    rest.applied = False
    rest.maybe_nonzero = rest.maybe_nonzero or cfg.rho != 0.0
    if opt.training and rest.maybe_nonzero:
        _at_rest.arm(opt)


def stepped_without_grads(opt) -> None:
    """No gradient anywhere (nothing to update, as in AdamW): still leave theta at rest."""
    if opt._at_rest.applied:
        remove(opt)
        _at_rest.arm(opt)
