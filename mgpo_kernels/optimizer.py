"""MGPO: AdamW with momentum-guided perturbation (LoRA-MGPO, Chang et al., Eqs. 2-6), a drop-in torch optimizer.

After ``step()`` the parameters hold theta_{t+1} + eps_{t+1} with eps = coef * m (see backends/base.py), so the
next forward/backward of any training loop is taken at the perturbed point; ``eval()``/``train()`` remove and
re-apply the perturbation.  This module validates, allocates state and handles checkpoints; the arithmetic of a
step is the backend's.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import operator
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import Tensor

from . import backends as _backends
from .backends.base import GlobalState, GroupTensors, StepConfig

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DIRECTIONS = {"momentum": 1.0, "-momentum": -1.0}
_OPTIONS = ("rho", "ema_beta", "adaptive_norm", "direction", "max_grad_norm")
_GLOBAL_KEYS = ("step", "gbar", "coef", "skipped")  # GlobalState, saved under state_dict()["mgpo"]
_MIRRORED_KEYS = ("step", "gbar", "coef")  # ... and mirrored per parameter for distributed checkpoints
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_GRAD = operator.attrgetter("grad")
_EXP_AVG = operator.itemgetter("exp_avg")
_EXP_AVG_SQ = operator.itemgetter("exp_avg_sq")
_STEP = operator.itemgetter("step")
_UNSET = object()


@dataclass
class _CacheEntry:
    """One param group's tensor lists, valid while its parameters (ids) and gradient pattern are unchanged."""

    params_ref: list
    ids: list
    none_mask: list
    keep: Optional[list]  # which parameters have state (None: all)
    tensors: tuple  # params, exp_avgs, exp_avg_sqs, masters, steps of the parameters with state


def _local(t):
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _check_group_hparams(lr, betas, eps, weight_decay) -> None:
    lr_v = float(lr.item()) if isinstance(lr, Tensor) else lr
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"lr as a tensor must have one element, got shape {tuple(lr.shape)}")
    if not isinstance(lr_v, (int, float)) or not math.isfinite(lr_v) or lr_v < 0:
        raise ValueError(f"Invalid learning rate lr={lr!r}: must be a finite number >= 0")
    if not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"Invalid eps={eps!r}: must be a finite number > 0")
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"Invalid betas={betas!r}: must be a pair (beta1, beta2)") from None
    for name, b in (("betas[0]", b1), ("betas[1]", b2)):
        if not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid {name}={b!r}: must be in [0, 1)")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"Invalid weight_decay={weight_decay!r}: must be a finite number >= 0")


_UNSUPPORTED_ADAMW_FLAGS = {
    "amsgrad": "MGPO's update is the paper's AdamW; AMSGrad's max of second moments is not implemented",
    "maximize": "MGPO minimises; negate the loss to maximise",
    "differentiable": "MGPO's step is not differentiable (fused kernels)",
}


def _check_adamw_flags(flags: Dict[str, Any], where: str) -> None:
    """torch.optim.AdamW's flags, accepted for drop-in use: the supported values are False/None (amsgrad,
    maximize, differentiable); foreach, fused and capturable only choose how AdamW runs, which the backend decides
    here (always multi-tensor, and capturable on CUDA), so any value is accepted."""
    for name, why in _UNSUPPORTED_ADAMW_FLAGS.items():
        if flags.get(name):
            raise ValueError(f"{where}: {name}={flags[name]!r} is not supported ({why})")


def _check_option(name: str, value) -> None:
    if name == "rho":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"Invalid rho={value!r}: must be a finite number >= 0")
    elif name == "ema_beta":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid ema_beta={value!r}: must be in [0, 1)")
    elif name == "adaptive_norm":
        if not isinstance(value, bool):
            raise ValueError(f"Invalid adaptive_norm={value!r}: must be True or False")
    elif name == "direction":
        if value not in DIRECTIONS:
            raise ValueError(f"Invalid direction={value!r}: valid directions are {', '.join(map(repr, DIRECTIONS))}")
    elif name == "max_grad_norm":
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
        ):
            raise ValueError(f"Invalid max_grad_norm={value!r}: must be None or a finite number > 0")


class MGPO(torch.optim.Optimizer):
    """AdamW + momentum-guided perturbation of the parameters it holds (the paper's LoRA-MGPO).

    Args:
        params: parameters or param groups (lr, betas, eps, weight_decay may differ per group).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay; default 0).
        rho: perturbation radius (paper: 0.05 NLU, 0.01 LLaMA NLG). ``rho=0`` is AdamW exactly.
        ema_beta: EMA decay of the global gradient norm gbar (paper: 0.9 NLU, 0.8 NLG).
        adaptive_norm: divide the perturbation by gbar (the paper's APN); False is the "LoRA + MGPO" ablation.
        direction: "momentum" (paper Eq. 3) or "-momentum" (Momentum-SAM's sign, used by the authors' code).
        max_grad_norm: clip the global gradient norm to this (torch's clip_grad_norm_ formula), fused in the step.
        backend: "auto", "reference", "cpp" or "triton" (see ``available_backends()``).
        amsgrad, maximize, foreach, fused, capturable, differentiable: ``torch.optim.AdamW``'s flags, accepted so
            that AdamW configurations carry over; amsgrad/maximize/differentiable must be False (refused otherwise),
            the others do not apply (the backend's step is always multi-tensor, and capturable on CUDA).
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rho: float = 0.05,
        ema_beta: float = 0.9,
        adaptive_norm: bool = True,
        direction: str = "momentum",
        max_grad_norm: Optional[float] = None,
        backend: str = "auto",
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        _check_group_hparams(lr, betas, eps, weight_decay)
        _check_adamw_flags(dict(amsgrad=amsgrad, maximize=maximize, differentiable=differentiable), "MGPO")
        opts = dict(rho=rho, ema_beta=ema_beta, adaptive_norm=adaptive_norm, direction=direction,
                    max_grad_norm=max_grad_norm)
        for k, v in opts.items():
            _check_option(k, v)
        if backend != "auto" and backend not in _backends.BACKEND_NAMES:
            raise ValueError(
                f"unknown backend {backend!r}; valid backends are {', '.join(('auto',) + _backends.BACKEND_NAMES)}"
            )
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self._options: Dict[str, Any] = opts
        self._gstate: Optional[GlobalState] = None
        self._perturbed = True  # train mode: parameters hold theta + coef*m (coef is 0 until the first step)
        super().__init__(params, defaults)
        self._device = self._check_params()
        self._dtensor_mesh()  # unsupported DTensor sharding fails here (and again in step() after a param swap)
        self.backend_name = backend
        self._backend = _backends.resolve(backend, self._device)
        # Allocated here, not lazily in step(): under torch.compile, an attribute assigned inside the traced
        # step() was lost (every compiled call then started from a fresh zero state).  integrations issue.
        self._global_state()

    # ------------------------------------------------------------------ copy / pickle
    def __getstate__(self) -> Dict[str, Any]:
        """torch.optim.Optimizer pickles only defaults, state and param_groups; MGPO's own attributes must travel
        too, or a ``copy.deepcopy``/unpickled optimizer cannot step.  The backend object and the host-path cache
        are rebuilt on the other side."""
        st = super().__getstate__()
        st.update(_options=dict(self._options), _gstate=self._gstate, _perturbed=self._perturbed,
                  _device=self._device, backend_name=self.backend_name)
        return st

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_device" in self.__dict__ and "backend_name" in self.__dict__:
            self._backend = _backends.resolve(self.backend_name, self._device)

    # ------------------------------------------------------------------ options
    def __getattr__(self, name):
        opts = self.__dict__.get("_options")
        if opts is not None and name in _OPTIONS:
            return opts[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in _OPTIONS and "_options" in self.__dict__:
            _check_option(name, value)
            self._options[name] = value
        else:
            super().__setattr__(name, value)

    @property
    def backend(self) -> str:
        """Name of the backend that runs the step (what "auto" resolved to)."""
        return self._backend.name

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (reading it synchronises with the device)."""
        return 0 if self._gstate is None else int(self._gstate.skipped.item())

    def add_param_group(self, param_group: dict) -> None:
        g = dict(param_group)
        for k, v in self.defaults.items():
            g.setdefault(k, v)
        _check_group_hparams(g["lr"], g["betas"], g["eps"], g["weight_decay"])
        _check_adamw_flags(g, "param group")
        if "_device" in self.__dict__:  # after construction: check the new parameters before adding them
            new = g["params"]
            new = [new] if isinstance(new, Tensor) else list(new)
            self._check_param_list(new, len(self.param_groups), {self._device})
            param_group = dict(param_group, params=new)
        super().add_param_group(param_group)

    def _check_params(self) -> torch.device:
        devices: set = set()
        for gi, group in enumerate(self.param_groups):
            self._check_param_list(group["params"], gi, devices)
        if not devices:
            raise ValueError("MGPO got no parameters")
        return next(iter(devices))

    @staticmethod
    def _check_param_list(params, gi: int, devices: set) -> None:
        """Floating dtype we support, and one device overall (``devices`` accumulates)."""
        for pi, p in enumerate(params):
            if not (p.is_floating_point()):
                raise TypeError(
                    f"MGPO needs floating-point parameters; param {pi} of group {gi} has dtype {p.dtype}"
                    + (" (complex parameters are not supported)" if p.is_complex() else "")
                )
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"MGPO supports float32, bfloat16 and float16 parameters; param {pi} of group {gi} has "
                    f"dtype {p.dtype}"
                )
            if devices and p.device not in devices:
                raise ValueError(
                    "MGPO needs all parameters on one device (its norms are global); got "
                    f"{sorted(map(str, devices | {p.device}))}"
                )
            devices.add(p.device)

    # ------------------------------------------------------------------ state
    def _global_state(self) -> GlobalState:
        if self._gstate is None:
            self._gstate = GlobalState.zeros(self._device)
        return self._gstate

    def _validate_grads(self) -> None:
        """Every check that can fail, before anything is modified (one cheap test per parameter; the detailed
        checks with their messages only for a parameter that fails it)."""
        dev = self._device
        strided = torch.strided
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                gr = p.grad
                if p.device == dev and p.dtype in SUPPORTED_DTYPES and (
                    gr is None
                    or (gr.layout == strided and gr.dtype == p.dtype and gr.shape == p.shape and gr.device == dev)
                ):
                    continue
                self._explain_bad_param(gi, pi, p)

    def _explain_bad_param(self, gi: int, pi: int, p: Tensor) -> None:
        if p.device != self._device:
            raise ValueError(
                f"MGPO needs all parameters on one device: param {pi} of group {gi} is on {p.device}, "
                f"the optimizer's state is on {self._device}"
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

    def _init_state(self, p: Tensor) -> dict:
        st = self.state[p]
        if len(st) == 0:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            if p.dtype != torch.float32:
                # the parameter holds theta exactly here: its perturbation is coef * m = 0
                st["master_param"] = p.detach().clone(memory_format=torch.preserve_format).float()
        return st

    def _groups(self, with_grads: bool) -> List[GroupTensors]:
        """The tensors of every group that has state (allocating it for new gradients)."""
        out = []
        for group in self.param_groups:
            params, grads, ms, vs, masters, steps = [], [], [], [], [], []
            for p in group["params"]:
                if with_grads and p.grad is not None:
                    st = self._init_state(p)
                else:
                    st = self.state.get(p)
                    if not st:
                        continue
                params.append(_local(p).detach())
                grads.append(_local(p.grad) if (with_grads and p.grad is not None) else None)
                ms.append(_local(st["exp_avg"]))
                vs.append(_local(st["exp_avg_sq"]))
                masters.append(_local(st["master_param"]) if "master_param" in st else None)
                steps.append(st["step"])
            b1, b2 = group["betas"]
            out.append(GroupTensors(params, grads, ms, vs, masters, steps, group["lr"], b1, b2,
                                    group["eps"], group["weight_decay"]))
        return out

    # The per-step host path.  A step of 448 LoRA tensors used to spend ~0.9 ms in Python and argument
    # conversion (as much as 5 % of a CPU step at r=8, and all of a GPU step's time on the host), so while the
    # same parameters have gradients (the normal training loop) the tensor lists are built once and reused:
    # the check is C-speed (ids and the None pattern of the gradients), and only the gradients and the groups'
    # hyper-parameters are read anew.  Backends that check their inputs themselves (cpp) then skip the Python
    # per-parameter validation; if they refuse an input, the Python checks run to name the problem.
    def _build_group_cache(self, groups: List[GroupTensors]) -> None:
        entries = []
        for group, g in zip(self.param_groups, groups):
            ps = list(group["params"])  # kept: the ids compared below cannot be reused while the cache lives
            has_state = [bool(self.state.get(p)) for p in ps]
            with_state = list(itertools.compress(ps, has_state))
            # the parameter itself, not a detached alias: an alias would go stale if ``p.data`` is reassigned
            entries.append(_CacheEntry(
                params_ref=ps, ids=list(map(id, ps)), none_mask=list(map(operator.is_, (p.grad for p in ps),
                                                                         itertools.repeat(None))),
                keep=None if all(has_state) else has_state,
                tensors=(with_state, g.exp_avgs, g.exp_avg_sqs, g.masters, g.steps),
            ))
        self.__dict__["_group_cache"] = (id(self.state), self.state, entries)

    def _cached_groups(self) -> Optional[List[GroupTensors]]:
        """The groups of this step from the cache, or None if the parameters or their gradients changed."""
        cache = self.__dict__.get("_group_cache")
        if cache is None or cache[1] is not self.state or len(cache[2]) != len(self.param_groups):
            return None
        out = []
        for group, e in zip(self.param_groups, cache[2]):
            ps = group["params"]
            if list(map(id, ps)) != e.ids:
                return None
            grads = list(map(_GRAD, ps))
            if list(map(operator.is_, grads, itertools.repeat(None))) != e.none_mask:
                return None
            if e.keep is not None:
                grads = list(itertools.compress(grads, e.keep))
            params, ms, vs, masters, steps = e.tensors
            # the state as it is now: a dict or a tensor in it replaced between steps (the usual loops that move
            # optimizer state to a device do either) must not leave the cache updating the old tensors
            states = list(map(self.state.get, params))
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

    def _config(self, reduce_hook=_UNSET) -> StepConfig:
        o = self._options
        return StepConfig(
            rho=float(o["rho"]), ema_beta=float(o["ema_beta"]), adaptive_norm=bool(o["adaptive_norm"]),
            sign=DIRECTIONS[o["direction"]],
            max_grad_norm=None if o["max_grad_norm"] is None else float(o["max_grad_norm"]),
            perturbed=self._perturbed,
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
            reduce_hook=self._reduce_hook() if reduce_hook is _UNSET else reduce_hook,
        )

    def _dtensor_mesh(self):
        """The mesh of the DTensor (FSDP2) parameters, None if there are none; refuses layouts the single
        all-reduce of the global sums would get wrong.

        One all-reduce is exact when every element lives on exactly one rank: all parameters DTensors on one 1-D
        mesh with a Shard placement (what ``fully_shard`` makes, uneven shards included).  Replicate (counted once
        per rank), 2-D meshes (HSDP, FSDP + tensor parallel), several meshes, or DTensors mixed with plain tensors
        would count elements more than once or not at all: raise instead of giving a wrong result.
        """
        mesh, plain, where = None, None, None
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if getattr(p, "_is_flat_param", False):  # FSDP1's FlatParameter is a plain nn.Parameter + this flag
                    raise NotImplementedError(
                        f"param {pi} of group {gi} is an FSDP1 FlatParameter (a flat shard): MGPO's global norms "
                        "would be per rank. Use FSDP2 (torch.distributed.fsdp.fully_shard) or DDP."
                    )
                if type(p) in _PLAIN_TYPES:  # fast path: a plain tensor / nn.Parameter has no mesh
                    plain = plain or f"param {pi} of group {gi}"
                    continue
                m = getattr(p, "device_mesh", None)
                if m is None:
                    plain = plain or f"param {pi} of group {gi}"
                    continue
                placements = tuple(p.placements)
                if m.ndim != 1 or len(placements) != 1 or not placements[0].is_shard():
                    raise NotImplementedError(
                        f"MGPO supports DTensor parameters sharded on a 1-D device mesh (FSDP2 fully_shard); param "
                        f"{pi} of group {gi} has placements {placements} on a {m.ndim}-D mesh. Replicated, "
                        "HSDP and tensor-parallel layouts are not supported: its global norms would be wrong."
                    )
                if mesh is None:
                    mesh, where = m, f"param {pi} of group {gi}"
                elif m != mesh:
                    raise NotImplementedError(
                        f"MGPO needs all DTensor parameters on one device mesh; {where} and param {pi} of group "
                        f"{gi} are on different meshes"
                    )
        if mesh is not None and plain is not None:
            raise NotImplementedError(
                f"MGPO got DTensor (sharded) parameters and plain tensors ({plain}) together; its global norms need "
                "all parameters sharded the same way (apply fully_shard to every module whose parameters it holds)"
            )
        return mesh

    def _reduce_hook(self):
        """FSDP2/DTensor: all-reduce the global sums over the parameters' mesh (a few scalars per step)."""
        mesh = self._dtensor_mesh()
        if mesh is None:
            return None
        import torch.distributed as dist

        pg = mesh.get_group()
        return lambda sums: dist.all_reduce(sums, group=pg)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = None if torch.compiler.is_compiling() else self._cached_groups()
        if groups is not None:  # same parameters, same gradient pattern as the cached step (plain tensors)
            cfg = self._config(reduce_hook=None)
            if not self._backend.checks_inputs:
                self._validate_grads()
            if not any(any(gr is not None for gr in g.grads) for g in groups):
                return loss
            try:
                self._backend.step(groups, self._global_state(), cfg)
            except Exception:
                self._validate_grads()  # a descriptive error if an input is at fault (nothing was modified)
                raise
            return loss
        self._validate_grads()
        cfg = self._config()  # before any state is allocated: it refuses unsupported DTensor layouts
        groups = self._groups(with_grads=True)
        if cfg.reduce_hook is None and not torch.compiler.is_compiling():
            self._build_group_cache(groups)
        if not any(any(gr is not None for gr in g.grads) for g in groups):
            return loss  # no gradient anywhere: nothing to do, as in AdamW
        self._backend.step(groups, self._global_state(), cfg)
        return loss

    # ------------------------------------------------------------------ modes
    @torch.no_grad()
    def eval(self) -> "MGPO":
        """Remove the perturbation: the parameters hold theta (for evaluation or saving). Idempotent."""
        if self._perturbed:
            if self._gstate is not None:
                self._backend.perturb(self._groups(with_grads=False), self._gstate.coef, apply=False)
            self._perturbed = False
        return self

    @torch.no_grad()
    def train(self, mode: bool = True) -> "MGPO":
        """Re-apply the perturbation (``train(False)`` is ``eval()``). Idempotent."""
        if not mode:
            return self.eval()
        if not self._perturbed:
            if self._gstate is not None:
                self._backend.perturb(self._groups(with_grads=False), self._gstate.coef, apply=True)
            self._perturbed = True
        return self

    @property
    def training(self) -> bool:
        return self._perturbed

    @contextlib.contextmanager
    def unperturbed(self):
        """``with opt.unperturbed(): evaluate()`` — parameters hold theta inside, previous mode after."""
        was = self._perturbed
        self.eval()
        try:
            yield self
        finally:
            if was:
                self.train()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        g = self._global_state()
        sd["mgpo"] = {
            "step": g.step.detach().clone(),
            "gbar": g.gbar.detach().clone(),
            "coef": g.coef.detach().clone(),
            "skipped": g.skipped.detach().clone(),
            **{k: self._options[k] for k in _OPTIONS},
        }
        # torch.distributed.checkpoint (get/set_optimizer_state_dict, what FSDP2 users and accelerate use) keeps
        # only "state" and "param_groups" and drops the "mgpo" key: mirror the global scalars in every
        # parameter's state (shared 0-d tensors, saved once by torch.save), so load_state_dict can recover them
        # (not the skipped-steps counter, which is only a statistic).  integrations issue.
        mirror = {f"mgpo_{k}": sd["mgpo"][k] for k in _MIRRORED_KEYS}
        sd["state"] = {idx: {**st, **mirror} for idx, st in sd["state"].items()}
        return sd

    def _check_loaded_state(self, state_dict: Dict[str, Any]) -> None:
        """Shapes and kinds of the saved state against our parameters, before anything is modified."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict: expected keys 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(saved_groups)} param groups, the optimizer has {len(self.param_groups)}"
            )
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(
                    f"param group {gi}: state dict has {len(sg['params'])} parameters, the optimizer has "
                    f"{len(g['params'])}"
                )
            _check_group_hparams(sg.get("lr", g["lr"]), sg.get("betas", g["betas"]), sg.get("eps", g["eps"]),
                                 sg.get("weight_decay", g["weight_decay"]))
            _check_adamw_flags(sg, f"state dict param group {gi}")
            for idx, p in zip(sg["params"], g["params"]):
                st = state_dict["state"].get(idx)
                if st is None:
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
        extra = state_dict.get("mgpo")
        if extra is not None:
            for k in _OPTIONS:
                if k in extra:
                    _check_option(k, extra[k])

    @torch.no_grad()
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a MGPO or torch AdamW state dict.  Load the model's (unperturbed) weights first: in train mode the
        perturbation of the loaded state is then applied to them, as the uninterrupted run had it."""
        self._check_loaded_state(state_dict)
        state_dict = dict(state_dict)
        extra = state_dict.pop("mgpo", None)
        if extra is None:  # a distributed checkpoint dropped it: take the per-parameter mirror (see state_dict)
            for st in state_dict["state"].values():
                if isinstance(st, dict) and all(f"mgpo_{k}" in st for k in _MIRRORED_KEYS):
                    extra = {k: st[f"mgpo_{k}"] for k in _MIRRORED_KEYS}
                    break
        super().load_state_dict(state_dict)
        self.__dict__.pop("_group_cache", None)  # the state tensors are new
        for st in self.state.values():
            for k in _MIRRORED_KEYS:
                st.pop(f"mgpo_{k}", None)
        # torch casts loaded state to the parameter's dtype (bf16 moments, bf16 master!): take the saved
        # tensors again, in fp32, as our state is always fp32.
        for sg, group in zip(state_dict["param_groups"], self.param_groups):
            for idx, p in zip(sg["params"], group["params"]):
                saved = state_dict["state"].get(idx)
                st = self.state.get(p)
                if not saved or not st:
                    continue
                st["step"] = torch.as_tensor(saved["step"]).detach().to(device=p.device, dtype=torch.float32,
                                                                          copy=True).reshape(())
                for key in ("exp_avg", "exp_avg_sq", "master_param"):
                    if key in saved and (key != "master_param" or p.dtype != torch.float32):
                        st[key] = saved[key].detach().to(device=p.device, dtype=torch.float32, copy=True)
                    else:
                        st.pop(key, None)
                if p.dtype != torch.float32 and "master_param" not in st:
                    st["master_param"] = p.detach().float().clone()
        g = GlobalState.zeros(self._device)
        if extra is not None:
            for k in _GLOBAL_KEYS:
                if k in extra:
                    getattr(g, k).copy_(torch.as_tensor(extra[k]))
            for k in _OPTIONS:
                if k in extra:
                    self._options[k] = extra[k]
        self._gstate = g
        # the model holds theta (checkpoints are unperturbed); put it where the uninterrupted run was
        if self._perturbed:
            self._perturbed = False
            self.train()
