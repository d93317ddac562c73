"""Backend registry: name -> class, availability and the choice made by backend="auto".

A backend module that fails to import (extension not built, Triton missing) is recorded with the reason, so
``available_backends()`` and the error for an unusable backend can say why.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Type

import torch

from .base import Backend

#: name -> module that defines ``BACKEND`` (the Backend subclass).  Order is only for listing.
_MODULES = {
    "reference": "mgpo_kernels.backends.reference",
    "cpp": "mgpo_kernels.backends.cpp",
    "triton": "mgpo_kernels.backends.triton",
}

BACKEND_NAMES = tuple(_MODULES)
_loaded: Dict[str, Type[Backend]] = {}
_import_errors: Dict[str, str] = {}


def _load(name: str) -> Optional[Type[Backend]]:
    if name in _loaded:
        return _loaded[name]
    if name in _import_errors:
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
        _loaded[name] = mod.BACKEND
        return mod.BACKEND
    except Exception as e:  # ImportError, OSError from a broken .so, ...
        _import_errors[name] = f"{type(e).__name__}: {e}"
        return None


def unavailable_reason(name: str, device=None) -> Optional[str]:
    """None if backend ``name`` is usable for ``device`` (default: CPU) here, else why not."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; valid backends are {', '.join(('auto',) + BACKEND_NAMES)}")
    device = torch.device("cpu") if device is None else torch.device(device)
    cls = _load(name)
    if cls is None:
        return f"backend {name!r} could not be loaded ({_import_errors[name]})"
    return cls.unavailable_reason(device)


def available_backends(device=None) -> List[str]:
    """Backends usable for ``device`` (default: CPU) in this process, e.g. ["reference", "cpp", "triton"]."""
    return [n for n in BACKEND_NAMES if unavailable_reason(n, device) is None]


def backend_reasons(device=None) -> Dict[str, Optional[str]]:
    """Every backend with None (usable) or the reason it is not usable for ``device``."""
    return {n: unavailable_reason(n, device) for n in BACKEND_NAMES}


_warned_fallback: set = set()


def resolve_for(name: str, device, param_groups) -> Backend:
    """As :func:`resolve`, and "auto" skips a backend that refuses one of the parameters' memory layouts (the
    fused kernels need dense tensors), saying so once."""
    if name != "auto":
        return resolve(name, device)
    device = torch.device(device)
    usable = sorted((n for n in available_backends(device) if _loaded[n].priority(device) >= 0),
                    key=lambda n: -_loaded[n].priority(device))
    params = [p for g in param_groups for p in g["params"]]
    skipped = []
    for n in usable:
        why = next((w for w in map(_loaded[n].refuses, params) if w is not None), None)
        if why is None:
            if skipped and skipped[0] not in _warned_fallback:
                _warned_fallback.add(skipped[0])
                import warnings

                warnings.warn(f"MGPO backend='auto': not using {skipped[0][0]!r} because {skipped[0][1]}; using "
                              f"{n!r} instead (make the parameters contiguous to get the fused kernels)",
                              stacklevel=3)
            return _loaded[n]()
        skipped.append((n, why))
    return _loaded["reference"]()


def resolve(name: str, device) -> Backend:
    """An instance of the backend called ``name`` ("auto" picks the fastest usable one for ``device``)."""
    device = torch.device(device)
    if name == "auto":
        usable = [n for n in available_backends(device) if _loaded[n].priority(device) >= 0]
        best = max(usable, key=lambda n: _loaded[n].priority(device))
        return _loaded[best]()
    why = unavailable_reason(name, device)  # raises ValueError for unknown names
    if why is not None:
        raise RuntimeError(f"MGPO backend {name!r} is not usable on {device}: {why}")
    return _loaded[name]()
