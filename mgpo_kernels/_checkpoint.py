"""MGPO's state dicts: self-describing, so a load continues the uninterrupted run whatever the model holds.

Between steps the parameters hold theta + eps, so a checkpoint's model weights may be theta (written in eval mode,
or by ``MGPOCallback``) or theta + eps (accelerate's ``save_state``, Lightning, ``torch.save`` of model and
optimizer together while training).  The state dict therefore carries, per parameter, a fingerprint of the
parameter at theta and at theta + eps (float64 sum and sum of squares of its values in the parameter's dtype),
and the load compares the parameters as they are now against both: it then removes or applies eps so that the
parameters hold what the optimizer's mode says.  A parameter that matches neither (other weights were loaded)
is taken as theta, with one warning.  ``load_state_dict(state_dict())`` is therefore the identity in either mode.

The optimizer-wide scalars are saved under ``state_dict()["mgpo"]`` and mirrored in every parameter's state
(``mgpo_step``, ``mgpo_gbar``, ``mgpo_coef``, ``mgpo_fingerprint``), because ``torch.distributed.checkpoint``
(FSDP2) keeps only ``state`` and ``param_groups``.  Options and the mode live in ``param_groups``.  Everything is
tensors, numbers, strings and bools: ``torch.load(weights_only=True)`` reads it.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from ._checks import (MODE_KEY, OPTION_NAMES, check_adamw_flags, check_global_scalar, check_group_hparams,
                      check_option)
from ._distributed import dtensor_mesh, local
from .backends.base import GlobalState

GLOBAL_KEYS = ("step", "gbar", "coef", "skipped")
MIRRORED_KEYS = ("step", "gbar", "coef")
FINGERPRINT_KEY = "mgpo_fingerprint"
_MIRROR_KEYS = tuple(f"mgpo_{k}" for k in MIRRORED_KEYS) + (FINGERPRINT_KEY,)
#: a parameter holds theta (or theta + eps) when it is this much closer to that fingerprint than the two are apart
_MATCH = 0.1


def _sums(t: Tensor) -> Tensor:
    d = t.detach().double()
    return torch.stack([d.sum(), d.square().sum()])


def _pairs(opt):
    """(param, its state) for every parameter with state, in param_groups order."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if isinstance(st, dict) and "exp_avg" in st:
                yield p, st


def _theta_and_perturbed(p: Tensor, st: dict, coef: Tensor, perturbed: bool):
    """The parameter's values at theta and at theta + eps, in its dtype, with the arithmetic of
    Backend.perturb (so they equal what eval()/train() would leave in it)."""
    pl, m = local(p).detach(), local(st["exp_avg"])
    master = st.get("master_param")
    if master is not None:
        master = local(master)
        theta = master.to(pl.dtype)
        pert = pl if perturbed else (master + m * coef).to(pl.dtype)
    elif perturbed:
        pert, theta = pl, pl - (m * coef).to(pl.dtype)
    else:
        theta, pert = pl, pl + (m * coef).to(pl.dtype)
    return theta, pert


def _allreduce(t: Tensor, opt) -> Tensor:
    mesh = dtensor_mesh(opt.param_groups)
    if mesh is not None:
        import torch.distributed as dist

        dist.all_reduce(t, group=mesh.get_group())
    return t


def fingerprints(opt) -> List[Tensor]:
    """Per parameter with state: float64 [sum, sum of squares] at theta, then at theta + eps (global under FSDP2)."""
    coef = opt._gstate.coef
    rows = []
    for p, st in _pairs(opt):
        theta, pert = _theta_and_perturbed(p, st, coef, opt.training)
        rows.append(torch.cat([_sums(theta), _sums(pert)]))
    if not rows:
        return []
    table = _allreduce(torch.stack(rows), opt).cpu()
    return list(table.unbind(0))


def _saving_trainer_without_callback():
    """The Hugging Face Trainer saving a checkpoint up the stack, if it has no MGPOCallback (then the model weights
    it has just written hold theta + eps), else None.  Found from the frames, so no transformers import here."""
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return None
        if frame.f_code.co_name == "_save_checkpoint" and frame.f_globals.get("__name__", "").startswith(
                "transformers."):
            trainer = frame.f_locals.get("self")
            handler = getattr(trainer, "callback_handler", None)
            callbacks = getattr(handler, "callbacks", [])
            return None if any(type(cb).__name__ == "MGPOCallback" for cb in callbacks) else trainer
        frame = frame.f_back
    return None


def state_dict(opt, sd: Dict[str, Any]) -> Dict[str, Any]:
    """Add MGPO's global state and the fingerprints to torch's ``Optimizer.state_dict()`` result ``sd``."""
    if opt.training and not opt.__dict__.get("_warned_trainer_save") and _saving_trainer_without_callback():
        opt.__dict__["_warned_trainer_save"] = True
        warnings.warn(
            "MGPO: the Hugging Face Trainer is saving a checkpoint while the model holds theta + eps (the "
            "perturbed weights): its model/adapter weights are not the trained weights theta (resuming from it is "
            "still exact). Add mgpo_kernels.integrations.hf.MGPOCallback() to the Trainer's callbacks, which "
            "saves theta.", stacklevel=3)
    g = opt._gstate
    sd["mgpo"] = {k: getattr(g, k).detach().clone() for k in GLOBAL_KEYS}
    sd["mgpo"]["perturbed"] = bool(opt.training)
    mirror = {f"mgpo_{k}": sd["mgpo"][k] for k in MIRRORED_KEYS}  # shared 0-d tensors: saved once by torch.save
    fps = iter(fingerprints(opt))
    index = {}
    for sg in sd["param_groups"]:
        index.update(dict.fromkeys(sg["params"]))
    state = {}
    for key, st in sd["state"].items():
        if key in index and isinstance(st, dict) and "exp_avg" in st:
            st = {**st, **mirror, FINGERPRINT_KEY: next(fps)}
        state[key] = st
    sd["state"] = state
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
            fp = st.get(FINGERPRINT_KEY)
            if fp is not None and (not isinstance(fp, Tensor) or fp.numel() != 4):
                raise ValueError(f"state {FINGERPRINT_KEY!r} of parameter {idx} must be a tensor of 4 numbers")
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
    """'theta', 'perturbed', 'either' (eps is zero here) or 'neither', from the saved and the current sums."""
    fp = fp.detach().double().reshape(4).cpu()
    f_theta, f_pert = fp[:2], fp[2:]
    scale = f_theta.abs() + f_pert.abs() + 1e-300
    sep = ((f_theta - f_pert) / scale).norm()
    if sep <= 1e-13:
        return "either"
    if ((now - f_theta) / scale).norm() <= _MATCH * sep:
        return "theta"
    if ((now - f_pert) / scale).norm() <= _MATCH * sep:
        return "perturbed"
    return "neither"


def _current_sums(opt, pairs) -> List[Tensor]:
    if not pairs:
        return []
    table = torch.stack([_sums(local(p)) for p, _ in pairs])
    return list(_allreduce(table, opt).cpu().unbind(0))


@torch.no_grad()
def load_state_dict(opt, state_dict: Dict[str, Any], torch_load) -> None:
    """Load a MGPO or torch AdamW state dict into ``opt`` (``torch_load``: torch's Optimizer.load_state_dict)."""
    check_loaded(opt, state_dict)
    training = opt.training
    options = {k: opt.param_groups[0][k] for k in OPTION_NAMES}
    extra = _saved_globals(state_dict)

    # what the parameters hold now, decided before torch's load (which does not touch them)
    saved_fp = []
    for sg, group in zip(state_dict["param_groups"], opt.param_groups):
        for idx, p in zip(sg["params"], group["params"]):
            st = state_dict["state"].get(idx)
            if isinstance(st, dict) and "exp_avg" in st:
                saved_fp.append((p, st.get(FINGERPRINT_KEY)))
    with_fp = [(p, fp) for p, fp in saved_fp if fp is not None]
    now = _current_sums(opt, with_fp)
    holds = {id(p): _what_it_holds(fp, s) for (p, fp), s in zip(with_fp, now)}

    torch_load(state_dict)
    from . import _host_cache

    _host_cache.drop(opt)  # the state tensors are new
    for st in opt.state.values():
        if isinstance(st, dict):
            for k in _MIRROR_KEYS:
                st.pop(k, None)
    # torch casts loaded state to the parameter's dtype (bf16 moments, bf16 master!): take the saved tensors
    # again, in fp32, as our state is always fp32
    for sg, group in zip(state_dict["param_groups"], opt.param_groups):
        for idx, p in zip(sg["params"], group["params"]):
            saved = state_dict["state"].get(idx)
            st = opt.state.get(p)
            if not isinstance(saved, dict) or not saved or not isinstance(st, dict) or not st:
                continue
            st["step"] = torch.as_tensor(saved["step"]).detach().to(device=p.device, dtype=torch.float32,
                                                                      copy=True).reshape(())
            for key in ("exp_avg", "exp_avg_sq", "master_param"):
                if key in saved and (key != "master_param" or p.dtype != torch.float32):
                    st[key] = saved[key].detach().to(device=p.device, dtype=torch.float32, copy=True)
                else:
                    st.pop(key, None)
            if p.dtype != torch.float32 and "master_param" not in st:
                # the parameter holds theta (no fingerprint says otherwise)
                st["master_param"] = p.detach().float().clone()

    # global scalars in place: wrappers that copied the optimizer's __dict__ (Lightning) share this object
    g = opt._gstate
    for k in GLOBAL_KEYS:
        getattr(g, k).zero_()
        if extra is not None and k in extra:
            getattr(g, k).copy_(torch.as_tensor(extra[k]).reshape(()))
    # options: from the saved groups; older files kept them under "mgpo"; torch AdamW's have none
    for group in opt.param_groups:
        for k in OPTION_NAMES:
            if k not in group:
                group[k] = extra[k] if (extra is not None and k in extra) else options[k]
        group[MODE_KEY] = training  # the mode is the optimizer's now, not the checkpoint's
    _settle(opt, list(_pairs(opt)), holds, training)


def _settle(opt, pairs, holds: Dict[int, str], training: bool) -> None:
    """Put the loaded parameters where the mode says (theta + eps in train mode, theta in eval mode)."""
    coef = opt._gstate.coef
    neither = []
    for p, st in pairs:
        h = holds.get(id(p), "theta")
        if h == "neither":
            neither.append(p)
        pl, m = local(p).detach(), local(st["exp_avg"])
        master = st.get("master_param")
        if master is not None:  # the master holds theta exactly
            master = local(master)
            pl.copy_(master + m * coef if training else master)
        elif training and h in ("theta", "neither"):
            pl.add_(m * coef)
        elif not training and h == "perturbed":
            pl.sub_(m * coef)
    if neither:
        warnings.warn(
            f"MGPO.load_state_dict: {len(neither)} of {len(holds)} parameters match neither the saved weights "
            "(theta) nor the saved perturbed weights (theta + eps); assumed they hold theta (other weights were "
            "loaded into the model)" + (" and applied the saved perturbation" if training else "") + ". If the "
            "model holds the checkpoint's own weights, load the model's state dict from the same checkpoint first.",
            stacklevel=3,
        )


@torch.no_grad()
def adopt_bypassed_load(opt) -> None:
    """Finish a load that bypassed ``load_state_dict``.

    A wrapper may copy saved per-parameter states into ``opt.state`` itself (``ZeroRedundancyOptimizer.
    load_state_dict`` does, for its shard): the mirrored keys only a saved state carries say so.  The global
    scalars, the fp32 state and the perturbation are then set up here, at the next step, as a load would have.
    """
    found = [(p, st) for p, st in _pairs(opt) if any(k in st for k in _MIRROR_KEYS)]
    if not found:
        return
    first = next((st for _, st in found if all(f"mgpo_{k}" in st for k in MIRRORED_KEYS)), None)
    saved = None if first is None else {k: first[f"mgpo_{k}"] for k in MIRRORED_KEYS}
    for i, (_, st) in enumerate(found):
        for k in MIRRORED_KEYS:
            if f"mgpo_{k}" in st:
                check_global_scalar(k, st[f"mgpo_{k}"], f"loaded state of parameter {i} (mgpo_{k})")
    with_fp = [(p, st[FINGERPRINT_KEY]) for p, st in found if st.get(FINGERPRINT_KEY) is not None]
    now = _current_sums(opt, with_fp)
    holds = {id(p): _what_it_holds(fp, s) for (p, fp), s in zip(with_fp, now)}
    for p, st in found:
        for k in _MIRROR_KEYS:
            st.pop(k, None)
        st["step"] = torch.as_tensor(st["step"]).detach().to(device=p.device, dtype=torch.float32).reshape(())
        for key in ("exp_avg", "exp_avg_sq", "master_param"):
            if key in st:
                st[key] = st[key].detach().to(device=p.device, dtype=torch.float32)
    g = opt._gstate
    if saved is not None:
        for k in MIRRORED_KEYS:
            getattr(g, k).copy_(torch.as_tensor(saved[k]).reshape(()))
    from . import _host_cache

    _host_cache.drop(opt)
    _settle(opt, found, holds, opt.training)
