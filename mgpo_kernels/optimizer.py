"""MGPO: AdamW with momentum-guided perturbation (LoRA-MGPO, Chang et al., Eqs. 2-6), a drop-in torch optimizer.

Theta at rest (_at_rest.py): after ``step()`` the parameters hold theta_{t+1}; the next training forward of a
module that holds them applies eps_{t+1} = coef * m_t just in time, and the next ``step()`` removes it in its
update.  Whatever reads or writes the parameters between steps (a save, an evaluation, an average, a load, a
pruning) deals with theta, as with any optimizer.  The options and the mode live in ``param_groups`` (as
schedule-free optimizers keep theirs), so every wrapper that forwards ``param_groups`` reaches them and
``state_dict``/``deepcopy`` carry them.
This class holds the options and the state and runs the step; the checks (_checks.py), the tensor lists
(_host_cache.py), the distributed norms (_distributed.py), where eps is (_at_rest.py) and the checkpoints
(_checkpoint.py) have their own modules, and the arithmetic of a step is the backend's (backends/).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Optional

import torch
from torch import Tensor

from . import _at_rest, _checkpoint, _checks, _deepspeed, _distributed, _host_cache, _perturbation
from . import backends as _backends
from ._checks import DIRECTIONS, MODE_KEY, OPTION_DEFAULTS, OPTION_NAMES, SUPPORTED_DTYPES  # noqa: F401
from .backends.base import GlobalState, StepConfig


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

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, rho: float = OPTION_DEFAULTS["rho"],
                 ema_beta: float = OPTION_DEFAULTS["ema_beta"], adaptive_norm: bool = OPTION_DEFAULTS["adaptive_norm"],
                 direction: str = OPTION_DEFAULTS["direction"],
                 max_grad_norm: Optional[float] = OPTION_DEFAULTS["max_grad_norm"],
                 gbar_floor: Optional[float] = OPTION_DEFAULTS["gbar_floor"], backend: str = "auto", *,
                 distributed: str = "auto", process_group=None, amsgrad: bool = False, maximize: bool = False,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False):
        options = dict(rho=rho, ema_beta=ema_beta, adaptive_norm=adaptive_norm, direction=direction,
                       max_grad_norm=max_grad_norm, gbar_floor=gbar_floor)
        _checks.check_constructor(lr, betas, eps, weight_decay, options, backend, _backends.BACKEND_NAMES,
                                  distributed, _distributed.DISTRIBUTED_MODES,
                                  dict(amsgrad=amsgrad, maximize=maximize, differentiable=differentiable))
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **options)
        defaults[MODE_KEY] = True  # train mode: a training forward applies eps (eval mode: it does not)
        zero = _distributed.sharding_parent()
        super().__init__(params, defaults)
        # a ZeroRedundancyOptimizer may hand a rank no parameters: that rank still takes part in the norms
        self._device = _checks.check_params(self.param_groups,
                                            None if zero is None else getattr(zero, "_default_device", None))
        _distributed.dtensor_mesh(self.param_groups)  # unsupported DTensor layouts fail here (and in step())
        self._requested_backend = backend
        self._backend = _backends.resolve(backend, self._device, self.param_groups)
        # Allocated here, never replaced (loads copy into it): wrappers that copy the optimizer's __dict__
        # (Lightning) share it, and under torch.compile an attribute assigned inside the traced step() was lost.
        self._gstate = GlobalState.zeros(self._device)
        self._at_rest = _at_rest.AtRest()  # where eps is; shared the same way
        # this rank's shard of a ZeroRedundancyOptimizer: sum the norms over its group, and after applying or removing
        # share this rank's parameters with the others, as ZeRO does after a step (they hold copies of ours)
        self._sharding_parent = zero  # a reference cycle (zero.optim is self), which the GC collects
        _checkpoint.adopt_loads_of(self, zero)  # ZeRO's load_state_dict fills self.state itself
        if zero is not None and distributed == "auto":
            distributed, process_group = "sharded", zero.process_group
        self._distributed_mode = distributed
        self._process_group = process_group

    def __getstate__(self) -> Dict[str, Any]:
        """torch.optim.Optimizer pickles only defaults, state and param_groups; MGPO's own state travels too."""
        return _checkpoint.getstate(self, super().__getstate__())

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        _checkpoint.setstate(self)

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

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(_checks.new_group(self, param_group))  # options, mode and defaults, checked
        if "_backend" in self.__dict__ and self._requested_backend == "auto":  # the new parameters' layouts
            self._backend = _backends.resolve("auto", self._device, self.param_groups)
            _host_cache.drop(self)
        if "_at_rest" in self.__dict__:
            self._at_rest.forget_params()

    _init_state = _host_cache.init_state  # (p): the state of a parameter, allocated at its first gradient
    _groups = _host_cache.collect  # (with_grads): the GroupTensors of every group, read anew

    # ------------------------------------------------------------------ step
    def _reduce_hook(self):
        """The all-reduce of the global sums this step needs (FSDP2, a sharded optimizer), or None."""
        return _checks.reduce_hook(self)

    def _config(self, cached: bool) -> StepConfig:
        """The step's configuration; a cached step (host cache) is a local one, with no all-reduce."""
        return self._step_config(None if cached else self._reduce_hook(), self._at_rest.applied)

    _step_config = _checks.step_config  # (hook, perturbed=False)
    _warn_missed_apply = _checks.warn_missed_apply

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
        compiling = torch.compiler.is_compiling()
        groups = None if compiling else _host_cache.lookup(self)  # the last step's lists, while they hold
        cached = groups is not None
        if not cached and not compiling:
            link = _deepspeed.attach(self)
            if link is not None:  # the first call from DeepSpeed ZeRO
                link.step(self, self._step_config)
                return loss
        if not cached or not self._backend.checks_inputs:  # (a backend that checks its inputs: below)
            _checks.validate_grads(self.param_groups, self._device)
        cfg = self._config(cached)  # before any state is allocated: it refuses unsupported layouts
        if not cached:
            if not compiling:
                _checkpoint.adopt_bypassed_load(self)  # a wrapper that filled self.state itself (ZeRO's load)
            groups = self._groups(with_grads=True)
            if cfg.reduce_hook is None and not compiling:
                _host_cache.build(self, groups)
        if not self.training:
            _checks.warn_eval_step(self)
        backend = self._backend
        if not any(gr is not None for g in groups for gr in g.grads):
            if cfg.reduce_hook is None:
                _perturbation.stepped_without_grads(self)  # no gradient anywhere: nothing to do, as in AdamW
                return loss
            backend = _backends.resolve("reference", self._device)  # a sharded optimizer joins the all-reduce
        if self._at_rest.has_masters and not cfg.perturbed:
            _checkpoint.sync_masters(groups)  # bf16/fp16 parameters written since the last step are theta
        try:
            backend.step(groups, self._gstate, cfg)
        except Exception:
            if cached:  # name the input at fault (the backend refused it before modifying anything)
                _checks.validate_grads(self.param_groups, self._device)
            raise
        _perturbation.stepped(self, cfg)  # theta_{t+1} at rest; the next training forward applies eps_{t+1}
        return loss

    # ------------------------------------------------------------------ eps: applied by the training forward
    def apply_perturbation(self) -> None:
        """Apply eps = coef * m to the parameters now (one multi-tensor pass); the next ``step()`` removes it.

        Called by the forward pre-hook (see _at_rest.py) at the first training forward after a step; call it
        yourself before the forward of a loop that never calls an ``nn.Module`` holding the parameters (raw tensors,
        ``torch.func.functional_call``).  Does nothing in eval mode, when eps is already applied, or when eps is
        known to be zero (before the first step, rho = 0)."""
        _perturbation.apply(self)

    _remove_perturbation = _perturbation.remove  # (): eval(), a load between a training forward and its step

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
