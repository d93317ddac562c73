"""MGPO: AdamW with momentum-guided perturbation (LoRA-MGPO, Chang et al., Eqs. 2-6), a drop-in torch optimizer.

After ``step()`` the parameters hold theta_{t+1} + eps_{t+1} with eps = coef * m (see backends/base.py), so the
next forward/backward of any training loop is taken at the perturbed point; ``eval()``/``train()`` remove and
re-apply the perturbation.  The options and the mode live in ``param_groups`` (as schedule-free optimizers keep
theirs), so every wrapper that forwards ``param_groups`` reaches them and ``state_dict``/``deepcopy`` carry them.
This class collects the tensors and runs the step; the checks, the host-path cache, the distributed norms and the
checkpoints have their own modules, and the arithmetic of a step is the backend's.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import Tensor

from . import _checkpoint, _checks, _distributed, _host_cache
from . import backends as _backends
from ._checks import DIRECTIONS, MODE_KEY, OPTION_DEFAULTS, OPTION_NAMES, SUPPORTED_DTYPES  # noqa: F401
from ._distributed import local as _local
from .backends.base import GlobalState, GroupTensors, StepConfig


def _option(name: str, doc: str) -> property:
    def fget(self):
        return self.param_groups[0].get(name, OPTION_DEFAULTS[name])

    def fset(self, value):
        _checks.check_option(name, value)
        for g in self.param_groups:
            g[name] = value
        self.defaults[name] = value

    return property(fget, fset, doc=doc + " (kept in every param group; setting it here sets every group)")


class MGPO(torch.optim.Optimizer):
    """AdamW + momentum-guided perturbation of the parameters it holds (the paper's LoRA-MGPO).

    Args:
        params: parameters or param groups (lr, betas, eps, weight_decay may differ per group).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``, with its defaults (decoupled weight decay 0.01;
            the paper fine-tunes with 0).
        rho: perturbation radius (paper: 0.05 NLU, 0.01 LLaMA NLG). ``rho=0`` is AdamW exactly.
        ema_beta: EMA decay of the global gradient norm gbar (paper: 0.9 NLU, 0.8 NLG).
        adaptive_norm: divide the perturbation by gbar (the paper's APN); False is the "LoRA + MGPO" ablation.
        direction: "momentum" (paper Eq. 3) or "-momentum" (Momentum-SAM's sign, used by the authors' code).
        max_grad_norm: clip the global gradient norm to this (torch's clip_grad_norm_ formula), fused in the step.
        gbar_floor: the bound on the perturbation: its 1/gbar uses max(gbar, gbar_floor), so ||eps|| <= rho /
            gbar_floor (default 0.1: the authors' code clamps 1/gbar at 10).  Inactive while gbar >= gbar_floor;
            it keeps the weights finite and theta exact when the gradients vanish.  None: the paper's formula.
        backend: "auto", "reference", "cpp" or "triton" (see ``available_backends()``).
        distributed: how the parameters are spread over a torch.distributed process group (plain tensors; FSDP2
            DTensors are always handled): "auto" decides at the first step, "sharded" (each rank holds a
            different part, as ZeroRedundancyOptimizer: the norms are summed over ``process_group``) or
            "replicated" (each rank holds all of them, as DDP, or runs on its own).
        process_group: the group of a sharded optimizer (default: the world).
        amsgrad, maximize, foreach, fused, capturable, differentiable: ``torch.optim.AdamW``'s flags, accepted so
            that AdamW configurations carry over; amsgrad/maximize/differentiable must be False (refused otherwise),
            the others do not apply (the backend's step is always multi-tensor, and capturable on CUDA).
    """

    _step_supports_amp_scaling = True

    rho = _option("rho", "Perturbation radius")
    ema_beta = _option("ema_beta", "EMA decay of the gradient norm gbar")
    adaptive_norm = _option("adaptive_norm", "Whether the perturbation is divided by gbar (APN)")
    direction = _option("direction", "'momentum' or '-momentum'")
    max_grad_norm = _option("max_grad_norm", "Fused global gradient clipping (None: off)")
    gbar_floor = _option("gbar_floor", "The bound on the perturbation (None: the paper's unbounded formula)")

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        rho: float = OPTION_DEFAULTS["rho"],
        ema_beta: float = OPTION_DEFAULTS["ema_beta"],
        adaptive_norm: bool = OPTION_DEFAULTS["adaptive_norm"],
        direction: str = OPTION_DEFAULTS["direction"],
        max_grad_norm: Optional[float] = OPTION_DEFAULTS["max_grad_norm"],
        gbar_floor: Optional[float] = OPTION_DEFAULTS["gbar_floor"],
        backend: str = "auto",
        *,
        distributed: str = "auto",
        process_group=None,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        _checks.check_group_hparams(lr, betas, eps, weight_decay)
        _checks.check_adamw_flags(dict(amsgrad=amsgrad, maximize=maximize, differentiable=differentiable), "MGPO")
        options = dict(rho=rho, ema_beta=ema_beta, adaptive_norm=adaptive_norm, direction=direction,
                       max_grad_norm=max_grad_norm, gbar_floor=gbar_floor)
        for k, v in options.items():
            _checks.check_option(k, v)
        if backend != "auto" and backend not in _backends.BACKEND_NAMES:
            raise ValueError(
                f"unknown backend {backend!r}; valid backends are {', '.join(('auto',) + _backends.BACKEND_NAMES)}"
            )
        if distributed not in _distributed.DISTRIBUTED_MODES:
            raise ValueError(f"Invalid distributed={distributed!r}: valid values are "
                             f"{', '.join(map(repr, _distributed.DISTRIBUTED_MODES))}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **options)
        defaults[MODE_KEY] = True  # train mode: parameters hold theta + coef*m (coef is 0 until the first step)
        zero = _distributed.sharding_parent()
        super().__init__(params, defaults)
        # a ZeroRedundancyOptimizer may hand a rank no parameters: that rank still takes part in the norms
        self._device = _checks.check_params(self.param_groups,
                                            None if zero is None else getattr(zero, "_default_device", None))
        _distributed.dtensor_mesh(self.param_groups)  # unsupported DTensor layouts fail here (and in step())
        self._requested_backend = backend
        self._backend = _backends.resolve_for(backend, self._device, self.param_groups)
        # Allocated here, never replaced (loads copy into it): wrappers that copy the optimizer's __dict__
        # (Lightning) share it, and under torch.compile an attribute assigned inside the traced step() was lost.
        self._gstate = GlobalState.zeros(self._device)
        # this rank's shard of a ZeroRedundancyOptimizer: sum the norms over its group, and after eval()/train()
        # share this rank's parameters with the others, as ZeRO does after a step (they hold copies of ours)
        self._sharding_parent = zero  # a reference cycle (zero.optim is self), which the GC collects
        if zero is not None and distributed == "auto":
            distributed, process_group = "sharded", zero.process_group
        self._distributed_mode = distributed
        self._process_group = process_group

    # ------------------------------------------------------------------ copy / pickle
    def __getstate__(self) -> Dict[str, Any]:
        """torch.optim.Optimizer pickles only defaults, state and param_groups; the global state and the device
        travel too (the backend and the host-path cache are rebuilt on the other side)."""
        st = super().__getstate__()
        st.update(_gstate=self._gstate, _device=self._device, _requested_backend=self._requested_backend,
                  _distributed_mode=self._distributed_mode)
        return st

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_process_group", None)
        self.__dict__.setdefault("_distributed_mode", "auto")
        if "_device" in self.__dict__ and "_requested_backend" in self.__dict__:
            self._backend = _backends.resolve_for(self._requested_backend, self._device, self.param_groups)

    # ------------------------------------------------------------------ views
    @property
    def backend(self) -> str:
        """Name of the backend that runs the step (what "auto" resolved to)."""
        return self._backend.name

    @property
    def global_state(self) -> Dict[str, Tensor]:
        """Copies of the optimizer-wide scalars: step, gbar, coef (eps = coef * m), skipped (synchronises)."""
        return {k: v.detach().clone() for k, v in self._gstate.tensors().items()}

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (reading it synchronises with the device)."""
        return int(self._gstate.skipped.item())

    @property
    def training(self) -> bool:
        """True in train mode (the parameters hold theta + eps), False in eval mode (theta)."""
        return bool(self.param_groups[0].get(MODE_KEY, True))

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        g = dict(param_group)
        params = g["params"]
        if isinstance(params, set):  # torch refuses it (unordered): let it say so
            return super().add_param_group(g)
        g["params"] = [params] if isinstance(params, Tensor) else list(params)
        # (name, tensor) pairs, as from named_parameters(): torch splits the names off; the tensors are checked
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in g["params"]]
        if self.param_groups:  # options and mode are global: a new group takes the optimizer's current ones
            for k in OPTION_NAMES + (MODE_KEY,):
                g.setdefault(k, self.param_groups[0].get(k, self.defaults.get(k)))
        for k, v in self.defaults.items():
            g.setdefault(k, v)
        _checks.check_group_hparams(g["lr"], g["betas"], g["eps"], g["weight_decay"], "param group")
        _checks.check_adamw_flags(g, "param group")
        for k in OPTION_NAMES:
            _checks.check_option(k, g[k])
        devices = {self._device} if "_device" in self.__dict__ else set()
        _checks.check_param_list(tensors, len(self.param_groups), devices)
        super().add_param_group(g)
        if "_backend" in self.__dict__ and self._requested_backend == "auto":  # the new parameters' layouts
            self._backend = _backends.resolve_for("auto", self._device, self.param_groups)
            _host_cache.drop(self)

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
                    if not isinstance(st, dict) or not st:
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

    # ------------------------------------------------------------------ step
    def _layout(self) -> str:
        layout = self.__dict__.get("_layout_decided")
        if layout is None:
            layout = _distributed.detect_layout(self.param_groups, self._device, self._distributed_mode,
                                                self._process_group)
            self.__dict__["_layout_decided"] = layout
        return layout

    def _reduce_hook(self):
        """The all-reduce of the global sums this step needs (FSDP2, a sharded optimizer), or None."""
        layout = "local" if torch.compiler.is_compiling() else self._layout()
        return _distributed.reduce_hook(self.param_groups, layout, self._process_group)

    def _config(self, cached: bool) -> StepConfig:
        o = _checks.global_options(self.param_groups)
        _checks.check_step_lrs(self.param_groups)
        hook = None if cached else self._reduce_hook()
        return StepConfig(
            rho=float(o["rho"]), ema_beta=float(o["ema_beta"]), adaptive_norm=o["adaptive_norm"],
            sign=DIRECTIONS[o["direction"]],
            max_grad_norm=None if o["max_grad_norm"] is None else float(o["max_grad_norm"]),
            perturbed=self.training,
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
            reduce_hook=hook,
            gbar_floor=float(o["gbar_floor"] or 0.0),
        )

    def _warn_eval_step(self) -> None:
        if not self.__dict__.get("_warned_eval_step") and not torch.compiler.is_compiling():
            self.__dict__["_warned_eval_step"] = True
            warnings.warn(
                "MGPO.step() was called in eval mode: the gradients were taken at theta and no perturbation is "
                "applied, so this is a plain AdamW step, and so is every step until train() is called. Call "
                "opt.train() (or leave `with opt.unperturbed():`) before the next forward pass.",
                stacklevel=5,  # the caller of step(), through torch's step wrapper and no_grad
            )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = None if torch.compiler.is_compiling() else _host_cache.lookup(self)
        if groups is not None:  # same parameters, same gradient pattern as the cached step (plain tensors)
            cfg = self._config(cached=True)
            if not cfg.perturbed:
                self._warn_eval_step()
            if not self._backend.checks_inputs:
                _checks.validate_grads(self.param_groups, self._device)
            if not any(any(gr is not None for gr in g.grads) for g in groups):
                return loss
            try:
                self._backend.step(groups, self._gstate, cfg)
            except Exception:
                # a descriptive error if an input is at fault (nothing was modified)
                _checks.validate_grads(self.param_groups, self._device)
                raise
            return loss
        _checks.validate_grads(self.param_groups, self._device)
        cfg = self._config(cached=False)  # before any state is allocated: it refuses unsupported layouts
        if not torch.compiler.is_compiling():
            _checkpoint.adopt_bypassed_load(self)  # a wrapper that filled self.state itself (ZeRO's load)
        if not cfg.perturbed:
            self._warn_eval_step()
        groups = self._groups(with_grads=True)
        backend = self._backend
        if cfg.reduce_hook is None and not torch.compiler.is_compiling():
            _host_cache.build(self, groups)
        if not any(any(gr is not None for gr in g.grads) for g in groups):
            if cfg.reduce_hook is None:
                return loss  # no gradient anywhere: nothing to do, as in AdamW
            # a sharded optimizer must take part in the all-reduce even with no local gradient
            backend = _backends.resolve("reference", self._device)
        backend.step(groups, self._gstate, cfg)
        return loss

    # ------------------------------------------------------------------ modes
    def _set_mode(self, perturbed: bool) -> None:
        for g in self.param_groups:
            g[MODE_KEY] = perturbed
        zero = self.__dict__.get("_sharding_parent")
        if zero is not None:  # a collective: every rank switches modes together, as it steps together
            zero._sync_params()

    @torch.no_grad()
    def eval(self) -> "MGPO":
        """Remove the perturbation: the parameters hold theta (for evaluation or saving). Idempotent."""
        if self.training:
            self._backend.perturb(self._groups(with_grads=False), self._gstate.coef, apply=False)
            self._set_mode(False)
        return self

    @torch.no_grad()
    def train(self, mode: bool = True) -> "MGPO":
        """Re-apply the perturbation (``train(False)`` is ``eval()``). Idempotent."""
        if not mode:
            return self.eval()
        if not self.training:
            self._backend.perturb(self._groups(with_grads=False), self._gstate.coef, apply=True)
            self._set_mode(True)
        return self

    @contextlib.contextmanager
    def unperturbed(self):
        """``with opt.unperturbed(): evaluate()`` — parameters hold theta inside, previous mode after."""
        was = self.training
        self.eval()
        try:
            yield self
        finally:
            if was:
                self.train()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """torch's state dict plus MGPO's global scalars and, per parameter, fingerprints of theta and theta + eps
        (see _checkpoint.py): a load continues the run whether the model then holds theta or theta + eps."""
        return _checkpoint.state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a MGPO or torch AdamW state dict, before or after the model's weights (theta or theta + eps).

        The mode stays this optimizer's; the parameters are moved to theta + eps (train mode) or theta (eval)."""
        _checkpoint.load_state_dict(self, state_dict, super().load_state_dict)
