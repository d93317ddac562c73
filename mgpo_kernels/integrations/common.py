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


def find_mgpo(optimizer, check_options: bool = True) -> Optional[MGPO]:
    """The MGPO inside ``optimizer`` (itself, or wrapped by accelerate, Lightning or DeepSpeed), or None.

    ``check_options``: refuse a wrapper that carries an attribute named like an MGPO option (``wrapped.rho = x``
    sets it on the wrapper, where MGPO never sees it); pass False for a wrapper with a ``rho`` of its own."""
    chain = wrapper_chain(optimizer)
    mgpo = chain[-1] if chain and isinstance(chain[-1], MGPO) else None
    if mgpo is not None and check_options:
        check_wrapper_options(optimizer)
    return mgpo


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


def check_wrapper_options(
    optimizer, names=("rho", "ema_beta", "adaptive_norm", "direction", "max_grad_norm", "gbar_floor")
) -> None:
    """Raise if a wrapper around the MGPO carries an attribute named like an MGPO option.

    ``accelerated_opt.rho = 0.1`` sets an attribute of accelerate's wrapper that MGPO never reads: the run would go
    on with the old value while the wrapper reports the new one.  ``param_groups`` entries are what every wrapper
    forwards, so that is what the message points to.
    """
    chain = wrapper_chain(optimizer)
    if not chain or not isinstance(chain[-1], MGPO):
        return
    mgpo = chain[-1]
    for o in chain[:-1]:
        if isinstance(o, MGPO):  # Lightning's wrapper is an MGPO subclass: its option properties write param_groups
            continue
        d = getattr(o, "__dict__", None) or {}
        found = [k for k in names if k in d]
        if found:
            k = found[0]
            cls = f"{type(o).__module__}.{type(o).__name__}"
            current = mgpo.param_groups[0].get(k, getattr(mgpo, k, "?")) if mgpo.param_groups else "?"
            raise AttributeError(
                f"{', '.join(found)} is set as an attribute of the optimizer wrapper {cls}, which does not forward it: "
                f"MGPO never sees it (it still uses {k}={current!r}). Set MGPO's options through the param groups, "
                f"which every wrapper forwards: `for g in optimizer.param_groups: g[{k!r}] = value` (or on the "
                f"MGPO itself: `find_mgpo(optimizer).{k} = value`), and remove the wrapper's attribute "
                f"(`del optimizer.{k}`)."
            )
