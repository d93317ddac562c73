"""The ``cpp`` backend: fused C++ (CPU) and CUDA kernels of the extension ``mgpo_kernels._C``.

One step is three stages (``torch.ops.mgpo.*``, see csrc/ops.cpp), all over every tensor of every group, in one
call (``mgpo::step``) unless a reduce_hook must run between the first two:

1. ``reduce_sums``: pass 1 over (g, m) -> float64 ``sums`` (base.py layout) from per-chunk partials (fixed order);
2. ``cfg.reduce_hook(sums)`` if set (FSDP2 all-reduce), then ``scalar_stage``: clip/unscale factor, gbar, the
   new coefficient and the skip flag, computed on the device; it updates the GlobalState and the step counts;
3. ``update``: pass 2 over (p or master, g, m, v): restore, AdamW, re-perturb.

Nothing is read back to the host. Fake implementations make the ops traceable by torch.compile.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .base import Backend, GlobalState, GroupTensors, StepConfig

try:
    from mgpo_kernels import _C  # noqa: F401  (loads the .so, which registers torch.ops.mgpo.*)
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(
        "mgpo_kernels._C is not built: run `pip install --no-build-isolation -e .` in the repository "
        f"(or `make install`) to build the C++/CUDA extension ({e})"
    ) from e

_ops = torch.ops.mgpo


# ---------------------------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("mgpo::reduce_sums")
def _reduce_sums_fake(grads, exp_avgs, group_index, num_groups):
    return exp_avgs[0].new_empty((4 * num_groups,), dtype=torch.float64)


@torch.library.register_fake("mgpo::scalar_stage")
def _scalar_stage_fake(sums, beta1s, gstep, gbar, coef, skipped, steps, grad_scale, found_inf, rho, ema_beta,
                       adaptive_norm, sign, max_grad_norm, perturbed, gbar_floor=0.0):
    return sums.new_empty((4,), dtype=torch.float32)


@torch.library.register_fake("mgpo::update")
def _update_fake(params, grads, exp_avgs, exp_avg_sqs, masters, master_index, steps, scal, group_index, lrs, lr_tensors,
                 beta1s, beta2s, epss, weight_decays):
    return None


@torch.library.register_fake("mgpo::step")
def _step_fake(params, grads, exp_avgs, exp_avg_sqs, masters, master_index, steps, group_index, lrs, lr_tensors,
               beta1s, beta2s, epss, weight_decays, gstep, gbar, coef, skipped, grad_scale, found_inf, rho, ema_beta,
               adaptive_norm, sign, max_grad_norm, perturbed, gbar_floor=0.0):
    return exp_avgs[0].new_empty((4 * len(lrs),), dtype=torch.float64)


@torch.library.register_fake("mgpo::check_step")
def _check_step_fake(params, grads, exp_avgs, exp_avg_sqs, masters, master_index, steps):
    return None


# ---------------------------------------------------------------------------------------------- backend
def _lr_args(lr, device: torch.device):
    """(float value, tensor or None): a tensor lr is read by the kernels on the device (no host sync)."""
    if isinstance(lr, Tensor):
        if lr.device.type == "cpu" and device.type != "cpu":
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "MGPO: lr is a CPU tensor, whose value would be frozen into the CUDA graph being captured; "
                    "put the lr tensor on the parameters' device (the kernels read it there at every replay)"
                )
            return float(lr), None  # a CPU tensor: reading it does not synchronise the device
        t = lr.detach()
        if t.dtype != torch.float32 or t.device != device:
            t = t.to(device=device, dtype=torch.float32)
        return 0.0, t.reshape(())
    return float(lr), None


def _scalar(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    if t is None:
        return None
    if t.dtype != torch.float32 or t.device != device:
        t = t.to(device=device, dtype=torch.float32)
    return t


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the strides, sorted, are those of a contiguous tensor of some permutation."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(g: Tensor, p: Tensor) -> bool:
    return g.numel() <= 1 or (_dense(g) and all(n == 1 or a == b for n, a, b in zip(p.shape, g.stride(), p.stride())))


def _conform_grads(params: List[Tensor], grads: List[Optional[Tensor]]) -> Optional[List[Optional[Tensor]]]:
    """The kernels walk a gradient as flat memory in its parameter's order, so it needs the parameter's strides
    (what autograd produces).  A gradient assigned in another layout (a transposed or sliced view, say) is copied
    into the parameter's layout for this step; None if every gradient already has it (nothing to fix)."""
    if not any(g is not None and g.layout == torch.strided and g.shape == p.shape and not _same_layout(g, p)
               for p, g in zip(params, grads)):
        return None
    return [g if g is None or g.layout != torch.strided or g.shape != p.shape or _same_layout(g, p)
            else torch.empty_like(p, dtype=g.dtype).copy_(g) for p, g in zip(params, grads)]


def _flatten(groups: List[GroupTensors]):
    """params, exp_avgs, exp_avg_sqs, masters, master_index, steps, group index over all groups (the ops' lists)."""
    params, ms, vs, masters, master_index, steps, gidx = [], [], [], [], [], [], []
    for k, g in enumerate(groups):
        params += g.params
        ms += g.exp_avgs
        vs += g.exp_avg_sqs
        steps += g.steps
        gidx += [k] * len(g.params)
        for x in g.masters:
            if x is None:
                master_index.append(-1)
            else:
                master_index.append(len(masters))
                masters.append(x)
    return params, ms, vs, masters, master_index, steps, gidx


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

    checks_inputs = True  # check_step_args in csrc/ops_common.h, before the scalar stage modifies anything

    def __init__(self):
        self._plan = None  # (source lists, flat lists) of the last step; see _flat_lists

    def _flat_lists(self, groups: List[GroupTensors]):
        """params, exp_avgs, exp_avg_sqs, masters, master_index, steps, group index: flattened over the groups.

        Reused while the optimizer passes the same (cached) list objects, i.e. while the same parameters have
        gradients; the plan holds the source lists, so their identity cannot be confused with new lists.
        """
        if torch.compiler.is_compiling():
            return _flatten(groups)
        src = [(g.params, g.exp_avgs, g.exp_avg_sqs, g.masters, g.steps) for g in groups]
        plan = self._plan
        if plan is not None and len(plan[0]) == len(src) and all(
                a is b for old, new in zip(plan[0], src) for a, b in zip(old, new)):
            return plan[1]
        flat = _flatten(groups)
        self._plan = (src, flat)
        return flat

    @torch.no_grad()
    def perturb(self, groups: List[GroupTensors], coef: Tensor, apply: bool) -> None:
        """eval()/train() as one pass-2 launch with no gradients: p = (p - restore*m) + apply*m, the step's own
        element math (so ``train()`` after ``eval()`` puts back exactly what ``step()`` wrote)."""
        if not any(g.params for g in groups):
            return
        params, ms, vs, masters, master_index, steps, gidx = _flatten(groups)
        scal = torch.zeros(4, dtype=torch.float32, device=coef.device)  # [c, restore, apply, skip]
        scal[0] = 1.0
        scal[2 if apply else 1] = coef  # a device copy: no host sync
        G = len(groups)
        _ops.update(params, [None] * len(params), ms, vs, masters, master_index, steps, scal, gidx, [0.0] * G,
                    [None] * G, [0.9] * G, [0.999] * G, [1e-8] * G, [0.0] * G)

    @torch.no_grad()
    def step(self, groups: List[GroupTensors], gstate: GlobalState, cfg: StepConfig) -> None:
        device = gstate.step.device
        if not any(g.params for g in groups):
            return
        params, ms, vs, masters, master_index, steps, gidx = self._flat_lists(groups)
        grads = [gr for g in groups for gr in g.grads] if len(groups) > 1 else groups[0].grads
        lrs, lr_ts, b1s, b2s, epss, wds = [], [], [], [], [], []
        for g in groups:
            lr, lr_t = _lr_args(g.lr, device)
            lrs.append(lr)
            lr_ts.append(lr_t)
            b1s.append(float(g.beta1))
            b2s.append(float(g.beta2))
            epss.append(float(g.eps))
            wds.append(float(g.weight_decay))
        scalars = (gstate.step, gstate.gbar, gstate.coef, gstate.skipped, _scalar(cfg.grad_scale, device),
                   _scalar(cfg.found_inf, device), float(cfg.rho), float(cfg.ema_beta), bool(cfg.adaptive_norm),
                   float(cfg.sign), None if cfg.max_grad_norm is None else float(cfg.max_grad_norm),
                   bool(cfg.perturbed), float(cfg.gbar_floor or 0.0))
        if cfg.reduce_hook is None:  # one call: reduce -> scalar stage -> update
            try:
                _ops.step(params, grads, ms, vs, masters, master_index, steps, gidx, lrs, lr_ts, b1s, b2s, epss,
                          wds, *scalars)
            except RuntimeError:  # refused before anything changed; a gradient in another layout is fine
                conformed = _conform_grads(params, grads)
                if conformed is None:
                    raise
                _ops.step(params, conformed, ms, vs, masters, master_index, steps, gidx, lrs, lr_ts, b1s, b2s,
                          epss, wds, *scalars)
            return
        try:
            _ops.check_step(params, grads, ms, vs, masters, master_index, steps)  # errors before any change
        except RuntimeError:
            conformed = _conform_grads(params, grads)
            if conformed is None:
                raise
            grads = conformed
            _ops.check_step(params, grads, ms, vs, masters, master_index, steps)
        sums = _ops.reduce_sums(grads, ms, gidx, len(groups))
        cfg.reduce_hook(sums)
        steps_with_grad = [s for s, gr in zip(steps, grads) if gr is not None]
        scal = _ops.scalar_stage(sums, b1s, *scalars[:4], steps_with_grad, *scalars[4:])
        _ops.update(params, grads, ms, vs, masters, master_index, steps, scal, gidx, lrs, lr_ts, b1s, b2s, epss,
                    wds)


BACKEND = CppBackend
