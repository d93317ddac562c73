"""Which MGPO backends a benchmark runs on a device: every usable one unless named, and a named one refused
with the reason it cannot run here (before any measurement, not as a failed row after minutes)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch


def backend_lists(device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """The backends usable on ``device`` and, for each one that is not, why."""
    from mgpo_kernels import available_backends, backend_reasons

    usable = available_backends(device)
    reasons = {k: r for k, r in backend_reasons(device).items() if r is not None}
    return usable, reasons


def default_backends(usable: List[str], device: torch.device) -> List[str]:
    """The backends benchmarked when --backends is not given: every usable one, except Triton on a CPU (usable
    there only under TRITON_INTERPRET=1, an interpreter for tests, not a kernel to time)."""
    out = [b for b in usable if not (b == "triton" and device.type == "cpu")]
    return sorted(out, key=lambda b: b == "reference")  # the slow fallback last (an interrupted run keeps the rest)


def choose_backends(device: torch.device, requested: Optional[List[str]]) -> Tuple[List[str], List[str],
                                                                                   Dict[str, str]]:
    """(benchmarked, usable, reasons of the unusable): ``requested`` (--backends) if given, else the defaults;
    SystemExit if a requested one is not usable on ``device``."""
    usable, reasons = backend_lists(device)
    backends = default_backends(usable, device) if requested is None else requested
    for b in backends:
        if b not in usable:
            raise SystemExit(f"--backends: {b!r} is not usable on {device}: {reasons.get(b, 'unknown backend')}")
    return backends, usable, reasons
