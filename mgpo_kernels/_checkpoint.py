"""MGPO's state dicts: torch's, plus the optimizer-wide scalars; the parameters are never written by a load.

Theta at rest (_at_rest.py) means the model's weights saved beside an optimizer state dict are theta, whoever
saves them (accelerate, Lightning, the HF Trainer, ``torch.save`` of model and optimizer): a load is torch's load,
and nothing needs to know what the model holds.

The optimizer-wide scalars are saved under ``state_dict()["mgpo"]`` and mirrored in every parameter's state
(``mgpo_step``, ``mgpo_gbar``, ``mgpo_coef``), because ``torch.distributed.checkpoint`` (FSDP2) keeps only
``state`` and ``param_groups``, and ``ZeroRedundancyOptimizer`` copies per-parameter states into its local
optimizer itself.  Options and the mode live in ``param_groups``.  Everything is tensors, numbers, strings and
bools: ``torch.load(weights_only=True)`` reads it.

``load_state_dict`` is torch's, with two hooks of MGPO's kept at the inner ends of torch's hook lists: a pre-hook
(after the user's) that checks the dict as torch will load it and keeps its fp32 tensors, and a post-hook (before the
user's) that puts them back where torch cast them to a bf16/fp16 parameter's dtype, takes the global scalars, and
makes each fp32 master agree with its parameter (the parameter, at rest, is theta).

A 0.1.0 state dict (per-parameter ``mgpo_fingerprint``; its model weights may hold theta + eps) loads exactly when
the model holds that checkpoint's weights (eps is removed where the fingerprint says it is there) and is refused
with a message otherwise.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ._checks import (MODE_KEY, OPTION_NAMES, check_adamw_flags, check_global_scalar, check_group_hparams,
                      check_option)
from ._distributed import dtensor_mesh, local
from .backends.base import move_eps

GLOBAL_KEYS = ("step", "gbar", "coef", "skipped")
MIRRORED_KEYS = ("step", "gbar", "coef")
LEGACY_FINGERPRINT_KEY = "mgpo_fingerprint"  # 0.1.0: float64 [sum, sum sq] of the parameter at theta, theta + eps
_MIRROR_KEYS = tuple(f"mgpo_{k}" for k in MIRRORED_KEYS) + (LEGACY_FINGERPRINT_KEY,)
_FP32_KEYS = ("exp_avg", "exp_avg_sq", "master_param")
FORMAT = 2  # state_dict()["mgpo"]["format"]: 2 = theta at rest (0.1.0 wrote none)


def _pairs(opt):
    """(param, its state) for every parameter with state, in param_groups order."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if isinstance(st, dict) and "exp_avg" in st:
                yield p, st


def state_dict(opt, sd: Dict[str, Any]) -> Dict[str, Any]:
    """Add MGPO's global state to torch's ``Optimizer.state_dict()`` result ``sd``."""
    if opt._at_rest.applied and not torch.compiler.is_compiling():
        warnings.warn(
            "MGPO.state_dict() was called between a training forward and step(): the model's parameters hold "
            "theta + eps right now, so model weights saved now are not the trained weights theta. Save after "
            "step() (or call opt.eval() first).", stacklevel=3)
    g = opt._gstate
    sd["mgpo"] = {k: getattr(g, k).detach().clone() for k in GLOBAL_KEYS}
    sd["mgpo"]["format"] = FORMAT
    mirror = {f"mgpo_{k}": sd["mgpo"][k] for k in MIRRORED_KEYS}  # shared 0-d tensors: saved once by torch.save
    index = {}
    for sg in sd["param_groups"]:
        index.update(dict.fromkeys(sg["params"]))
    sd["state"] = {key: ({**st, **mirror} if key in index and isinstance(st, dict) and "exp_avg" in st else st)
                   for key, st in sd["state"].items()}
    return sd


def _saved_globals(state_dict) -> Optional[Dict[str, Any]]:
    extra = state_dict.get("mgpo")
    if extra is not None:
        return extra
    # a distributed checkpoint dropped it: take the per-parameter mirror
    for st in state_dict["state"].values():
        if isinstance(st, dict) and all(f"mgpo_{k}" in st for k in MIRRORED_KEYS):
            return {k: st[f"mgpo_{k}"] for k in MIRRORED_KEYS}
    return None


def check_loaded(opt, state_dict) -> None:
    """Everything that can be wrong with a state dict, before anything is modified."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("not an optimizer state dict: expected keys 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"state dict has {len(saved_groups)} param groups, the optimizer has {len(opt.param_groups)}")
    for gi, (sg, g) in enumerate(zip(saved_groups, opt.param_groups)):
        if len(sg["params"]) != len(g["params"]):
            raise ValueError(
                f"param group {gi}: state dict has {len(sg['params'])} parameters, the optimizer has "
                f"{len(g['params'])}"
            )
        check_group_hparams(sg.get("lr", g["lr"]), sg.get("betas", g["betas"]), sg.get("eps", g["eps"]),
                            sg.get("weight_decay", g["weight_decay"]), f"state dict param group {gi}")
        check_adamw_flags(sg, f"state dict param group {gi}")
        for k in OPTION_NAMES:
            if k in sg:
                check_option(k, sg[k])
        for idx, p in zip(sg["params"], g["params"]):
            st = state_dict["state"].get(idx)
            if not isinstance(st, dict) or not st:
                continue
            for key in ("exp_avg", "exp_avg_sq", "master_param"):
                if key not in st:
                    if key == "master_param":
                        continue
                    raise ValueError(f"state of parameter {idx} lacks {key!r}")
                t = st[key]
                if not isinstance(t, Tensor) or tuple(t.shape) != tuple(p.shape):
                    shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(
                        f"state {key!r} of parameter {idx} has shape {shape}, the parameter has "
                        f"{tuple(p.shape)}: the state dict does not match the parameters"
                    )
                if not t.is_floating_point():
                    raise ValueError(f"state {key!r} of parameter {idx} is not floating point ({t.dtype})")
            if "step" not in st:
                raise ValueError(f"state of parameter {idx} lacks 'step'")
            check_global_scalar("step", st["step"], f"state of parameter {idx}")
            for k in MIRRORED_KEYS:
                if f"mgpo_{k}" in st:
                    check_global_scalar(k, st[f"mgpo_{k}"], f"state of parameter {idx} (mgpo_{k})")
            fp = st.get(LEGACY_FINGERPRINT_KEY)
            if fp is not None and (not isinstance(fp, Tensor) or fp.numel() != 4):
                raise ValueError(f"state {LEGACY_FINGERPRINT_KEY!r} of parameter {idx} must be a tensor of 4 numbers")
    extra = state_dict.get("mgpo")
    if extra is not None:
        if not isinstance(extra, dict):
            raise ValueError(f"state dict entry 'mgpo' must be a dict, got {type(extra).__name__}")
        for k in GLOBAL_KEYS:
            if k in extra:
                check_global_scalar(k, extra[k], "state dict 'mgpo'")
        for k in OPTION_NAMES:  # older files kept the options here
            if k in extra:
                check_option(k, extra[k])


def _what_it_holds(fp: Tensor, now: Tensor) -> str:
    """0.1.0: 'theta', 'perturbed', 'either' (eps is zero here) or 'neither', from the saved and current sums."""
    fp = fp.detach().double().reshape(4).cpu()
    f_theta, f_pert = fp[:2], fp[2:]
    scale = f_theta.abs() + f_pert.abs() + 1e-300
    sep = ((f_theta - f_pert) / scale).norm()
    if sep <= 1e-13:
        return "either"
    if ((now - f_theta) / scale).norm() <= 0.1 * sep:
        return "theta"
    if ((now - f_pert) / scale).norm() <= 0.1 * sep:
        return "perturbed"
    return "neither"


def _legacy_holds(opt, pairs) -> Dict[int, str]:
    """0.1.0 dicts: what each parameter with a fingerprint holds now (id(param) -> 'theta'/'perturbed'/...);
    raises, before anything is loaded, when a parameter matches neither (other weights are in the model)."""
    pairs = [(p, fp) for p, fp in pairs if fp is not None]
    if not pairs:
        return {}
    table = torch.stack([torch.stack([local(p).detach().double().sum(), local(p).detach().double().square().sum()])
                         for p, _ in pairs])
    mesh = dtensor_mesh(opt.param_groups)
    if mesh is not None:
        import torch.distributed as dist

        dist.all_reduce(table, group=mesh.get_group())
    holds = {id(p): _what_it_holds(fp, now) for (p, fp), now in zip(pairs, table.cpu().unbind(0))}
    neither = sum(h == "neither" for h in holds.values())
    if neither:
        raise ValueError(
            f"this optimizer state was saved by mgpo_kernels 0.1.0, whose model weights could hold theta + eps, and "
            f"{neither} of {len(holds)} parameters match neither that checkpoint's theta nor its theta + eps, so it "
            "cannot be continued exactly. Load the model weights saved with this optimizer state first, then the "
            "optimizer state (or load the weights alone and start a new optimizer)."
        )
    return holds


def _stash_for_load(opt, state_dict) -> Dict[str, Any]:
    """What the post-hook needs from the dict as torch loads it (after the user's pre-hooks)."""
    fp32, legacy = {}, []
    for sg, group in zip(state_dict["param_groups"], opt.param_groups):
        for idx, p in zip(sg["params"], group["params"]):
            st = state_dict["state"].get(idx)
            if not isinstance(st, dict) or "exp_avg" not in st:
                continue
            if p.is_floating_point() and p.dtype != torch.float32:  # torch casts these to p's dtype: keep fp32
                fp32[id(p)] = {k: st[k] for k in _FP32_KEYS if isinstance(st.get(k), Tensor)}
            legacy.append((p, st.get(LEGACY_FINGERPRINT_KEY)))
    return {"fp32": fp32, "globals": _saved_globals(state_dict), "legacy": _legacy_holds(opt, legacy),
            "options": {k: opt.param_groups[0][k] for k in OPTION_NAMES}, "training": opt.training}


def _pre_hook(opt, state_dict):
    check_loaded(opt, state_dict)  # the dict as torch will load it, after the user's pre-hooks
    opt._at_rest.load_stash = _stash_for_load(opt, state_dict)
    return None


def _post_hook(opt) -> None:
    stash = opt._at_rest.__dict__.pop("load_stash", None)
    if stash is None:  # pragma: no cover - torch's load without our pre-hook
        return
    extra = stash["globals"]
    for group in opt.param_groups:  # options from the saved groups; 0.1.0 kept them under "mgpo"; AdamW has none
        for k in OPTION_NAMES:
            if k not in group:
                group[k] = extra[k] if (extra is not None and k in extra) else stash["options"][k]
        group[MODE_KEY] = stash["training"]  # the mode is the optimizer's now, not the checkpoint's
    _finish_load(opt, list(_pairs(opt)), stash["fp32"], extra, stash["legacy"], every_global=True)


def _finish_load(opt, loaded, fp32: Dict[int, Dict[str, Tensor]], saved_globals, holds: Dict[int, str],
                 every_global: bool) -> None:
    """The steps both loads share (torch's, through the post-hook, and a wrapper's that filled ``opt.state``
    itself), once the loaded per-parameter states ``loaded`` ((param, state) pairs) are in ``opt.state``: each state
    made fp32 on its parameter's device (``fp32``: the dict's own tensors where torch cast them to a bf16/fp16
    parameter's dtype) and without the mirrored keys, each bf16/fp16 parameter given its master, the global scalars
    taken (``every_global``: those the dict lacks are zeroed), the host cache dropped, eps removed from a 0.1.0
    checkpoint's weights (``holds``) and the next training forward armed to apply the loaded eps."""
    from . import _host_cache

    _host_cache.drop(opt)  # the state tensors are new
    for p, st in loaded:
        saved = fp32.get(id(p), {})
        for k in _MIRROR_KEYS:
            st.pop(k, None)
        # copies: torch's cast returns the dict's own tensors where nothing changes, and the steps would then
        # write into the caller's state dict (a snapshot kept for a rollback, say)
        st["step"] = torch.as_tensor(st["step"]).detach().to(device=p.device, dtype=torch.float32,
                                                               copy=True).reshape(())
        for k in ("exp_avg", "exp_avg_sq"):
            st[k] = saved.get(k, st[k]).detach().to(device=p.device, dtype=torch.float32, copy=True)
        if p.dtype == torch.float32:
            st.pop("master_param", None)
            continue
        # the saved master is kept even where the parameter differs now: weights loaded next (the same
        # checkpoint's) make them agree again; otherwise the parameter wins when eps is next applied or the next
        # step runs (sync_masters), whatever the order of the loads
        master = saved.get("master_param", st.get("master_param"))
        opt._at_rest.has_masters = True
        st["master_param"] = (master.detach().to(device=p.device, dtype=torch.float32, copy=True)
                              if master is not None else p.detach().float().clone())
    g = opt._gstate  # in place: wrappers that copied the optimizer's __dict__ (Lightning) share this object
    for k in GLOBAL_KEYS:
        if saved_globals is not None and k in saved_globals:
            getattr(g, k).copy_(torch.as_tensor(saved_globals[k]).reshape(()))
        elif every_global:
            getattr(g, k).zero_()
    # 0.1.0: remove eps from the parameters that hold theta + eps (the model weights it saved while training)
    perturbed = [(local(p).detach(), local(st["exp_avg"]), local(st["master_param"]) if "master_param" in st else None)
                 for p, st in _pairs(opt) if holds.get(id(p)) == "perturbed"]
    if perturbed:
        move_eps(*(list(t) for t in zip(*perturbed)), g.coef, apply=False)
    _loaded(opt)


def _loaded(opt) -> None:
    from . import _at_rest

    rest = opt._at_rest
    rest.applied = False
    rest.maybe_nonzero = bool(opt._gstate.coef.detach().cpu() != 0)
    if rest.maybe_nonzero and opt.training:
        _at_rest.arm(opt)
    else:
        _at_rest.disarm(rest)


def install_load_hooks(opt) -> None:
    """MGPO's load hooks at the inner ends of torch's hook lists (the pre-hook last, the post-hook first), so the
    user's pre-hooks' changes are what it checks and the user's post-hooks see what it loaded."""
    rest = opt._at_rest
    if getattr(rest, "load_hook_ids", None) is None or rest.load_hook_opt is not opt:
        h1 = opt.register_load_state_dict_pre_hook(_pre_hook)
        h2 = opt.register_load_state_dict_post_hook(_post_hook, prepend=True)
        rest.load_hook_ids, rest.load_hook_opt = (h1.id, h2.id), opt
    pre_id, post_id = rest.load_hook_ids
    opt._optimizer_load_state_dict_pre_hooks.move_to_end(pre_id)
    opt._optimizer_load_state_dict_post_hooks.move_to_end(post_id, last=False)


@torch.no_grad()
def sync_masters(groups) -> None:
    """A bf16/fp16 parameter is theta at rest: where it no longer equals its fp32 master rounded (it was written
    since the step: a pruning, a rollback, a load of weights after or instead of the optimizer state's), the
    master takes its value.  Runs where the parameters are at rest and about to be used: the apply pass, and a
    step that no apply preceded.  One read of each bf16/fp16 parameter and its master; fp32 parameters have
    no master and cost nothing."""
    ps, masters = [], []
    for g in groups:
        for p, master in zip(g.params, g.masters):
            if master is not None:
                ps.append(p)
                masters.append(master)
    if not ps:
        return
    for p, master in zip(ps, masters):
        master.copy_(torch.where(master.to(p.dtype) == p, master, p.float()))


@torch.no_grad()
def adopt_bypassed_load(opt) -> None:
    """Finish a load that bypassed ``load_state_dict``: ``ZeroRedundancyOptimizer.load_state_dict`` copies the saved
    per-parameter states into its local optimizer's ``state`` itself.  The mirrored keys only a saved state carries
    say so: the global scalars are taken from them, and the load finishes as torch's does (``_finish_load``)."""
    found = [(p, st) for p, st in _pairs(opt) if any(k in st for k in _MIRROR_KEYS)]
    if not found:
        return
    first = next((st for _, st in found if all(f"mgpo_{k}" in st for k in MIRRORED_KEYS)), None)
    for i, (_, st) in enumerate(found):
        for k in MIRRORED_KEYS:
            if f"mgpo_{k}" in st:
                check_global_scalar(k, st[f"mgpo_{k}"], f"loaded state of parameter {i} (mgpo_{k})")
    holds = _legacy_holds(opt, [(p, st.get(LEGACY_FINGERPRINT_KEY)) for p, st in found])
    saved = None if first is None else {k: first[f"mgpo_{k}"] for k in MIRRORED_KEYS}
    _finish_load(opt, found, {}, saved, holds, every_global=False)


def adopt_loads_of(opt, zero) -> None:
    """``ZeroRedundancyOptimizer.load_state_dict`` fills the state of its local optimizer ``opt`` itself, then runs
    its own post-hooks: there ``opt`` adopts the load (:func:`adopt_bypassed_load`), so the next training forward
    applies the loaded eps."""
    if zero is not None and hasattr(zero, "register_load_state_dict_post_hook"):
        ref = weakref.ref(opt)
        zero.register_load_state_dict_post_hook(lambda _z: ref() is not None and adopt_bypassed_load(ref()))


def getstate(opt, st: Dict[str, Any]) -> Dict[str, Any]:
    """``MGPO.__getstate__``: torch pickles only defaults, state and param_groups; the global state, the device, the
    requested backend, the distributed mode and where eps is travel too (the backend and the host cache are rebuilt
    on the other side)."""
    st.update(_gstate=opt._gstate, _device=opt._device, _requested_backend=opt._requested_backend,
              _distributed_mode=opt._distributed_mode, _at_rest=opt._at_rest)
    return st


def setstate(opt) -> None:
    """``MGPO.__setstate__``, after torch's: a copy continues where the original was (the next training forward
    applies eps), with its backend resolved again."""
    from . import _at_rest
    from . import backends as _backends

    opt.__dict__.setdefault("_process_group", None)
    opt.__dict__.setdefault("_distributed_mode", "auto")
    rest = opt.__dict__.setdefault("_at_rest", _at_rest.AtRest())
    if rest.maybe_nonzero and opt.param_groups and opt.training and not rest.applied:
        _at_rest.arm(opt)
    if "_device" in opt.__dict__ and "_requested_backend" in opt.__dict__:
        opt._backend = _backends.resolve(opt._requested_backend, opt._device, opt.param_groups)
