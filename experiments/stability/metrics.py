"""Curve statistics of the sweep: smoothing, the double-descent bump, mean ± std over seeds."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence


def smooth(xs: Sequence[float], window: int) -> List[float]:
    """Trailing moving average (the first points average what is there)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def bump(xs: Sequence[float], window: int) -> float:
    """Double-descent bump: the largest rise of the smoothed curve above its running minimum (0 when it never
    goes back up; inf when the curve holds a non-finite value, i.e. the run diverged)."""
    if not all(math.isfinite(x) for x in xs):
        return math.inf
    best, lo = 0.0, math.inf
    for s in smooth(xs, window):
        lo = min(lo, s)
        best = max(best, s - lo)
    return best


def mean_std(xs: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """Mean and sample std of the finite values, with how many of them there were."""
    v = [x for x in xs if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": m, "std": sd, "n": len(v)}
