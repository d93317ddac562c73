"""MGPO with the Hugging Face Trainer and PEFT.

Theta at rest (mgpo_kernels/_at_rest.py) makes the Trainer right without help: between steps the model holds
theta, so its evaluation, checkpoints (``save_steps``, ``save_model()`` from any callback, ``load_best_model_at_end``)
and the model after ``train()`` are theta, and ``resume_from_checkpoint`` continues the run.  The Trainer's
``optimizer.train()``/``optimizer.eval()`` calls (transformers 5.x, forwarded by accelerate's wrapper) switch MGPO's
mode; the training forward applies eps just in time.

``MGPOCallback`` is optional: it only checks the setup at ``on_train_begin`` (an optimizer that holds none or only
part of the model's trainable parameters, an option set on a wrapper where MGPO never reads it, an MGPO that
DeepSpeed's integration dropped).  Under DeepSpeed (``TrainingArguments(deepspeed=...)``), pass MGPO as
``optimizer_cls_and_kwargs`` (transformers drops ``optimizers=(MGPO(...), None)`` there); see _deepspeed.py.

Usage::

    from mgpo_kernels.integrations.hf import MGPOCallback, mgpo_for_peft
    opt = mgpo_for_peft(peft_model, lr=2e-4, loraplus_lr_ratio=16, rho=0.01, ema_beta=0.8)
    trainer = Trainer(model=peft_model, args=args, ..., optimizers=(opt, None), callbacks=[MGPOCallback()])

or, letting the Trainer build it (and its scheduler)::

    trainer = Trainer(..., optimizer_cls_and_kwargs=mgpo_optimizer_cls_and_kwargs(lr=2e-4, rho=0.01))

The second form is the one for TRL's ``SFTTrainer(peft_config=...)``, which adds the adapters inside its
``__init__``: an MGPO built before over ``model.parameters()`` holds none of them (``MGPOCallback`` warns).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from transformers import TrainerCallback

from ..optimizer import MGPO
from .common import check_wrapper_options, describe_missing, find_mgpo, missing_trainable_parameters


def _replaced_message(args, expected, opt) -> Optional[str]:
    """Why the optimizer that trains is not the MGPO the user gave (None if it is)."""
    found = find_mgpo(opt, check_options=False) if opt is not None else None
    deepspeed = getattr(args, "deepspeed", None) if args is not None else None
    if expected is not None and found is not expected:
        what = f"the Trainer trains with {type(opt).__name__}" + ("" if found is None else " around another MGPO")
        if deepspeed:
            return (f"the MGPO given to the Trainer (optimizers=(MGPO(...), None)) is not the optimizer that trains: "
                    f"{what}. Under DeepSpeed, transformers drops an optimizer passed in `optimizers` and builds "
                    "its own. Pass MGPO as optimizer_cls_and_kwargs=mgpo_optimizer_cls_and_kwargs(lr=..., rho=...) "
                    "instead, and leave the \"optimizer\" section out of the DeepSpeed config.")
        return (f"the MGPO given to the Trainer is not the optimizer that trains: {what}. Pass it in "
                "`optimizers=(opt, None)`, or build it with optimizer_cls_and_kwargs=mgpo_optimizer_cls_and_kwargs(...).")
    if found is None and deepspeed:
        return (f"the Trainer trains with {type(opt).__name__}, not MGPO: the DeepSpeed config's \"optimizer\" "
                "section makes DeepSpeed build its own optimizer and ignore optimizer_cls_and_kwargs. Remove that "
                "section and pass optimizer_cls_and_kwargs=mgpo_optimizer_cls_and_kwargs(lr=..., rho=...).")
    return None


class MGPOCallback(TrainerCallback):
    """Checks an MGPO setup under the Hugging Face Trainer (evaluation and checkpoints need no callback).

    * ``on_train_begin``: raises when the optimizer that trains is not the MGPO given to the Trainer (under
      DeepSpeed, transformers silently drops ``optimizers=(MGPO(...), None)``; a DeepSpeed config with an
      ``"optimizer"`` section replaces MGPO); warns when the Trainer's optimizer is not MGPO, or when MGPO holds none or only part of the model's trainable parameters (an optimizer
      built before PEFT added the adapters, e.g. TRL's ``SFTTrainer(peft_config=..., optimizers=(MGPO(model.
      parameters()), None))``, trains nothing).
    * ``on_train_begin`` / ``on_step_begin``: raise when a wrapper (accelerate's ``AcceleratedOptimizer``) carries
      an attribute named like an MGPO option (``trainer.optimizer.rho = x``), which MGPO never reads; set options
      as ``for g in trainer.optimizer.param_groups: g["rho"] = x``.

    ``optimizer``: pass the MGPO explicitly if the Trainer does not know it (rare).
    """

    def __init__(self, optimizer: Optional[MGPO] = None):
        self._explicit = optimizer
        self._at_init: Optional[MGPO] = None

    def on_init_end(self, args, state, control, **kwargs):
        # the optimizer given as Trainer(optimizers=(opt, None)), before any integration could replace it
        opt = kwargs.get("optimizer")
        self._at_init = find_mgpo(opt, check_options=False) if opt is not None else None

    def _mgpo(self, kwargs) -> Optional[MGPO]:
        if self._explicit is not None:
            return self._explicit
        return find_mgpo(kwargs.get("optimizer"))

    def on_train_begin(self, args, state, control, **kwargs):
        opt = kwargs.get("optimizer")
        msg = _replaced_message(args, self._explicit or self._at_init, opt)
        if msg is not None:
            raise RuntimeError("MGPOCallback: " + msg)
        if opt is not None:
            check_wrapper_options(opt)
            if find_mgpo(opt) is None and self._explicit is None:
                warnings.warn(
                    f"MGPOCallback: the Trainer's optimizer ({type(opt).__name__}) is not MGPO; the callback does "
                    "nothing", stacklevel=2
                )
        mgpo, model = self._mgpo(kwargs), kwargs.get("model")
        if mgpo is not None and model is not None:
            missing = missing_trainable_parameters(model, mgpo)
            if missing:
                total = sum(1 for p in model.parameters() if p.requires_grad)
                warnings.warn("MGPOCallback: " + describe_missing(missing, total), stacklevel=2)

    def on_step_begin(self, args, state, control, **kwargs):
        opt = kwargs.get("optimizer")
        if opt is not None:
            check_wrapper_options(opt)  # an option set on the wrapper mid-training (a few dict lookups)


# ---------------------------------------------------------------------------------------------- PEFT helpers
def _is_lora_b(name: str) -> bool:
    return ".lora_B." in name or name.startswith("lora_B.") or ".lora_embedding_B" in name or (
        "lora_embedding_B" in name
    )


def _is_lora(name: str) -> bool:
    return "lora_" in name


def lora_param_groups(
    model: torch.nn.Module,
    lr: float | torch.Tensor,
    loraplus_lr_ratio: Optional[float] = None,
    weight_decay: float = 0.0,
    include_non_lora: bool = False,
) -> List[Dict[str, Any]]:
    """Param groups of a PEFT model's trainable LoRA parameters (names containing ``lora_``).

    ``loraplus_lr_ratio``: LoRA+ (Hayou et al. 2024): the B matrices (``lora_B``, ``lora_embedding_B``) get
    ``lr * loraplus_lr_ratio``, everything else ``lr``.  ``None`` gives one group.
    ``include_non_lora``: also put other trainable parameters (e.g. ``modules_to_save`` heads) in a group at ``lr``
    (they are then perturbed too); by default they are left out with a warning that names them.
    A tensor ``lr`` (for torch.compile) is cloned per group, so a scheduler can set each group's lr.
    """
    if loraplus_lr_ratio is not None and (not isinstance(loraplus_lr_ratio, (int, float)) or loraplus_lr_ratio <= 0):
        raise ValueError(f"Invalid loraplus_lr_ratio={loraplus_lr_ratio!r}: must be None or a number > 0")
    a_params, b_params, other, other_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _is_lora(name):
            (b_params if (loraplus_lr_ratio is not None and _is_lora_b(name)) else a_params).append(p)
        else:
            other.append(p)
            other_names.append(name)
    if not a_params and not b_params:
        raise ValueError(
            "the model has no trainable LoRA parameters (no trainable parameter name contains 'lora_'); is it a "
            "PEFT LoRA model?"
        )
    if other and not include_non_lora:
        shown = ", ".join(other_names[:5]) + (" ..." if len(other_names) > 5 else "")
        warnings.warn(
            f"{len(other)} trainable parameters are not LoRA parameters and are not given to MGPO ({shown}); "
            "pass include_non_lora=True to optimize (and perturb) them too, or give them another optimizer",
            stacklevel=2,
        )

    def _lr(scale: float = 1.0):
        if isinstance(lr, torch.Tensor):
            return (lr.detach().clone() * scale) if scale != 1.0 else lr.detach().clone()
        return lr * scale

    groups = [{"params": a_params, "lr": _lr(), "weight_decay": weight_decay}] if a_params else []
    if b_params:
        groups.append({"params": b_params, "lr": _lr(float(loraplus_lr_ratio)), "weight_decay": weight_decay})
    if other and include_non_lora:
        groups.append({"params": other, "lr": _lr(), "weight_decay": weight_decay})
    return groups


def mgpo_for_peft(
    model: torch.nn.Module,
    lr: float | torch.Tensor = 2e-4,
    loraplus_lr_ratio: Optional[float] = None,
    weight_decay: float = 0.0,
    include_non_lora: bool = False,
    **mgpo_kwargs,
) -> MGPO:
    """MGPO over a PEFT model's trainable LoRA parameters (see :func:`lora_param_groups`).

    ``mgpo_kwargs`` go to :class:`MGPO` (betas, eps, rho, ema_beta, adaptive_norm, direction, max_grad_norm,
    backend).  The paper's NLG setting is ``rho=0.01, ema_beta=0.8``.
    """
    groups = lora_param_groups(model, lr, loraplus_lr_ratio, weight_decay, include_non_lora)
    return MGPO(groups, lr=lr, weight_decay=weight_decay, **mgpo_kwargs)


class MGPOForPeft:
    """An optimizer *factory* for ``Trainer(optimizer_cls_and_kwargs=(MGPOForPeft, kwargs))``.

    The Trainer treats a first element that is not an Optimizer subclass as a factory: it calls
    ``MGPOForPeft()(model, **kwargs)``, so the LoRA parameters (and LoRA+ groups) are taken from the model, not from
    the Trainer's decay/no-decay grouping of every trainable parameter.
    """

    def __call__(self, model: torch.nn.Module, **kwargs) -> MGPO:
        return mgpo_for_peft(model, **kwargs)


def mgpo_optimizer_cls_and_kwargs(**kwargs) -> Tuple[type, Dict[str, Any]]:
    """``(MGPOForPeft, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``; kwargs as :func:`mgpo_for_peft`
    (lr, loraplus_lr_ratio, weight_decay, include_non_lora, rho, ema_beta, max_grad_norm, backend, ...).

    The Trainer then also creates the lr scheduler (``lr_scheduler_type``, warmup) over these groups.  ``lr`` is
    required: the Trainer does not pass its ``learning_rate`` to ``optimizer_cls_and_kwargs``."""
    if "lr" not in kwargs:
        raise ValueError(
            "mgpo_optimizer_cls_and_kwargs needs lr=... (the Trainer does not pass args.learning_rate to "
            "optimizer_cls_and_kwargs)"
        )
    return MGPOForPeft, dict(kwargs)
