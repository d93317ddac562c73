"""What every framework integration needs: finding the MGPO inside the wrappers frameworks put around it."""
from __future__ import annotations

from typing import Any, List, Optional

from ..optimizer import MGPO

#: attribute names under which optimizer wrappers keep the optimizer they wrap: accelerate's AcceleratedOptimizer
#: (``.optimizer``), DeepSpeed's ZeRO / bf16 optimizers (``.optimizer``), Lightning's LightningOptimizer
#: (``._optimizer``), a few others (``.base_optimizer``).
_WRAPPER_ATTRS = ("optimizer", "_optimizer", "base_optimizer")


def wrapper_chain(optimizer) -> List[Any]:
    """``optimizer`` and the optimizers it wraps, outermost first, ending at the MGPO if there is one."""
    chain, seen, o = [], set(), optimizer
    while o is not None and id(o) not in seen:
        chain.append(o)
        seen.add(id(o))
        inner = next((getattr(o, a) for a in _WRAPPER_ATTRS if getattr(o, a, None) is not None), None)
        # Lightning's wrapper is a dynamic subclass of the optimizer it wraps: an MGPO is the end of the chain
        # only when it wraps nothing
        if isinstance(o, MGPO) and not isinstance(inner, MGPO):
            break
        o = inner
    return chain


def find_mgpo(optimizer) -> Optional[MGPO]:
    """The MGPO inside ``optimizer`` (itself, or wrapped by accelerate, Lightning or DeepSpeed), or None."""
    chain = wrapper_chain(optimizer)
    return chain[-1] if chain and isinstance(chain[-1], MGPO) else None


def missing_trainable_parameters(model, mgpo: MGPO) -> List[str]:
    """Names of ``model``'s trainable parameters that ``mgpo`` does not hold (it neither updates nor perturbs them).

    A common trap: an optimizer built over the base model's parameters before PEFT added the adapters (TRL's
    ``SFTTrainer(peft_config=..., optimizers=(MGPO(model.parameters()), None))``) holds none of the LoRA tensors.
    """
    held = {id(p) for g in mgpo.param_groups for p in g["params"]}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]


def describe_missing(names: List[str], total: int, limit: int = 5) -> str:
    shown = ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")
    what = "none" if len(names) == total else f"{total - len(names)} of {total}"
    return (f"the optimizer (MGPO) holds {what} of the model's {total} trainable parameters; missing: {shown}. "
            "Build MGPO over the parameters that are trained (for a PEFT model, after get_peft_model: "
            "mgpo_for_peft(model) or mgpo_optimizer_cls_and_kwargs(...)), or those tensors are never updated")
