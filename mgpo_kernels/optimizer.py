"""MGPO: AdamW with momentum-guided perturbation (LoRA-MGPO, Chang et al., Eqs. 2-6), a drop-in torch optimizer.

Theta at rest (_at_rest.py): after ``step()`` the parameters hold theta_{t+1}; the next training forward of a
module that holds them applies eps_{t+1} = coef * m_t just in time, and the next ``step()`` removes it in its
update.  Whatever reads or writes the parameters between steps (a save, an evaluation, an average, a load, a
pruning) deals with theta, as with any optimizer.  The options and the mode live in ``param_groups`` (as
schedule-free optimizers keep theirs), so every wrapper that forwards ``param_groups`` reaches them and
``state_dict``/``deepcopy`` carry them.
This class collects the tensors and runs the step; the checks, the host-path cache, the distributed norms and the
checkpoints have their own modules, and the arithmetic of a step is the backend's.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import Tensor

from . import _at_rest, _checkpoint, _checks, _deepspeed, _distributed, _host_cache
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
        defaults[MODE_KEY] = True  # train mode: a training forward applies eps (eval mode: it does not)
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
        self._at_rest = _at_rest.AtRest()  # where eps is; shared the same way
        # this rank's shard of a ZeroRedundancyOptimizer: sum the norms over its group, and after applying or removing
        # share this rank's parameters with the others, as ZeRO does after a step (they hold copies of ours)
        self._sharding_parent = zero  # a reference cycle (zero.optim is self), which the GC collects
        if zero is not None and hasattr(zero, "register_load_state_dict_post_hook"):
            # ZeRO's load_state_dict fills this optimizer's state itself, then runs its own post-hooks: take the
            # global scalars there, so the next training forward applies the loaded eps
            ref = weakref.ref(self)
            zero.register_load_state_dict_post_hook(
                lambda _z: ref() is not None and _checkpoint.adopt_bypassed_load(ref()))
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
                  _distributed_mode=self._distributed_mode, _at_rest=self._at_rest)
        return st

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_process_group", None)
        self.__dict__.setdefault("_distributed_mode", "auto")
        rest = self.__dict__.setdefault("_at_rest", _at_rest.AtRest())
        if rest.maybe_nonzero and self.param_groups and self.training and not rest.applied:
            _at_rest.arm(self)  # a copy continues where the original was: the next training forward applies eps
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
        self._settle_deepspeed()
        return {k: v.detach().clone() for k, v in self._gstate.tensors().items()}

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (reading it synchronises with the device)."""
        return int(self._gstate.skipped.item())

    @property
    def training(self) -> bool:
        """True in train mode (a training forward applies eps), False in eval mode (nothing is applied)."""
        return bool(self.param_groups[0].get(MODE_KEY, True)) if self.param_groups else True

    @property
    def perturbation_applied(self) -> bool:
        """True between a training forward that applied eps and the next ``step()`` (the only time the parameters
        hold theta + eps)."""
        return self._at_rest.applied

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
        if "_at_rest" in self.__dict__:
            self._at_rest.forget_params()

    def _init_state(self, p: Tensor) -> dict:
        st = self.state[p]
        if len(st) == 0:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            if p.dtype != torch.float32:
                # the parameter holds theta here (at rest, or perturbed by coef * m = 0)
                st["master_param"] = p.detach().clone(memory_format=torch.preserve_format).float()
                self._at_rest.has_masters = True
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
        """The step's configuration; ``perturbed``: the parameters hold theta + eps (the forward applied it)."""
        return self._step_config(None if cached else self._reduce_hook(), self._at_rest.applied)

    def _step_config(self, hook, perturbed: bool = False) -> StepConfig:
        o = _checks.global_options(self.param_groups)
        _checks.check_step_lrs(self.param_groups)
        return StepConfig(
            rho=float(o["rho"]), ema_beta=float(o["ema_beta"]), adaptive_norm=o["adaptive_norm"],
            sign=DIRECTIONS[o["direction"]],
            max_grad_norm=None if o["max_grad_norm"] is None else float(o["max_grad_norm"]),
            perturbed=perturbed,
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

    def _warn_missed_apply(self) -> None:
        rest = self._at_rest
        if rest.armed and not rest.applied and not rest.warned_missed and not torch.compiler.is_compiling():
            rest.warned_missed = True
            warnings.warn(
                "MGPO.step(): no training forward applied the perturbation since the last step (no module holding "
                "MGPO's parameters was called in training mode with grad enabled), so this gradient was taken at "
                "theta and this is a plain AdamW step. A loop that computes the loss without calling the model as "
                "an nn.Module (raw tensors, a functional_call) must call opt.apply_perturbation() before its "
                "forward; a loop that trains with the model in eval mode should call model.train().",
                stacklevel=4,  # the caller of step(), through torch's step wrapper and no_grad
            )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        link = self.__dict__.get("_deepspeed")  # DeepSpeed ZeRO drives this optimizer (_deepspeed.py)
        if link is not None:
            link.step(self, self._step_config)
            return loss
        self._warn_missed_apply()
        groups = None if torch.compiler.is_compiling() else _host_cache.lookup(self)
        if groups is not None:  # same parameters, same gradient pattern as the cached step (plain tensors)
            cfg = self._config(cached=True)
            if not self.training:
                self._warn_eval_step()
            if not self._backend.checks_inputs:
                _checks.validate_grads(self.param_groups, self._device)
            if not any(any(gr is not None for gr in g.grads) for g in groups):
                return self._stepped_without_grads(loss)
            if self._at_rest.has_masters and not cfg.perturbed:
                _checkpoint.sync_masters(groups)  # bf16/fp16 parameters written since the last step are theta
            try:
                self._backend.step(groups, self._gstate, cfg)
            except Exception:
                # a descriptive error if an input is at fault (nothing was modified)
                _checks.validate_grads(self.param_groups, self._device)
                raise
            return self._stepped(cfg, loss)
        link = None if torch.compiler.is_compiling() else _deepspeed.attach(self)
        if link is not None:  # the first call from DeepSpeed ZeRO
            link.step(self, self._step_config)
            return loss
        _checks.validate_grads(self.param_groups, self._device)
        cfg = self._config(cached=False)  # before any state is allocated: it refuses unsupported layouts
        if not torch.compiler.is_compiling():
            _checkpoint.adopt_bypassed_load(self)  # a wrapper that filled self.state itself (ZeRO's load)
        if not self.training:
            self._warn_eval_step()
        groups = self._groups(with_grads=True)
        backend = self._backend
        if cfg.reduce_hook is None and not torch.compiler.is_compiling():
            _host_cache.build(self, groups)
        if not any(any(gr is not None for gr in g.grads) for g in groups):
            if cfg.reduce_hook is None:
                return self._stepped_without_grads(loss)  # no gradient anywhere: nothing to do, as in AdamW
            # a sharded optimizer must take part in the all-reduce even with no local gradient
            backend = _backends.resolve("reference", self._device)
        if self._at_rest.has_masters and not cfg.perturbed:
            _checkpoint.sync_masters(groups)  # bf16/fp16 parameters written since the last step are theta
        backend.step(groups, self._gstate, cfg)
        return self._stepped(cfg, loss)

    def _stepped(self, cfg: StepConfig, loss):
        """After a step: theta_{t+1} is at rest; in train mode the next training forward applies eps_{t+1}."""
        rest = self._at_rest
        rest.applied = False
        rest.maybe_nonzero = rest.maybe_nonzero or cfg.rho != 0.0
        if self.training and rest.maybe_nonzero:
            _at_rest.arm(self)
        return loss

    def _stepped_without_grads(self, loss):
        """No gradient anywhere (nothing to update, as in AdamW): still leave theta at rest."""
        if self._at_rest.applied:
            self._remove_perturbation()
            _at_rest.arm(self)
        return loss

    # ------------------------------------------------------------------ eps: apply (forward) and remove
    @torch.no_grad()
    def apply_perturbation(self) -> None:
        """Apply eps = coef * m to the parameters now (one multi-tensor pass); the next ``step()`` removes it.

        Called by the forward pre-hook (see _at_rest.py) at the first training forward after a step; call it
        yourself before the forward of a loop that never calls an ``nn.Module`` holding the parameters (raw tensors,
        ``torch.func.functional_call``).  Does nothing in eval mode, when eps is already applied, or when eps is
        known to be zero (before the first step, rho = 0)."""
        rest = self._at_rest
        if rest.applied or not self.training:
            return
        link = self.__dict__.get("_deepspeed")
        if link is not None:  # eps goes into DeepSpeed's model copy; its fp32 masters stay theta
            _at_rest.disarm(rest)
            if rest.maybe_nonzero:
                link.apply()
                rest.applied = True
            return
        # the step's cached lists while the parameters and the state are the ones it cached (no load since)
        groups = None if torch.compiler.is_compiling() else _host_cache.lookup(self, with_grads=False)
        if groups is None and not torch.compiler.is_compiling():
            _checkpoint.adopt_bypassed_load(self)  # a wrapper that filled self.state itself (ZeRO's load)
        _at_rest.disarm(rest)
        if not rest.maybe_nonzero:
            return
        coef = self._gstate.coef
        if groups is None:
            groups = self._groups(with_grads=False)
        if rest.has_masters:
            _checkpoint.sync_masters(groups)  # a bf16/fp16 parameter written since the step: its value is theta
        if coef.device.type == "cpu" and float(coef) == 0.0:  # nothing to add (no host sync on a CPU tensor)
            return
        if any(g.params for g in groups):
            self._backend.perturb(groups, coef, apply=True)
        rest.applied = True
        self._share_with_ranks()

    @torch.no_grad()
    def _remove_perturbation(self) -> None:
        """Remove the eps a training forward applied (eval() or a load before the step that would have)."""
        rest = self._at_rest
        if not rest.applied:
            return
        link = self.__dict__.get("_deepspeed")
        if link is not None:
            return link.remove()
        self._backend.perturb(self._groups(with_grads=False), self._gstate.coef, apply=False)
        rest.applied = False
        self._share_with_ranks()

    def _share_with_ranks(self) -> None:
        zero = self.__dict__.get("_sharding_parent")
        if zero is not None:  # a collective: the ranks hold copies of the parameters this rank owns (ZeRO)
            zero._sync_params()

    # ------------------------------------------------------------------ modes
    def _set_mode(self, perturbed: bool) -> None:
        for g in self.param_groups:
            g[MODE_KEY] = perturbed

    @torch.no_grad()
    def eval(self) -> "MGPO":
        """Eval mode: the parameters hold theta (eps removed if a training forward had applied it) and no forward
        applies eps until ``train()``.  ``step()`` in eval mode is a plain AdamW step.  Idempotent."""
        self._remove_perturbation()
        _at_rest.disarm(self._at_rest)
        self._set_mode(False)
        return self

    @torch.no_grad()
    def train(self, mode: bool = True) -> "MGPO":
        """Train mode (``train(False)`` is ``eval()``): the next training forward applies eps. Moves nothing."""
        if not mode:
            return self.eval()
        self._set_mode(True)
        rest = self._at_rest
        if rest.maybe_nonzero and not rest.applied:
            _at_rest.arm(self)
        return self

    @contextlib.contextmanager
    def unperturbed(self):
        """``with opt.unperturbed(): evaluate()`` — eval mode inside (theta, nothing applied), previous mode after."""
        was = self.training
        self.eval()
        try:
            yield self
        finally:
            if was:
                self.train()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """torch's state dict plus MGPO's global scalars (under ``"mgpo"`` and mirrored per parameter, see
        _checkpoint.py).  The parameters are at theta between steps, so the model's weights saved beside it are
        theta and a load continues the run."""
        self._settle_deepspeed()
        return _checkpoint.state_dict(self, super().state_dict())

    def _settle_deepspeed(self) -> None:
        link = self.__dict__.get("_deepspeed")
        if link is not None:
            link.settle()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a MGPO (this version's or 0.1.0's) or torch AdamW state dict; the parameters are not written.

        torch's load runs (with its pre/post hooks); MGPO's own pre-hook checks the dict (after the user's
        pre-hooks) and its post-hook (before the user's) keeps the moments fp32 and the masters consistent with
        the parameters.  The mode stays this optimizer's."""
        _deepspeed.attach(self)  # called by DeepSpeed's load_checkpoint: the forward must find the model's params
        self._remove_perturbation()  # a load between a training forward and its step: theta first
        _checkpoint.install_load_hooks(self)
        super().load_state_dict(state_dict)
