"""Theta at rest: where the perturbation eps is, and the hook that applies it just in time.

The parameters hold theta everywhere except inside a training forward/backward.  ``step()`` removes the eps the
forward applied (fused in its update) and leaves theta_{t+1}; it then *arms* this module's global forward pre-hook.
The first module call that

* runs with grad enabled,
* is in training mode (``module.training``), and
* holds at least one parameter of the optimizer (``module.parameters()``)

applies eps_{t+1} = coef * m_t in one multi-tensor pass and disarms the hook, so eps stays until the next step:
gradient accumulation (later micro-batches), activation checkpointing (the recomputation inside the backward) and
FSDP2 (the hook runs before FSDP's own pre-forward all-gather, on the local shards) all see theta + eps.  A frozen
teacher under ``no_grad``, a model in eval mode (evaluation, a reward model) and a second model with its own
optimizer never trigger it.  Everything else that reads or writes parameters between steps (savers, evaluators,
weight averaging, pruning, rollbacks, loads) deals with theta, as with any optimizer.

The hook is registered only while armed (``torch.nn.modules.module.register_module_forward_pre_hook``), so a
disarmed optimizer costs the forward nothing; it holds the optimizer by a weak reference.  Its state lives in one
:class:`AtRest` object that the optimizer creates once and mutates in place: wrappers that copy the optimizer's
``__dict__`` (Lightning's ``LightningOptimizer``) share it, and ``ZeroRedundancyOptimizer`` (which overwrites its
local optimizer's param-group keys before each step) never sees it.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.nn.modules.module import register_module_forward_pre_hook


class AtRest:
    """Where eps is for one optimizer (mutated in place; see the module docstring)."""

    def __init__(self) -> None:
        self.applied = False  # the parameters hold theta + eps now (between a training forward and the step)
        self.armed = False  # the next training forward must apply eps (a step was taken in train mode)
        self.maybe_nonzero = False  # coef may be nonzero (a step ran with rho != 0, or a loaded coef is nonzero)
        self.handle = None  # the global forward pre-hook while armed
        self.not_holding: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # modules with none of ours
        self.held_ids: Optional[frozenset] = None  # ids of the parameters eps is applied to (lazily)
        self.warned_missed = False
        self.has_masters = False  # a bf16/fp16 parameter has an fp32 master (sync_masters has work to do)

    def forget_params(self) -> None:
        """The optimizer's parameters changed (a new param group): recompute which modules hold them."""
        self.held_ids = None
        self.not_holding = weakref.WeakKeyDictionary()

    def __getstate__(self):  # copies (deepcopy, pickle) start disarmed; the owner re-arms them
        return {"applied": self.applied, "maybe_nonzero": self.maybe_nonzero, "has_masters": self.has_masters}

    def __setstate__(self, st) -> None:
        self.__init__()
        self.applied = st.get("applied", False)
        self.maybe_nonzero = st.get("maybe_nonzero", False)
        self.has_masters = st.get("has_masters", False)


@torch.compiler.disable
def arm(opt) -> None:
    """Make the next training forward of a module holding ``opt``'s parameters apply eps.

    Eager even inside a compiled region (registering a hook is not traceable): in a compiled whole training step
    this is one graph break at the end of ``step()``, and the hook one more at the first module call."""
    rest = opt._at_rest
    rest.armed = True
    if rest.handle is None:
        ref = weakref.ref(opt)
        rest.handle = register_module_forward_pre_hook(lambda module, args: _on_forward(ref, module))


@torch.compiler.disable
def disarm(rest: AtRest) -> None:
    rest.armed = False
    if rest.handle is not None:
        rest.handle.remove()
        rest.handle = None


@torch.compiler.disable
def _on_forward(ref, module) -> None:
    """The global forward pre-hook (eager even inside a compiled region: it moves parameters)."""
    opt = ref()
    if opt is None:
        return
    if not (module.training and torch.is_grad_enabled()):
        return
    if holds_params(opt, module):
        if opt.__dict__.get("_layout_decided") == "sharded" and opt.__dict__.get("_sharding_parent") is None:
            raise RuntimeError(
                "MGPO holds only this rank's shard of the parameters (a sharded optimizer other than "
                "ZeroRedundancyOptimizer), so applying eps at the forward would perturb only this rank's shard "
                "while the model also uses the other ranks' parameters. Before the forward, call "
                "opt.apply_perturbation() and then share the parameters between the ranks as you do after "
                "opt.step() (each rank broadcasting the ones it owns); or use ZeroRedundancyOptimizer.")
        opt.apply_perturbation()


def holds_params(opt, module: torch.nn.Module) -> bool:
    """Whether ``module`` (or a submodule) holds a parameter eps is applied to; False answers are remembered."""
    rest = opt._at_rest
    if module in rest.not_holding:
        return False
    ids = rest.held_ids
    if ids is None:
        ids = rest.held_ids = frozenset(id(p) for g in held_param_groups(opt) for p in g["params"])
    for p in module.parameters():
        if id(p) in ids:
            return True
    rest.not_holding[module] = True
    return False


def held_param_groups(opt):
    """The param groups whose parameters a training forward must see perturbed: this optimizer's, or, for the
    local optimizer of a ZeroRedundancyOptimizer, all ranks' (each rank applies its shard, then they share)."""
    link = opt.__dict__.get("_deepspeed")
    if link is not None:  # DeepSpeed ZeRO: MGPO holds flat fp32 partitions; the forward uses the model's params
        return link.model_param_groups()
    zero = opt.__dict__.get("_sharding_parent")
    return zero.param_groups if zero is not None else opt.param_groups
