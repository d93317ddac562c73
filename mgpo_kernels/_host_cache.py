"""The per-step host path: tensor lists built once and reused while the same parameters have gradients.

A step of 448 LoRA tensors spent ~0.9 ms in Python and argument conversion (as much as 5 % of a CPU step at r=8,
and all of a GPU step's time on the host), so in the normal training loop the lists are reused: the check is
C-speed (the parameters' ids and the None pattern of their gradients, and that every state tensor is still the one
cached), and only the gradients and the groups' hyper-parameters are read anew.  The same list objects are passed
every step, so a backend may cache what it derives from them (the cpp backend's flattened op arguments and its
``_C.KeptPlan``).  With the caches cold after a step's streaming passes, reading 448 ``p.grad`` in Python took
0.28-0.38 ms and ``_C.grads_of`` 0.13 ms; the whole lookup went from 0.6 to 0.4 ms.
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import List, Optional

import torch

from .backends.base import GroupTensors

_GRAD = operator.attrgetter("grad")
_PLAIN = (torch.nn.Parameter, torch.Tensor)  # their ``grad`` is the autograd field, read by _C.grads_of as well
try:  # the same gradients as map(_GRAD, ps), read in C++: a third of the time with the caches cold
    from ._C import grads_of as _grads_of
except ImportError:  # pragma: no cover - the extension is not built
    _grads_of = None
_EXP_AVG = operator.itemgetter("exp_avg")
_EXP_AVG_SQ = operator.itemgetter("exp_avg_sq")
_STEP = operator.itemgetter("step")
_KEY = "_group_cache"


@dataclass
class _Entry:
    """One param group's tensor lists, valid while its parameters (ids) and gradient pattern are unchanged."""

    params_ref: list  # kept: the ids compared below cannot be reused while the cache lives
    ids: list
    none_mask: list
    keep: Optional[list]  # which parameters have state (None: all)
    plain: bool  # every parameter is a torch.Tensor or nn.Parameter, no subclass
    tensors: tuple  # params, exp_avgs, exp_avg_sqs, masters, steps of the parameters with state


def drop(opt) -> None:
    opt.__dict__.pop(_KEY, None)


def build(opt, groups: List[GroupTensors]) -> None:
    entries = []
    for group, g in zip(opt.param_groups, groups):
        ps = list(group["params"])
        has_state = [bool(opt.state.get(p)) for p in ps]
        with_state = list(itertools.compress(ps, has_state))
        # the parameter itself, not a detached alias: an alias would go stale if ``p.data`` is reassigned
        entries.append(_Entry(
            params_ref=ps, ids=list(map(id, ps)),
            none_mask=list(map(operator.is_, (p.grad for p in ps), itertools.repeat(None))),
            keep=None if all(has_state) else has_state,
            plain=_grads_of is not None and all(type(p) in _PLAIN for p in ps),
            tensors=(with_state, g.exp_avgs, g.exp_avg_sqs, g.masters, g.steps),
        ))
    opt.__dict__[_KEY] = (opt.state, entries)


def lookup(opt) -> Optional[List[GroupTensors]]:
    """The groups of this step from the cache, or None if the parameters, their gradients or the state changed."""
    cache = opt.__dict__.get(_KEY)
    if cache is None or cache[0] is not opt.state or len(cache[1]) != len(opt.param_groups):
        return None
    out = []
    for group, e in zip(opt.param_groups, cache[1]):
        ps = group["params"]
        if list(map(id, ps)) != e.ids:
            return None
        grads = _grads_of(ps) if e.plain else list(map(_GRAD, ps))
        if list(map(operator.is_, grads, itertools.repeat(None))) != e.none_mask:
            return None
        if e.keep is not None:
            grads = list(itertools.compress(grads, e.keep))
        params, ms, vs, masters, steps = e.tensors
        # the state as it is now: a dict or a tensor in it replaced between steps (the usual loops that move
        # optimizer state to a device do either) must not leave the cache updating the old tensors
        states = list(map(opt.state.get, params))
        try:  # C-level maps: ~0.15 us per parameter
            same = (all(map(operator.is_, map(_EXP_AVG, states), ms))
                    and all(map(operator.is_, map(_EXP_AVG_SQ, states), vs))
                    and all(map(operator.is_, map(_STEP, states), steps))
                    and all(map(operator.is_, map(dict.get, states, itertools.repeat("master_param")), masters)))
        except (KeyError, TypeError):  # a key or a parameter's whole state is gone
            return None
        if not same:
            return None
        b1, b2 = group["betas"]
        out.append(GroupTensors(params, grads, ms, vs, masters, steps, group["lr"], b1, b2,
                                group["eps"], group["weight_decay"]))
    return out
