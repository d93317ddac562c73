"""Backend registry: name -> class, availability and the choice made by backend="auto".

A backend module that fails to import (extension not built, built for another torch, Triton missing) is recorded
with the reason, so ``available_backends()`` and the error for an unusable backend can say why; and when "auto"
ends on a slower backend than the device could use, it says so once (:class:`MGPOFallbackWarning`), with the fix.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import Dict, List, Optional, Tuple, Type

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

#: backend="auto"'s ranking of the backends it could not load (a loaded backend says its own ``priority``).
_EXPECTED_PRIORITY = {"cpp": {"cpu": 10, "cuda": 20}, "triton": {"cuda": 10}}
_REBUILD = ("rebuild it against this torch: pip install --no-build-isolation --force-reinstall --no-deps "
            "mgpo_kernels (from its source; `pip install --no-build-isolation -e .` in a checkout)")


class MGPOFallbackWarning(UserWarning):
    """backend="auto" uses a slower backend than this device could run, and why (issued once per cause)."""


def build_info():
    """The module setup.py wrote when it built ``mgpo_kernels._C`` (torch version, ISAs, CUDA architectures), or
    None (not built, or built by an older setup.py)."""
    try:
        from mgpo_kernels import _build_info
    except ImportError:
        return None
    return _build_info


def extension_path() -> Optional[str]:
    """Where the compiled ``mgpo_kernels._C`` is, or None if there is none (found without importing it)."""
    import importlib.machinery
    import sys

    pkg = sys.modules.get("mgpo_kernels")
    for d in getattr(pkg, "__path__", None) or [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(d, "_C" + suffix)
            if os.path.isfile(path):
                return path
    return None


def extension_problem() -> Optional[str]:
    """Why ``mgpo_kernels._C`` must not be loaded, found without loading it: not built, or built for another
    torch (loading it then fails with undefined symbols, or worse)."""
    if extension_path() is None:
        return ("mgpo_kernels._C is not built (no compiled extension in the package): install with "
                "`pip install --no-build-isolation .` (torch first), or `pip install --no-build-isolation -e .` / "
                "`make install` in a checkout")
    info = build_info()
    built = getattr(info, "TORCH_VERSION", None)
    if built is not None and built != torch.__version__:
        return (f"mgpo_kernels._C was built against torch {built}, but this is torch {torch.__version__}; "
                f"install torch {built} or {_REBUILD}")
    return _truncated(extension_path())


def _truncated(path: str) -> Optional[str]:
    """A cut-off ELF file (an interrupted copy) crashes the process when loaded (SIGBUS), so it is checked first:
    its header says where its section table ends."""
    import struct

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        return f"mgpo_kernels._C ({path}) cannot be read: {e}; {_REBUILD}"
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # not a complete 64-bit ELF header: let dlopen say
        return None if head[:4] != b"\x7fELF" else (
            f"mgpo_kernels._C ({path}) is truncated ({size} bytes); {_REBUILD}")
    order = "<" if head[5] == 1 else ">"
    (shoff,) = struct.unpack_from(order + "Q", head, 40)
    shentsize, shnum = struct.unpack_from(order + "HH", head, 58)
    end = shoff + shentsize * shnum
    if end > size:
        return (f"mgpo_kernels._C ({path}) is truncated: {size} bytes, its ELF header says at least {end}; "
                f"{_REBUILD}")
    return None


def _load(name: str) -> Optional[Type[Backend]]:
    if name in _loaded:
        return _loaded[name]
    if name in _import_errors:
        return None
    if name == "cpp":
        why = extension_problem()
        if why is not None:
            _import_errors[name] = why
            return None
    if name == "triton" and importlib.util.find_spec("numpy") is None:
        _import_errors[name] = ("numpy is not installed (the triton backend builds its launch tables with it): "
                                "pip install numpy")
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
        _loaded[name] = mod.BACKEND
        return mod.BACKEND
    except Exception as e:  # ImportError, OSError from a broken .so, ...
        cause = e.__cause__ if name == "cpp" and e.__cause__ is not None else e
        if name == "cpp":
            _import_errors[name] = (f"mgpo_kernels._C is built ({extension_path()}) but failed to load: "
                                    f"{type(cause).__name__}: {cause}; {_REBUILD}")
        else:
            _import_errors[name] = f"{type(cause).__name__}: {cause}"
        return None


def _warn_if_built_for_another_torch() -> None:
    """At import: an extension built for another torch (or cut off) is an error the user must hear of, not a
    silent fallback; and it is never loaded (that can crash the process): ``mgpo_kernels._C`` is blocked in
    ``sys.modules``, so every ``import`` of it (the cpp backend, the host cache) raises ImportError."""
    import sys

    if extension_path() is None or "mgpo_kernels._C" in sys.modules:
        return
    problem = extension_problem()
    if problem is not None:
        sys.modules["mgpo_kernels._C"] = None
        warnings.warn(f"mgpo_kernels: the cpp backend is disabled: {problem}", MGPOFallbackWarning, stacklevel=3)


_warn_if_built_for_another_torch()


def unavailable_reason(name: str, device=None) -> Optional[str]:
    """None if backend ``name`` is usable for ``device`` (default: CPU) here, else why not."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; valid backends are {', '.join(('auto',) + BACKEND_NAMES)}")
    device = torch.device("cpu") if device is None else torch.device(device)
    cls = _load(name)
    if cls is None:
        return f"backend {name!r} could not be loaded ({_import_errors[name]})"
    why = cls.unavailable_reason(device)
    if why is None and name == "cpp" and device.type == "cuda":
        why = _arch_problem(device)
    return why


def _arch_problem(device: torch.device) -> Optional[str]:
    """Why the CUDA kernels of this build cannot run on ``device``'s GPU (no code for its architecture), or None."""
    archs = getattr(build_info(), "CUDA_ARCH_LIST", None)
    if not archs:
        return None
    try:
        major, minor = torch.cuda.get_device_capability(device)
    except Exception:  # noqa: BLE001 - no driver: the backend's own check says so
        return None
    for a in archs.replace(" ", ";").split(";"):
        a = a.strip()
        if not a:
            continue
        ptx = a.endswith("+PTX")
        num = a.replace("+PTX", "")
        specific = num[-1:].isalpha()  # 9.0a, 10.0f...: that architecture only
        try:
            amaj, amin = (int(x) for x in num.rstrip("abcdefghijklmnopqrstuvwxyz").split("."))
        except ValueError:
            return None  # a list this check does not understand: let the launch decide
        if (amaj, amin) == (major, minor) or (not specific and amaj == major and amin <= minor):
            return None  # its machine code (sm_80 code runs on sm_86 and sm_89)
        if ptx and (amaj, amin) <= (major, minor):
            return None  # PTX the driver compiles for it
    return (f"mgpo_kernels._C has no CUDA code for this GPU (sm_{major}{minor}): it was built for "
            f"TORCH_CUDA_ARCH_LIST={archs}; rebuild with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" "
            "pip install --no-build-isolation --force-reinstall --no-deps mgpo_kernels (from its source)")


def available_backends(device=None) -> List[str]:
    """Backends usable for ``device`` (default: CPU) in this process, e.g. ["reference", "cpp", "triton"]."""
    return [n for n in BACKEND_NAMES if unavailable_reason(n, device) is None]


def backend_reasons(device=None) -> Dict[str, Optional[str]]:
    """Every backend with None (usable) or the reason it is not usable for ``device``."""
    return {n: unavailable_reason(n, device) for n in BACKEND_NAMES}


_warned_fallback: set = set()


def _expected_priority(name: str, device: torch.device) -> int:
    cls = _loaded.get(name)
    if cls is not None:
        return cls.priority(device)
    return _EXPECTED_PRIORITY.get(name, {}).get(device.type, -1)


def _missed(chosen: str, device: torch.device) -> List[Tuple[str, str]]:
    """The backends "auto" would rank above ``chosen`` for ``device`` that are unusable here, with the reason."""
    floor = _expected_priority(chosen, device)
    out = []
    for n in BACKEND_NAMES:
        if n != chosen and _expected_priority(n, device) > floor:
            why = unavailable_reason(n, device)
            if why is not None:
                out.append((n, why))
    return out


def _fix_for(name: str, why: str) -> str:
    if name == "triton" and "Triton is not installed" in why:
        return why + " (pip install triton)"
    decision = getattr(build_info(), "DECISION", None)
    if name == "cpp" and "without CUDA" in why and decision:
        return f"{why}; its build said: {decision}"
    return why


def _user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, from its caller's frame, for the first frame outside this package (the
    user's code, wherever in the package the resolution was asked for)."""
    import sys

    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(pkg):
        frame, level = frame.f_back, level + 1
    return level


def _warn_fallback(chosen: str, device: torch.device) -> None:
    """Warn once per (device type, chosen backend, reasons) when "auto" settles below what the device could run."""
    if os.environ.get("MGPO_NO_FALLBACK_WARNING") == "1":
        return
    missed = _missed(chosen, device)
    key = ("fallback", device.type, chosen, tuple(missed))
    if not missed or key in _warned_fallback:
        return
    _warned_fallback.add(key)
    whys = "; ".join(f"{n!r} is not usable: {_fix_for(n, w)}" for n, w in missed)
    warnings.warn(f"MGPO backend='auto' on {device.type} uses the slower {chosen!r} backend: {whys}. "
                  f"(`python -m mgpo_kernels` shows every backend; MGPO_NO_FALLBACK_WARNING=1 silences this.)",
                  MGPOFallbackWarning, stacklevel=_user_stacklevel())


def _auto(device: torch.device, param_groups) -> Backend:
    """The fastest usable backend that takes every parameter's memory layout."""
    usable = sorted((n for n in available_backends(device) if _loaded[n].priority(device) >= 0),
                    key=lambda n: -_loaded[n].priority(device))
    params = [p for g in param_groups for p in g["params"]] if param_groups is not None else []
    skipped = []
    for n in usable:
        why = next((w for w in map(_loaded[n].refuses, params) if w is not None), None)
        if why is None:
            if skipped and skipped[0] not in _warned_fallback:
                _warned_fallback.add(skipped[0])
                warnings.warn(f"MGPO backend='auto': not using {skipped[0][0]!r} because {skipped[0][1]}; using "
                              f"{n!r} instead (make the parameters contiguous to get the fused kernels)",
                              stacklevel=_user_stacklevel())
            else:
                _warn_fallback(n, device)
            return _loaded[n]()
        skipped.append((n, why))
    return _loaded["reference"]()


def resolve(name: str, device, param_groups=None) -> Backend:
    """An instance of the backend called ``name``: the one resolver of ``MGPO`` and the functional form.

    "auto" picks the fastest usable backend for ``device`` that takes the memory layout of every parameter of
    ``param_groups`` (dicts with ``"params"``; the fused kernels need dense tensors), and warns once when that is
    slower than what the device could run, saying why.  A named backend is used as it is, or refused with the
    reason it is not usable here."""
    device = torch.device(device)
    if name == "auto":
        return _auto(device, param_groups)
    why = unavailable_reason(name, device)  # raises ValueError for unknown names
    if why is not None:
        raise RuntimeError(f"MGPO backend {name!r} is not usable on {device}: {why}")
    return _loaded[name]()
