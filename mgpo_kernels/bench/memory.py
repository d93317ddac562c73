"""Memory probes of the benchmarks: live tensor bytes at a step boundary, the CPU allocator's peak inside a
block (torch.profiler's allocation events, which see C++ extension ops too), and the process's RSS."""
from __future__ import annotations

import contextlib
import gc
import itertools
import os
import re
import sys
import tempfile

import torch


def live_tensor_bytes(device_type: str = "cpu") -> int:
    """Bytes of the distinct storages of every tensor reachable by Python's gc on ``device_type``.

    Used as the baseline at an optimizer-step boundary (parameters, buffers, optimizer state, anything a
    procedure keeps); the profiler's allocation events give the changes from there.
    """
    gc.collect()
    seen = set()
    total = 0
    for o in gc.get_objects():
        try:
            if not isinstance(o, torch.Tensor) or o.device.type != device_type or o.is_meta:
                continue
            st = o.untyped_storage()
            key = st.data_ptr()
            if key == 0 or key in seen:
                continue
            seen.add(key)
            total += st.nbytes()
        except Exception:  # sparse/nested/odd tensor subclasses: not ours
            continue
    return total


#: What torch's profiler writes to stderr from C++ on every use, whatever Python's warning filters say:
#: kineto's start/stop markers (their log level, USDT, is 5, which KINETO_LOG_LEVEL=5 still shows; 6 would hide
#: kineto's errors too) and c10's note that a block allocated before the profiler started was freed while it ran
#: (that free is not among the events, so CpuAllocPeak's running sum counts only what the block itself allocated).
_PROFILER_NOISE = (
    re.compile(r"^USDT:.*\] profiler_(start|stop)\s*$"),
    re.compile(r"^\[W\d{4} [\d:.]+ CPUAllocator\.cpp:\d+\] Memory block of unknown size was allocated "
               r"before the profiling started, profiler results will not include the deallocation event\s*$"),
)


def is_profiler_noise(line: str) -> bool:
    return any(p.match(line) for p in _PROFILER_NOISE)


@contextlib.contextmanager
def profiler_noise_filtered():
    """Capture file descriptor 2 inside the block and write back to it, at the end, every line except the
    profiler's known noise (``_PROFILER_NOISE``): those lines come from C++ straight to the descriptor, so only a
    redirect there can keep them off a user's terminal.  Anything else written meanwhile (a warning, a traceback
    printed by a callee) still appears, only later."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            text = buf.read().decode("utf-8", errors="replace")
            kept = [ln for ln in text.splitlines(keepends=True) if not is_profiler_noise(ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class CpuAllocPeak:
    """Peak of the bytes allocated (net of frees) by the CPU allocator inside a ``with`` block.

    Uses ``torch.profiler`` with ``profile_memory=True``: every allocation and free of c10's CPU allocator (torch
    ops, autograd, C++ extension ops alike) is an event with a signed byte count; their running sum in time order,
    relative to the start of the block, peaks at ``peak_delta``.  ``final_delta`` is the net change.
    """

    def __enter__(self):
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        from torch.profiler import ProfilerActivity, profile

        with contextlib.ExitStack() as stack:
            stack.enter_context(profiler_noise_filtered())
            self._prof = stack.enter_context(profile(activities=[ProfilerActivity.CPU], profile_memory=True))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc):
        self._stack.__exit__(*exc)  # the profiler stops first, then stderr is restored
        evs = self._prof.profiler.kineto_results.events()
        mem = []
        for e in evs:
            if e.name() != "[memory]":
                continue
            try:
                if e.device_type() != torch.autograd.DeviceType.CPU:
                    continue
            except Exception:
                pass
            mem.append((e.start_ns(), e.nbytes()))
        mem.sort()
        cum = list(itertools.accumulate(n for _, n in mem))
        self.peak_delta = max([0] + cum)
        self.final_delta = cum[-1] if cum else 0
        self.events = len(mem)
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if sys.platform == "darwin" else 1024)


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        return 0
