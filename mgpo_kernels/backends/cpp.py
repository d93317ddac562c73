"""The ``cpp`` backend: fused C++ (CPU) and CUDA kernels of the extension ``mgpo_kernels._C``.

One step is three stages over every tensor of every group, all taking the step plan (plan.py):

1. pass 1 over (g, m) -> float64 ``sums`` (base.py layout) from per-chunk partials (fixed order);
2. the scalar stage: clip/unscale factor, gbar, the new coefficient and the skip flag, computed on the device;
   it updates the GlobalState and the step counts;
3. pass 2 over (p or master, g, m, v): restore, AdamW; theta_{t+1} is left at rest.

``mgpo::step`` runs the three in one call; with a reduce_hook (FSDP2 all-reduce) ``mgpo::reduce_sums`` runs
pass 1, the hook the sums, ``mgpo::finish_step`` the rest. ``mgpo::perturb`` is the apply pass of the training
forward (and eval()'s removal). Nothing is read back to the host. Fake implementations make the ops traceable by
torch.compile, whose graph records the ops.

Eagerly, the same entry points run through a ``_C.KeptPlan`` (csrc/host_path.cpp): the plan's persistent lists
(parameters, moments, step counts) cross into C++ once, when the plan cache's lists change, and each call passes
only what changes (the gradients, the table, tensor lrs, GradScaler's inputs; the coefficient for perturb), which
halves the host time of a step of 448 LoRA tensors.  make_plan (csrc/step_plan.cpp) checks every tensor at every
call, before anything is modified, and copies a gradient assigned in another layout than its parameter's into
that layout.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .base import SUMS_PER_GROUP, Backend, GlobalState, GroupTensors, StepConfig
from .plan import PlanCache, flatten

try:
    from mgpo_kernels import _C  # noqa: F401  (loads the .so, which registers torch.ops.mgpo.*)
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(
        f"mgpo_kernels._C could not be imported ({e}): if it is not built, run `pip install --no-build-isolation "
        "-e .` in the repository (or `make install`); `python -m mgpo_kernels` says how it was built and why it "
        "does not load"
    ) from e

_ops = torch.ops.mgpo


# ---------------------------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("mgpo::step")
@torch.library.register_fake("mgpo::reduce_sums")
def _sums_fake(params, grads, exp_avgs, exp_avg_sqs, masters, master_index, steps, group_sizes, *rest):
    return exp_avgs[0].new_empty((SUMS_PER_GROUP * len(group_sizes),), dtype=torch.float64)


@torch.library.register_fake("mgpo::finish_step")
def _finish_step_fake(*args):
    return None


@torch.library.register_fake("mgpo::perturb")
def _perturb_fake(params, exp_avgs, masters, master_index, coef, apply):
    return None


# ---------------------------------------------------------------------------------------------- backend
def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the strides, sorted, are those of a contiguous tensor of some permutation."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class CppBackend(Backend):
    name = "cpp"

    @classmethod
    def refuses(cls, param: Tensor) -> Optional[str]:
        if param.numel() <= 1 or _dense(param):
            return None
        return (f"a parameter of shape {tuple(param.shape)} with strides {param.stride()} is not dense (the fused "
                "kernels process parameters as flat memory)")

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        device = torch.device(device)
        if device.type == "cpu":
            return None
        if device.type == "cuda":
            if not _C.cuda_built:
                return ("mgpo_kernels._C was built without CUDA kernels (no nvcc or CPU-only torch at build time; "
                        "rebuild with MGPO_BUILD_CUDA=1 pip install --no-build-isolation -e .)")
            if not torch.cuda.is_available():
                return "CUDA is not available in this process (no GPU or driver)"
            return None
        return f"no cpp kernels for device type {device.type!r} (only cpu and cuda)"

    @classmethod
    def priority(cls, device: torch.device) -> int:
        return 20 if torch.device(device).type == "cuda" else 10

    checks_inputs = True  # make_plan (csrc/step_plan.cpp) checks everything before anything is modified

    def __init__(self):
        self._plans = PlanCache(hold=_C.KeptPlan)

    @torch.no_grad()
    def perturb(self, groups: List[GroupTensors], coef: Tensor, apply: bool) -> None:
        """The apply pass (and eval()'s removal) as one pass 2 with no gradients: p = (p - restore*m) + apply*m,
        the step's own element math (so ``train()`` after ``eval()`` puts back exactly what ``step()`` wrote)."""
        if not any(g.params for g in groups):
            return
        if torch.compiler.is_compiling():
            params, _, ms, _, masters, master_index, _, _ = flatten(groups)
        else:
            params, _, ms, _, masters, master_index, _, _ = self._plans.lists(groups)
            kept = self._plans.held  # the step's held lists, while these are the step's group lists
            if kept is not None:
                return kept.perturb(coef, apply)
        _ops.perturb(params, ms, masters, master_index, coef, apply)

    @torch.no_grad()
    def step(self, groups: List[GroupTensors], gstate: GlobalState, cfg: StepConfig) -> None:
        if not any(g.params for g in groups):  # nothing to launch; a reduce_hook (an all-reduce) must still run
            from .reference import ReferenceBackend

            return ReferenceBackend().step(groups, gstate, cfg)
        plan = self._plans.build(groups, gstate, cfg)
        kept = None if torch.compiler.is_compiling() else self._plans.held
        if kept is None:  # the ops, with every argument (under torch.compile the graph records them)
            step, reduce_sums, finish_step, args = _ops.step, _ops.reduce_sums, _ops.finish_step, tuple(plan)
        else:  # the held lists, and what changes per step
            step, reduce_sums, finish_step = kept.step, kept.reduce_sums, kept.finish_step
            args = (plan.grads, plan.hyper, plan.lr_tensors, plan.grad_scale, plan.found_inf)
        if cfg.reduce_hook is None:
            step(*args)  # pass 1 -> scalar stage -> pass 2
            return
        sums = reduce_sums(*args)
        cfg.reduce_hook(sums)
        finish_step(*args, sums)


BACKEND = CppBackend
