"""MGPO as DeepSpeed ZeRO's client optimizer (stages 1, 2 and 3; fp32 and bf16 tested, fp16 written).

What DeepSpeed does with a client optimizer (0.19, ``deepspeed/runtime/zero/stage_1_and_2.py`` and ``stage3.py``):

* it replaces each param group's ``params`` by **flat fp32 partitions** of the master weights (stages 1/2: one per
  group per rank; stage 3: one per sub-group), padded at their ends for alignment;
* at each ``engine.step()`` it averages, unscales and clips the gradients, then calls the client's ``step()`` once
  **per group** (stages 1/2: ``param_groups`` cut down to that group; stage 3: the other groups' ``params``
  emptied), then copies each fp32 partition into the low-precision model copy and all-gathers it (stage 3 gathers
  at the forward);
* ``save_checkpoint``/``load_checkpoint`` store and load the client's ``state_dict()`` (the default, "rigid"
  checkpoints).

So MGPO under DeepSpeed, driven by :class:`DeepSpeedLink`:

* **The masters are theta, always.**  eps lives only in the model copy that the forward uses: the training
  forward's apply pass (theta at rest, ``_at_rest.py``) writes ``lp = fp32 + coef * m`` (the arithmetic of MGPO's
  own bf16 path) into this rank's partition of the model copy and all-gathers it; removing it writes the fp32
  master back (DeepSpeed's ``update_lp_params``).  A DeepSpeed step writes theta_{t+1} into the model copy itself.
* **Global norms, exact.**  Each per-group call runs the backend's fused step on that group's flat partition with
  a reduce hook that all-reduces the group's sums over the data-parallel ranks and keeps them; the clipping factor
  uses the norm over all groups (DeepSpeed's ``_global_grad_norm``, taken before its per-group loop, less its own
  clipping).  When the DeepSpeed step ends, the scalar stage (gbar, ||m||, coef) runs once on the sums of all
  groups.  Padding is zeroed in the gradients first, so it adds nothing to any sum (its moments stay zero).
* A step DeepSpeed skips (fp16 overflow) reaches MGPO as no call at all: the link counts it and removes eps.

Configurations MGPO cannot serve are refused at the first step with what to do (offload, MoE, elastic
checkpoints, torch autocast, ZenFlow, Muon, the stage-0 bf16/fp16 wrappers).
"""
from __future__ import annotations

import sys
import weakref
from typing import List, Optional

import torch

from . import _at_rest
from .backends.base import GlobalState, GroupTensors, StepConfig

_ZERO_MODULES = ("deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3")
_STAGE0_WRAPPERS = ("deepspeed.runtime.bf16_optimizer", "deepspeed.runtime.fp16")


def find_driver(opt):
    """The DeepSpeed optimizer calling into ``opt`` right now (``opt`` is its client optimizer), or None.

    Walks a few frames up from MGPO's ``step()``/``load_state_dict()``; costs nothing unless deepspeed is imported."""
    if "deepspeed" not in sys.modules:
        return None
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if obj is not None and obj is not opt and getattr(obj, "optimizer", None) is opt:
            mod = type(obj).__module__ or ""
            if mod.startswith(_ZERO_MODULES):
                return obj
            if mod.startswith(_STAGE0_WRAPPERS):
                raise NotImplementedError(
                    f"MGPO under DeepSpeed's {type(obj).__name__} (ZeRO stage 0 with bf16/fp16) is not supported: "
                    "that wrapper keeps its own flat fp32 copies MGPO cannot perturb in the model. Use ZeRO stage "
                    "1, 2 or 3 (\"zero_optimization\": {\"stage\": 1}), or stage 0 in fp32.")
        frame = frame.f_back
    return None


def attach(opt) -> Optional["DeepSpeedLink"]:
    """The link of ``opt`` to the DeepSpeed optimizer driving it, created at the first call that comes from it."""
    link = opt.__dict__.get("_deepspeed")
    if link is not None:
        return link
    zero = find_driver(opt)
    if zero is None:
        return None
    link = DeepSpeedLink(opt, zero)
    opt.__dict__["_deepspeed"] = link
    opt._at_rest.forget_params()  # the forward hook now looks for the model's parameters, not the flat partitions
    return link


def _refuse(what: str, fix: str) -> None:
    raise NotImplementedError(f"MGPO under DeepSpeed: {what} is not supported. {fix}")


class DeepSpeedLink:
    """MGPO's view of the DeepSpeed ZeRO optimizer that drives it (see the module docstring)."""

    def __init__(self, opt, zero) -> None:
        import deepspeed.comm as ds_dist

        self._opt = weakref.ref(opt)
        self.zero = zero
        self.stage3 = (type(zero).__module__ or "").endswith("stage3")
        self._check_config(opt, zero)
        if self.stage3:
            self.flats = list(zero.fp32_partitioned_groups_flat)
            self.lp_flats = list(zero.fp16_partitioned_groups_flat)
            self.model_groups = [list(g) for g in zero.fp16_groups]
            self.dp_groups = [zero.dp_process_group] * len(self.flats)
            rank = ds_dist.get_rank(group=zero.dp_process_group)
            self.padding = [self._stage3_padding(zero, i, rank) for i in range(len(self.flats))]
        else:
            self.flats = list(zero.single_partition_of_fp32_groups)
            self.model_groups = [list(g) for g in zero.bit16_groups]
            self.dp_groups = list(zero.real_dp_process_group)
            ranks = [ds_dist.get_rank(group=g) for g in self.dp_groups]
            self.lp_flats = [zero.parallel_partitioned_bit16_groups[i][r] for i, r in enumerate(ranks)]
            self.padding = []
            for i, flat in enumerate(self.flats):
                pad = int(zero.groups_padding[i])
                self.padding.append([(flat.numel() - pad, flat.numel())] if pad else [])
        for flat, lp in zip(self.flats, self.lp_flats):
            if lp is not None and lp.data_ptr() == flat.data_ptr():
                _refuse("a model copy that aliases the fp32 master partition (torch autocast)",
                        "Use DeepSpeed's \"bf16\" or \"fp16\" sections instead of torch_autocast.")
        self._index = {id(f): i for i, f in enumerate(self.flats)}
        self.pending = {}  # flat index -> (its sums all-reduced over the ranks, its group's beta1), this DeepSpeed step
        self.calls = 0
        self._state_checked = False
        self._install_step_bracket(zero)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _check_config(opt, zero) -> None:
        if getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False) \
                or getattr(zero, "offload_param", False):
            _refuse("ZeRO offload (offload_optimizer / offload_param)",
                    "Remove the offload sections: MGPO steps the partitions where DeepSpeed keeps them on the "
                    "device, and LoRA adapters' optimizer states are small.")
        if getattr(zero, "has_moe_layers", False):
            _refuse("a model with MoE layers (expert-parallel groups)", "Train it with DDP or FSDP2.")
        if getattr(zero, "elastic_checkpoint", False):
            _refuse("\"elastic_checkpoint\": true (it saves the per-tensor state only, without MGPO's gbar, coef "
                    "and step count)", "Set \"elastic_checkpoint\": false (the default).")
        if getattr(zero, "torch_autocast_gradscaler", None) is not None:
            _refuse("torch autocast", "Use DeepSpeed's \"bf16\" or \"fp16\" sections.")
        if getattr(zero, "zenflow", False) or getattr(zero, "use_muon", False):
            _refuse("ZenFlow / Muon", "Use ZeRO without them.")
        groups = opt.param_groups
        if any(g.get("max_grad_norm") is not None for g in groups) and not getattr(zero, "compute_grad_norm", True):
            _refuse("MGPO's max_grad_norm with \"compute_grad_norm\": false",
                    "Use DeepSpeed's \"gradient_clipping\" instead, or let DeepSpeed compute the norm.")

    def _check_loaded_state(self, opt) -> None:
        """Refuse per-tensor state that came without MGPO's global scalars (gbar, coef, step): DeepSpeed's universal
        checkpoints (``load_universal_checkpoint``) fill the partitions' moments themselves, bypassing
        ``load_state_dict``; continuing would restart gbar and eps from zero with trained moments."""
        self._state_checked = True
        states = [opt.state.get(f) for f in self.flats]
        if any(st for st in states) and float(opt._gstate.step) == 0.0:
            raise RuntimeError(
                "MGPO under DeepSpeed: the optimizer state of DeepSpeed's partitions was loaded without MGPO's "
                "global scalars (gbar, coef, step count), as DeepSpeed's universal checkpoints do "
                "(load_universal_checkpoint): the run would go on with gbar and eps restarted. Resume from the "
                "checkpoint engine.save_checkpoint() wrote (the default format), with the same number of ranks.")

    @staticmethod
    def _stage3_padding(zero, i: int, rank: int):
        """(start, end) ranges of sub-group i's flat fp32 partition that are padding on this rank."""
        out, off = [], 0
        for p, part in zip(zero.fp16_groups[i], zero.fp16_partitioned_groups[i]):
            size = part.numel()
            valid = max(0, min(size, int(p.ds_numel) - rank * size))
            if valid < size:
                out.append((off + valid, off + size))
            off += size
        return out

    def _install_step_bracket(self, zero) -> None:
        """Wrap this ZeRO optimizer's ``step`` (an instance attribute): its end settles the global scalars, and a step
        DeepSpeed skipped (no call reached MGPO) removes eps and counts as skipped."""
        inner = zero.step
        ref = weakref.ref(self)

        def step(*args, **kwargs):
            link = ref()
            if link is None:
                return inner(*args, **kwargs)
            link.settle()
            before = link.calls
            out = inner(*args, **kwargs)
            if link.calls == before:
                link.skipped()
            else:
                link.settle()
            return out

        zero.step = step

    # ------------------------------------------------------------------ views
    @property
    def opt(self):
        return self._opt()

    def model_param_groups(self):
        """What the forward hook looks for: the model's parameters (the flat partitions are no module's)."""
        return [{"params": g} for g in self.model_groups]

    # ------------------------------------------------------------------ step
    def _global_sq_norm(self) -> Optional[float]:
        """The squared norm of the gradients MGPO receives, over all groups and ranks: DeepSpeed's norm (before its
        clipping, over the real elements), less its clipping.  None when DeepSpeed did not compute it."""
        gn = getattr(self.zero, "_global_grad_norm", None)
        if gn is None:
            return None
        gn = float(gn)
        clip = float(getattr(self.zero, "clip_grad", 0.0) or 0.0)
        if clip > 0.0:
            gn = gn / max(1.0, (gn + 1e-6) / clip)
        return gn * gn

    def step(self, opt, cfg_for) -> None:
        """One per-group call of DeepSpeed: the fused update of that group's flat partition."""
        groups = [g for g in opt.param_groups if g["params"]]
        if len(groups) != 1 or len(groups[0]["params"]) != 1:
            raise RuntimeError(
                "MGPO under DeepSpeed expected one flat partition per call, got "
                f"{[len(g['params']) for g in opt.param_groups]} tensors per group")
        group = groups[0]
        flat = group["params"][0]
        i = self._index.get(id(flat))
        if i is None:
            raise RuntimeError("MGPO under DeepSpeed got a tensor that is not one of DeepSpeed's fp32 partitions")
        if i in self.pending:  # a new DeepSpeed step began without the bracket (the first one): settle the last
            self.settle()
        if not self.pending:  # the first call of this DeepSpeed step
            opt._warn_missed_apply()
        if flat.grad is None:
            return
        if not self._state_checked:
            self._check_loaded_state(opt)
        for a, b in self.padding[i]:
            flat.grad[a:b].zero_()
        st = opt._init_state(flat)
        b1, b2 = group["betas"]
        gt = GroupTensors([flat.detach()], [flat.grad], [st["exp_avg"]], [st["exp_avg_sq"]], [None], [st["step"]],
                          group["lr"], b1, b2, group["eps"], group["weight_decay"])
        import deepspeed.comm as ds_dist

        total = self._global_sq_norm()
        pg = self.dp_groups[i]

        def hook(sums):
            ds_dist.all_reduce(sums, group=pg)
            self.pending[i] = (sums.clone(), b1)
            if total is not None:
                sums[0] = total  # the clipping factor and the skip decision use the norm over all groups

        g = opt._gstate
        scratch = GlobalState(g.step.clone(), g.gbar.clone(), g.coef.clone(), g.skipped.clone())
        opt._backend.step([gt], scratch, cfg_for(hook))  # the masters are theta: nothing to restore
        self.calls += 1
        rest = opt._at_rest
        rest.applied = False  # DeepSpeed writes theta_{t+1} into the model copy after this call
        rest.maybe_nonzero = rest.maybe_nonzero or bool(group.get("rho", 0.0))
        if opt.training and rest.maybe_nonzero:
            _at_rest.arm(opt)

    def settle(self) -> None:
        """The scalar stage of the DeepSpeed step whose per-group calls have run: gbar, coef and the step count
        from the sums of all groups (the same formulas as every backend: reference.scalar_stage)."""
        if not self.pending:
            return
        from .backends.reference import scalar_stage

        opt = self.opt
        order = sorted(self.pending)
        sums = torch.cat([self.pending[i][0] for i in order])
        beta1s = [self.pending[i][1] for i in order]
        self.pending = {}
        g = opt._gstate
        cfg = opt._step_config(None)
        _, skip, gbar_new, coef_new = scalar_stage(sums.to(g.step.device), beta1s, g, cfg)
        g.gbar.copy_(torch.where(skip, g.gbar, gbar_new))
        g.coef.copy_(torch.where(skip, g.coef, coef_new))
        g.step.add_((~skip).float())
        g.skipped.add_(skip.long())

    def skipped(self) -> None:
        """DeepSpeed skipped this step (overflow): nothing changed; remove the eps the forward applied."""
        opt = self.opt
        opt._gstate.skipped.add_(1)
        if opt._at_rest.applied:
            self.remove()
            if opt.training:
                _at_rest.arm(opt)

    # ------------------------------------------------------------------ eps in the model copy
    @torch.no_grad()
    def _write_model_copy(self, coef: Optional[torch.Tensor]) -> None:
        opt = self.opt
        for flat, lp in zip(self.flats, self.lp_flats):
            st = opt.state.get(flat)
            if coef is None or not st:
                lp.copy_(flat)
            else:
                lp.copy_(torch.add(flat, torch.mul(st["exp_avg"], coef)))  # product rounded, then the sum
        z = self.zero
        if self.stage3:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            for i in range(len(self.flats)):
                z._unflatten_partitioned_parameters(i)
            # a gathered parameter (the persistent ones, gathered after every step) holds the old values: release
            # it (its partition stays), then gather the persistent ones again; the others are gathered at their
            # module's forward, from the partitions
            gathered = [p for g in self.model_groups for p in g if p.ds_status == ZeroParamStatus.AVAILABLE]
            if gathered:
                gathered[0].partition(gathered)
            if z.persistent_parameters:
                z.persistent_parameters[0].all_gather(z.persistent_parameters)
        else:
            from deepspeed.runtime.utils import all_gather_dp_groups

            all_gather_dp_groups(groups_flat=z.bit16_groups_flat,
                                 partitioned_param_groups=z.parallel_partitioned_bit16_groups,
                                 dp_process_group=z.real_dp_process_group,
                                 start_alignment_factor=z.nccl_start_alignment_factor,
                                 allgather_bucket_size=z.allgather_bucket_size)

    def apply(self) -> None:
        """The training forward's apply pass: model copy = theta + coef * m (a collective)."""
        self.settle()
        self._write_model_copy(self.opt._gstate.coef)

    def remove(self) -> None:
        """Model copy = theta (the fp32 masters), a collective."""
        self._write_model_copy(None)
        self.opt._at_rest.applied = False


