"""The interface every MGPO backend implements.

The optimizer (``mgpo_kernels.optimizer.MGPO``) owns validation, state allocation, state_dict and modes;
a backend owns only the arithmetic of one ``step()`` and of the apply/remove pass of eps (``perturb``).
Adding a backend means one module that subclasses :class:`Backend` and one line in ``backends/__init__.py``.

Conventions shared by all backends (the spec is README.md / the paper's Eqs. 2-6):

* theta at rest: a step leaves theta_{t+1} in the parameters.  ``eps_{t+1} = coef * m_t`` is applied by
  :meth:`Backend.perturb` when the next training forward starts, and removed by the next step (fused in its
  update): restoring is ``theta = p - coef * m`` (fp32 params, in place) or ``theta = master`` (bf16/fp16 params,
  whose fp32 master copy holds theta exactly).  The perturbation is never stored, only the scalar ``coef``.
* All scalars live in 0-d tensors on the parameters' device; a backend never reads them on the host.
* A step whose gradients are non-finite (or whose GradScaler ``found_inf`` is set) changes nothing except
  ``GlobalState.skipped``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import torch
from torch import Tensor


@dataclass
class GroupTensors:
    """One param group's tensors, restricted to parameters that have state (saw a gradient at least once).

    ``grads[i] is None`` means parameter i has no gradient this step: it is not updated by AdamW (moments and
    step count unchanged) but its perturbation is moved from the old to the new coefficient.
    ``masters[i]`` is the fp32 master copy for a bf16/fp16 parameter, ``None`` for an fp32 parameter.
    ``steps[i]`` is the per-parameter AdamW step count (fp32 0-d tensor on the device, as torch's fused AdamW).
    """

    params: List[Tensor]
    grads: List[Optional[Tensor]]
    exp_avgs: List[Tensor]
    exp_avg_sqs: List[Tensor]
    masters: List[Optional[Tensor]]
    steps: List[Tensor]
    lr: Union[float, Tensor]
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


@dataclass
class GlobalState:
    """Optimizer-wide scalars, 0-d tensors on the parameters' device (so ``step()`` never syncs the host).

    step:    number of MGPO steps taken (not skipped); float32.  ``gbar`` is initialised when it is 0.
    gbar:    EMA of the global gradient norm; float32.
    coef:    the coefficient of the perturbation eps = coef*m (applied by the next training forward).
    skipped: number of skipped (non-finite) steps; int64.
    """

    step: Tensor
    gbar: Tensor
    coef: Tensor
    skipped: Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> "GlobalState":
        f = dict(dtype=torch.float32, device=device)
        return cls(
            step=torch.zeros((), **f),
            gbar=torch.zeros((), **f),
            coef=torch.zeros((), **f),
            skipped=torch.zeros((), dtype=torch.int64, device=device),
        )

    def tensors(self) -> dict:
        return {"step": self.step, "gbar": self.gbar, "coef": self.coef, "skipped": self.skipped}


@dataclass
class StepConfig:
    """Optimizer-wide hyper-parameters and GradScaler inputs for one step.

    sign:          +1.0 for direction="momentum" (paper Eq. 3), -1.0 for "-momentum".
    perturbed:     True when the parameters hold theta + coef*m on entry (a training forward applied eps): the
                   step removes it.  Either way the step leaves theta_{t+1} in the parameters (theta at rest) and
                   updates ``coef``, which the next training forward's apply pass uses.
    grad_scale:    GradScaler's scale (grads are divided by it), or None.
    found_inf:     GradScaler's found-inf flag (float tensor, >0 means skip), or None.
    reduce_hook:   called in place on the float64 ``sums`` tensor (layout below) before the scalar stage.
    gbar_floor:    the bound on the perturbation: the coefficient uses max(gbar, gbar_floor) (0: the paper's formula).
    """

    rho: float
    ema_beta: float
    adaptive_norm: bool
    sign: float
    max_grad_norm: Optional[float]
    perturbed: bool
    grad_scale: Optional[Tensor] = None
    found_inf: Optional[Tensor] = None
    reduce_hook: Optional[Callable[[Tensor], None]] = None
    gbar_floor: float = 0.0


#: Layout of the global sums a backend's reduce pass produces (float64, 1-D, length 4 * number of groups):
#: for group k, ``sums[4k:4k+4] = [ |g|^2, <m, g>, |m|^2 (tensors with grad), |m|^2 (tensors without grad) ]``
#: over raw gradients (before unscale/clip) and the momentum m_{t-1}.  ``StepConfig.reduce_hook`` (FSDP2: an
#: all-reduce over the mesh) is called on it before the scalar stage, so the new momentum's norm is
#: ``sum_k b1^2 S_mm + 2 b1 (1-b1) c S_mg + (1-b1)^2 c^2 S_gg + S_mm_nograd`` with c the unscale*clip factor.
SUMS_PER_GROUP = 4


class Backend:
    """Base class. Subclasses implement :meth:`step`; :meth:`perturb` has a generic torch implementation."""

    name: str = "base"
    #: True if :meth:`step` checks every tensor (dtype, layout, device, shape) before modifying anything, so the
    #: optimizer may skip its Python per-parameter validation on the cached host path (it runs it after a refusal
    #: to name the problem).
    checks_inputs: bool = False

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        """None if this backend can run on ``device`` here, else a sentence saying why not."""
        raise NotImplementedError

    @classmethod
    def refuses(cls, param: Tensor) -> Optional[str]:
        """None if :meth:`step` can take this parameter's memory layout, else why not (backend="auto" then
        picks another backend)."""
        return None

    @classmethod
    def priority(cls, device: torch.device) -> int:
        """Higher wins for backend="auto" among the usable ones; negative means never picked by auto."""
        return 0

    def step(self, groups: List[GroupTensors], gstate: GlobalState, cfg: StepConfig) -> None:
        """One MGPO step, in place: restore (when ``cfg.perturbed``), AdamW, new coefficient; leaves theta."""
        raise NotImplementedError

    def perturb(self, groups: List[GroupTensors], coef: Tensor, apply: bool) -> None:
        """Move the parameters between theta (``apply=False``) and theta + coef*m (``apply=True``).

        ``apply=True`` is the apply pass of theta at rest (the first training forward after a step); ``apply=False``
        removes eps again (``eval()`` or a load between that forward and the step).  Generic: :func:`move_eps`."""
        move_eps([p for g in groups for p in g.params], [m for g in groups for m in g.exp_avgs],
                 [x for g in groups for x in g.masters], coef, apply)


@torch.no_grad()
def move_eps(params: List[Tensor], exp_avgs: List[Tensor], masters: List[Optional[Tensor]], coef: Tensor,
             apply: bool) -> None:
    """The one place in Python where eps = coef*m is applied to or removed from parameters, in place: an fp32
    parameter becomes ``p + coef*m`` (apply) or ``p - coef*m`` (remove), the product rounded, then the sum (not
    ``addcmul_``, which may fuse them: this is the kernels' and the reference step's arithmetic, so a step's restore
    removes exactly what this applied); a bf16/fp16 parameter becomes ``master + coef*m`` or ``master`` (its fp32
    master holds theta exactly).  Multi-tensor (``torch._foreach_*``) ops."""
    plain_p = [p for p, x in zip(params, masters) if x is None]
    plain_m = [m for m, x in zip(exp_avgs, masters) if x is None]
    lp = [(p, m, x) for p, m, x in zip(params, exp_avgs, masters) if x is not None]
    if plain_p:
        (torch._foreach_add_ if apply else torch._foreach_sub_)(plain_p, torch._foreach_mul(plain_m, coef))
    if lp:
        lp_p, lp_m, lp_master = (list(t) for t in zip(*lp))
        torch._foreach_copy_(lp_p, torch._foreach_add(lp_master, torch._foreach_mul(lp_m, coef)) if apply
                             else lp_master)
