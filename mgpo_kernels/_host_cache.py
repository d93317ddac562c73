"""The optimizer's tensor lists (``GroupTensors``), collected from ``param_groups`` and ``state`` and reused while
the same parameters have gradients.

``collect`` reads every group (allocating the state of a parameter with its first gradient); that costs ~0.9 ms of
Python for 448 LoRA tensors (as much as 5 % of a CPU step at r=8, all of a GPU step's time on the host).  So in a
steady training loop ``build`` keeps the lists and ``lookup`` reuses them while they are current: the same
parameters, the same None pattern of their gradients, the same state dict items and, in every state dict, the same
state tensors (the usual loops that move optimizer state to a device replace them); only the gradients and the
groups' hyper-parameters are read anew.  The same list objects are passed every step, so a backend may keep what it
derives from them (``backends/plan.PlanCache``: the flat op arguments and the cpp backend's ``_C.KeptPlan``).

The checks are C++ loops (``_C.same_items``, ``dict_is``, ``values_are``, ``grads_of``: csrc/host_path.cpp): with
the caches cold after a step's streaming passes, Python's loops wait for one object's cache misses at a time, and
with them the apply + step of 448 tiny tensors took 0.52 ms instead of 0.35 warm, 0.1 ms more each cold
(benchmarks/results/2026-12-07-cpu-host-overhead-before-house.txt).  Without the extension nothing is reused
(the reference backend's step costs a hundred times the lookup).
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import List, Optional

import torch

from ._distributed import local
from .backends.base import GroupTensors

try:
    from ._C import dict_is as _dict_is
    from ._C import grads_of as _grads_of
    from ._C import same_items as _same_items
    from ._C import values_are as _values_are
except ImportError:  # pragma: no cover - the extension is not built (or disabled): every step collects
    _grads_of = None

_GRAD = operator.attrgetter("grad")
_PLAIN = (torch.nn.Parameter, torch.Tensor)  # their ``grad`` is the autograd field, which _C.grads_of reads
_KEY = "_group_cache"
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step", "master_param")  # the order of _Entry.tensors[1:]


def init_state(opt, p) -> dict:
    """``opt.state[p]``, allocated (AdamW's moments and step, and the fp32 master of a bf16/fp16 parameter) if
    empty."""
    st = opt.state[p]
    if len(st) == 0:
        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if p.dtype != torch.float32:
            # the parameter holds theta here (at rest, or perturbed by coef * m = 0)
            st["master_param"] = p.detach().clone(memory_format=torch.preserve_format).float()
            opt._at_rest.has_masters = True
    return st


def collect(opt, with_grads: bool) -> List[GroupTensors]:
    """The tensors of every group that have state (allocating it for new gradients); ``with_grads=False``: every
    gradient None (the apply pass)."""
    out = []
    for group in opt.param_groups:
        params, grads, ms, vs, masters, steps = [], [], [], [], [], []
        for p in group["params"]:
            if with_grads and p.grad is not None:
                st = init_state(opt, p)
            else:
                st = opt.state.get(p)
                if not isinstance(st, dict) or not st:
                    continue
            params.append(local(p).detach())
            grads.append(local(p.grad) if (with_grads and p.grad is not None) else None)
            ms.append(local(st["exp_avg"]))
            vs.append(local(st["exp_avg_sq"]))
            masters.append(local(st["master_param"]) if "master_param" in st else None)
            steps.append(st["step"])
        b1, b2 = group["betas"]
        out.append(GroupTensors(params, grads, ms, vs, masters, steps, group["lr"], b1, b2,
                                group["eps"], group["weight_decay"]))
    return out


@dataclass
class _Entry:
    """One param group's tensor lists, valid while its parameters and gradient pattern are unchanged."""

    params_ref: list  # the group's parameters when cached (compared by identity)
    none_mask: list
    keep: Optional[list]  # which parameters have state (None: all)
    plain: bool  # every parameter is a torch.Tensor or nn.Parameter, no subclass: _C.grads_of reads its grad
    dicts: list  # the state dicts of the parameters with state
    tensors: tuple  # params, exp_avgs, exp_avg_sqs, steps, masters of the parameters with state


def drop(opt) -> None:
    opt.__dict__.pop(_KEY, None)


def build(opt, groups: List[GroupTensors]) -> None:
    """Keep ``groups`` (just collected, with gradients) for the next steps."""
    if _grads_of is None:
        return
    entries = []
    for group, g in zip(opt.param_groups, groups):
        ps = list(group["params"])
        has_state = [bool(opt.state.get(p)) for p in ps]
        with_state = list(itertools.compress(ps, has_state))
        # the parameter itself, not a detached alias: an alias would go stale if ``p.data`` is reassigned
        entries.append(_Entry(
            params_ref=ps,
            none_mask=list(map(operator.is_, (p.grad for p in ps), itertools.repeat(None))),
            keep=None if all(has_state) else has_state,
            plain=all(type(p) in _PLAIN for p in ps),
            dicts=[opt.state[p] for p in with_state],
            tensors=(with_state, g.exp_avgs, g.exp_avg_sqs, g.steps, g.masters),
        ))
    # the state dict's items when cached: while they are the same objects, each cached parameter's state is the
    # dict cached with it
    opt.__dict__[_KEY] = (opt.state, list(opt.state.keys()), list(opt.state.values()), entries)


def lookup(opt, with_grads: bool = True) -> Optional[List[GroupTensors]]:
    """The groups of this step from the cache, or None if the parameters, their gradients or the state changed.
    ``with_grads=False`` (the apply pass at the training forward): the same lists, every gradient None, whatever
    the gradients are now."""
    cache = opt.__dict__.get(_KEY)
    if cache is None:
        return None
    state, keys, values, entries = cache
    if state is not opt.state or len(entries) != len(opt.param_groups) or not _dict_is(state, keys, values):
        return None
    out = []
    for group, e in zip(opt.param_groups, entries):
        ps = group["params"]
        if type(ps) is not list or not _same_items(ps, e.params_ref):
            return None
        params, ms, vs, steps, masters = e.tensors
        if not with_grads:
            grads = [None] * len(params)
        else:
            grads = _grads_of(ps) if e.plain else list(map(_GRAD, ps))
            if list(map(operator.is_, grads, itertools.repeat(None))) != e.none_mask:
                return None
            if e.keep is not None:
                grads = list(itertools.compress(grads, e.keep))
        # the state as it is now: a tensor replaced inside a state dict (the usual loops that move optimizer state
        # to a device do that) must not leave the cache updating the old tensors
        if not all(_values_are(e.dicts, k, t) for k, t in zip(_STATE_KEYS, (ms, vs, steps, masters))):
            return None
        b1, b2 = group["betas"]
        out.append(GroupTensors(params, grads, ms, vs, masters, steps, group["lr"], b1, b2,
                                group["eps"], group["weight_decay"]))
    return out
