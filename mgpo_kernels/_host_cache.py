"""The per-step host path: tensor lists built once and reused while the same parameters have gradients.

A step of 448 LoRA tensors spent ~0.9 ms in Python and argument conversion (as much as 5 % of a CPU step at r=8,
and all of a GPU step's time on the host), so in the normal training loop the lists are reused: the check is
C-speed (the same parameters, the None pattern of their gradients, and that every state tensor is still the one
cached), and only the gradients and the groups' hyper-parameters are read anew.  The same list objects are passed
every step, so a backend may cache what it derives from them (the cpp backend's flattened op arguments and its
``_C.KeptPlan``).

With the caches cold after a step's streaming passes, Python's own loops wait for one object's cache misses at a
time (reading 448 ``p.grad``: 0.20 ms, ``_C.grads_of``: 0.08 ms; benchmarks/results/2026-12-02-cpu-host-probes.txt).
With the extension built, the checks and the gradients run in C++ loops (csrc/host_cache.cpp) that compare pointers where identity is the question and overlap the misses of
several objects; without it, the same checks run in Python.
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import List, Optional

import torch

from .backends.base import GroupTensors

_GRAD = operator.attrgetter("grad")
_PLAIN = (torch.nn.Parameter, torch.Tensor)  # their ``grad`` is the autograd field, which _C.grads_of reads
_KEY = "_group_cache"
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step", "master_param")  # the order of _Entry.tensors[1:]


def _py_same_items(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _py_dict_is(d: dict, keys: list, values: list) -> bool:
    return (len(d) == len(keys) and all(map(operator.is_, d.keys(), keys))
            and all(map(operator.is_, d.values(), values)))


def _py_values_are(dicts: list, key: str, expected: list) -> bool:
    try:
        return len(dicts) == len(expected) and all(map(operator.is_, map(dict.get, dicts, itertools.repeat(key)),
                                                       expected))
    except TypeError:  # an item is not a dict
        return False


try:  # the same checks and gradients in C++ (csrc/host_cache.cpp)
    from ._C import dict_is as _dict_is
    from ._C import grads_of as _grads_of
    from ._C import same_items as _same_items
    from ._C import values_are as _values_are
except ImportError:  # pragma: no cover - the extension is not built
    _same_items, _dict_is, _values_are, _grads_of = _py_same_items, _py_dict_is, _py_values_are, None


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
            plain=_grads_of is not None and all(type(p) in _PLAIN for p in ps),
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
