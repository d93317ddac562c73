"""Interleaved, paired timing: the contenders run round by round, one call each per round, so that a shared
machine's drifting load hits all of them alike, and a ratio is taken within each round (paired) before its median,
which cancels what drift is left.  Every benchmark reports the same quantiles (``QUANTILES``).

Two orders within a round: ``rotate`` (the given order, started one place later each round: neighbours stay
neighbours, so a ratio's two sides always run back to back but at the wrap) and ``shuffle`` (a fresh random
permutation each round, from a seeded ``random.Random``).
"""
from __future__ import annotations

import math
import random
import time
from typing import Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

#: the quantiles (percent) every summary of times and of paired ratios gives: p20, median, p80
QUANTILES = (20, 50, 80)


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty sequence."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(times_s: Sequence[float]) -> Dict[str, float]:
    """median and p20/p80 of a list of seconds, in milliseconds."""
    lo, mid, hi = (percentile(times_s, q) for q in QUANTILES)
    return {"median_ms": 1e3 * mid, "p20_ms": 1e3 * lo, "p80_ms": 1e3 * hi, "n": len(times_s)}


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> List[float]:
    """num[i] / den[i]: the two were timed in the same round."""
    return [a / b for a, b in zip(num, den)]


def paired_quantiles(num: Sequence[float], den: Sequence[float]) -> Dict[str, float]:
    """p20, median and p80 of the per-round ratios num / den."""
    r = paired_ratios(num, den)
    lo, mid, hi = (percentile(r, q) for q in QUANTILES)
    return {"p20": lo, "median": mid, "p80": hi}


def rotated_orders(keys: Sequence, rounds: int) -> Iterator[List]:
    """Round k runs ``keys`` starting at position k (mod len)."""
    keys = list(keys)
    for k in range(rounds):
        i = k % len(keys)
        yield keys[i:] + keys[:i]


def shuffled_orders(keys: Sequence, rounds: int, seed: int) -> Iterator[List]:
    """A fresh random order of ``keys`` each round."""
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(keys)
        rng.shuffle(order)
        yield order


def round_orders(keys: Sequence, rounds: int, order: str = "rotate", seed: int = 0) -> Iterator[List]:
    if order == "rotate":
        return rotated_orders(keys, rounds)
    if order == "shuffle":
        return shuffled_orders(keys, rounds, seed)
    raise ValueError(f"order must be 'rotate' or 'shuffle', not {order!r}")


class Clock:
    """Times one call at a time: on CUDA with events recorded after a synchronise (so launch overhead counts),
    read back at ``flush`` (once per round, so rounds are not serialised on the host); on a CPU with
    ``perf_counter``."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.pending: List[Tuple[Hashable, object, object]] = []
        self.times: Dict[Hashable, List[float]] = {}

    def time(self, key: Hashable, fn: Callable[[], object]) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            self.pending.append((key, a, b))
        else:
            t0 = time.perf_counter()
            fn()
            self.times.setdefault(key, []).append(time.perf_counter() - t0)

    def flush(self) -> None:
        if self.pending:
            torch.cuda.synchronize(self.device)
            for key, a, b in self.pending:
                self.times.setdefault(key, []).append(a.elapsed_time(b) / 1e3)
            self.pending.clear()


def time_interleaved(contenders: Mapping[Hashable, Callable[[], object]], rounds: int, *, warmup_rounds: int = 0,
                     order: str = "rotate", seed: int = 0, device: Optional[torch.device] = None,
                     before: Optional[Callable[[Hashable], None]] = None,
                     after: Optional[Callable[[Hashable], None]] = None) -> Dict[Hashable, List[float]]:
    """Seconds of every call of each contender over ``rounds`` rounds, after ``warmup_rounds`` untimed rounds
    in the same order sequence.  ``before(key)`` runs untimed before each call (fresh gradients, a cache flush),
    ``after(key)`` after it (a progress bar)."""
    clock = Clock(device)
    for k, keys in enumerate(round_orders(list(contenders), warmup_rounds + rounds, order, seed)):
        timed = k >= warmup_rounds
        for key in keys:
            if before is not None:
                before(key)
            if timed:
                clock.time(key, contenders[key])
            else:
                contenders[key]()
            if after is not None:
                after(key)
        clock.flush()
    return {key: clock.times.get(key, []) for key in contenders}
