"""MGPO as multi-tensor Triton kernels: a step is a reduce pass and an update pass, and theta at rest's eps is
applied by an apply pass (see triton_kernels.py); one launch each (``_launch_reduce``, ``_launch_update``,
``_launch_apply``).

Per step: one launch of the reduce kernel (deterministic partial sums -> the float64 ``sums`` of base.py's
layout), ``cfg.reduce_hook(sums)`` if set, one launch of the update kernel (scalar stage in every program,
restore, AdamW (theta at rest), step counts and optimizer-wide scalars).  Nothing is read on the host: lr, step
counts, coefficients, grad_scale and found_inf are read by the kernels from device memory.

The kernels find the tensors through tables of int64 addresses.  The tables live on the device and are cached
by the backend instance (each optimizer has its own), so two optimizers never share step counters, partial sums
or a hyper-parameter table, even over the same parameters, and a CUDA graph captured by one keeps its buffers
whatever the other does.  The block table depends only on the parameters (addresses, sizes, dtypes), the tensor
table is re-uploaded (one small host-to-device copy, no launch, no sync) only when an address changes, e.g.
gradients re-created after ``zero_grad(set_to_none=True)`` or state replaced by ``load_state_dict``.

This module is named ``triton`` inside the package; ``import triton`` below is the absolute import of Triton.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import operator
import weakref
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .base import SUMS_PER_GROUP, Backend, GlobalState, GroupTensors, StepConfig
from .plan import HYPER_OPTIONS, HYPER_PER_GROUP, PLAN_MUTATES, PlanCache, StepPlan, flatten, plan_schema
from .plan import lr_tensors as plan_lr_tensors


class _LazyNumpy:
    """numpy, imported at first use (the launch tables), not at import: `import mgpo_kernels` needs no numpy."""

    def __getattr__(self, name):
        import numpy

        return getattr(numpy, name)


np = _LazyNumpy()

try:
    import triton  # noqa: F401  (Triton itself, not this module)

    from . import triton_kernels as _k

    _IMPORT_ERROR: Optional[str] = None
except Exception as e:  # ImportError (Triton not installed), or a broken install
    _k = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MAX_ITERS = 16
_TARGET_PROGRAMS = 2048
_CACHE_SIZE = 16  # parameter sets whose tables one backend instance keeps (LRU)
# No FMA contraction (as the C++/CUDA build: -ffp-contract=off, --fmad=false): `p - restore*m` and
# `theta + apply*m` must round the product, then the sum, like the reference backend, the generic apply/remove pass
# and the interpreter; on sm_90 the default would fuse them (40 fma.rn.f32 in the update kernel's PTX).
_COMPILE_OPTIONS = dict(enable_fp_fusion=False)


def _interpreted() -> bool:
    """True when the kernels were created under TRITON_INTERPRET=1 (they then run on the CPU, in numpy)."""
    if _k is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:
        return False
    return isinstance(_k.mgpo_update_kernel, InterpretedFunction)


# ------------------------------------------------------------------------------------------------- tables

def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


class _Entry:
    """Device tables for one set of parameters (one optimizer): the block table, buffers, the tensor table."""

    def __init__(self, numels: Sequence[int], group_sizes: Sequence[int], device: torch.device):
        self.device = device
        n = np.asarray(numels, dtype=np.int64)
        total = int(n.sum())
        biggest = int(n.max()) if len(n) else 1
        # block sizes by a rule (no autotuning on these in-place kernels): BLOCK elements per inner iteration,
        # ITERS iterations per program so that big models get ~2k+ programs and tiny ones one block each.
        self.block = min(_k.BLOCK, max(256, triton.next_power_of_2(max(biggest, 1))))
        self.num_warps = self.block // 128  # 4 elements a thread: one 16-byte vector of fp32 per tensor
        self.iters = min(_MAX_ITERS, _pow2_floor(total // (self.block * _TARGET_PROGRAMS)))
        chunk = self.block * self.iters
        counts = (n + chunk - 1) // chunk
        t_idx = np.repeat(np.arange(len(n), dtype=np.int64), counts)
        first = np.cumsum(counts) - counts
        starts = (np.arange(len(t_idx), dtype=np.int64) - np.repeat(first, counts)) * chunk
        if len(t_idx) == 0:  # every tensor is empty: one idle program still runs the bookkeeping
            t_idx = np.zeros(1, dtype=np.int64)
            starts = np.zeros(1, dtype=np.int64)
        group_of_tensor = np.repeat(np.arange(len(group_sizes), dtype=np.int64), group_sizes)
        blk_group = group_of_tensor[t_idx]
        grp_blk = np.searchsorted(blk_group, np.arange(len(group_sizes) + 1), side="left").astype(np.int64)
        self.n_blocks = len(t_idx)
        self.n_tensors = len(n)
        self.n_groups = len(group_sizes)
        self.blk = _h2d(np.ascontiguousarray(np.stack([t_idx, starts], axis=1).reshape(-1)), device)
        self.grp_blk = _h2d(grp_blk, device)
        self.partials = torch.zeros(self.n_blocks * SUMS_PER_GROUP, dtype=torch.float64, device=device)
        self.counters = torch.zeros(2, dtype=torch.int32, device=device)
        self.counter_reduce = self.counters[0:1]
        self.counter_update = self.counters[1:2]
        self.pending = torch.zeros(2, dtype=torch.float32, device=device)  # the update's new gbar, coef (kernel doc)
        self.lr_slots = torch.zeros(max(self.n_groups, 1), dtype=torch.float32, device=device)
        # filled by _build_tensor_table / _set_hyper
        self.addr_key: Optional[list] = None
        self.needs_copy = False
        self.tab: Optional[Tensor] = None
        self.grp_lr: Optional[Tensor] = None
        self.hyp_key: Optional[tuple] = None
        self.hyp: Optional[Tensor] = None


_data_ptr = Tensor.data_ptr
_is_contiguous = Tensor.is_contiguous
_numel = Tensor.numel
_dtype = operator.attrgetter("dtype")
Tables = collections.OrderedDict[tuple, _Entry]  # one backend instance's entries, keyed by the parameters


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _refuse_in_capture(device: torch.device, what: str) -> None:
    if _capturing(device):
        raise RuntimeError(
            f"MGPO triton backend: {what} during CUDA-graph capture; a captured step must find its tables built: "
            "run one eager step with the same parameters, gradients and hyper-parameters before capturing "
            "(and keep a tensor lr on the parameters' device)"
        )


def _pinned(arr: np.ndarray) -> Tensor:
    """A pinned host copy: the async upload then never depends on the numpy buffer, and torch's pinned-memory
    cache keeps the block until the copy has run."""
    return torch.from_numpy(arr).pin_memory()


def _h2d(arr: np.ndarray, device: torch.device) -> Tensor:
    """Upload a small host array without synchronising the host."""
    if device.type == "cpu":
        return torch.from_numpy(arr).clone()
    # a torch allocation (aligned: the kernels use the block table's address as their aligned base)
    return _pinned(arr).to(device, non_blocking=True)


def _aligned(*ptrs: int) -> bool:
    return all(p % 16 == 0 for p in ptrs)


class _Prepared:
    __slots__ = ("entry", "writeback")

    def __init__(self, entry: _Entry, writeback: List[Tuple[Optional[Tensor], Tensor]]):
        self.entry = entry
        self.writeback = writeback

    def write_back(self) -> None:
        """Copies the dense temporaries of non-contiguous tensors back, after the kernel that wrote them."""
        for dst, src in self.writeback:
            if dst is not None:
                dst.copy_(src)


def _prepare(tables: Tables, plan: StepPlan, device: torch.device) -> _Prepared:
    """The device tables in ``tables`` for these tensors, rebuilt only where an address, size or dtype changed."""
    params = plan.params
    sizes = tuple(plan.group_sizes)
    key = (tuple(map(_data_ptr, params)), tuple(map(_numel, params)), tuple(map(_dtype, params)), sizes, device)
    entry = tables.get(key)
    if entry is None:
        _refuse_in_capture(device, "new parameters (new device tables)")
        entry = _Entry(key[1], sizes, device)
        tables[key] = entry
        while len(tables) > _CACHE_SIZE:
            tables.popitem(last=False)
    else:
        tables.move_to_end(key)

    # the addresses that may change between steps (grads, state, lr tensors)
    # (and the layouts: a non-contiguous tensor is copied, so a view reusing a freed contiguous tensor's address
    # must not find that tensor's table)
    addr_key = [0 if x is None else (x.data_ptr() if x.is_contiguous() else -1) for x in plan.grads]
    addr_key += map(_is_contiguous, params)
    addr_key += map(_data_ptr, plan.exp_avgs)
    addr_key += map(_data_ptr, plan.exp_avg_sqs)
    addr_key += map(_data_ptr, plan.masters)
    addr_key += plan.master_index
    addr_key += map(_data_ptr, plan.steps)
    addr_key += [-1 if lr is None else lr.data_ptr() for lr in plan.lr_tensors]
    writeback: List[Tuple[Optional[Tensor], Tensor]] = []
    if entry.needs_copy or addr_key != entry.addr_key:
        _refuse_in_capture(device, "new tensor addresses or non-contiguous tensors (a new tensor table)")
        _build_tensor_table(entry, plan, writeback)
        entry.addr_key = addr_key
    # lr tensors that the kernel cannot read in place (another device or dtype): copied into a slot (no sync)
    for k, lr in enumerate(plan.lr_tensors):
        if lr is not None and not _direct_lr(lr, device):
            if lr.device.type == "cpu":
                _refuse_in_capture(device, "a CPU tensor lr (copied to the device every step)")
            entry.lr_slots[k].copy_(lr.reshape(()), non_blocking=True)
    return _Prepared(entry, writeback)


def _masters_per_tensor(plan: StepPlan) -> List[Optional[Tensor]]:
    return [None if j < 0 else plan.masters[j] for j in plan.master_index]


def _group_of_tensor(plan: StepPlan) -> List[int]:
    return [k for k, n in enumerate(plan.group_sizes) for _ in range(n)]


def _direct_lr(lr: Tensor, device: torch.device) -> bool:
    return lr.device == device and lr.dtype == torch.float32 and lr.numel() == 1


def _check_tensors(plan: StepPlan, device: torch.device) -> None:
    """What the kernels assume of every address they are given (they dereference them as memory of ``device``
    in the types below); checked whenever the table is rebuilt, so the functional API and the custom ops get a
    clear error instead of an illegal address or garbage."""
    n = len(plan.params)
    if any(len(x) != n for x in (plan.grads, plan.exp_avgs, plan.exp_avg_sqs, plan.steps)):
        raise ValueError("MGPO triton backend: params, grads, exp_avgs, exp_avg_sqs and steps must have the same "
                         "length")
    if len(plan.lr_tensors) != len(plan.group_sizes):
        raise ValueError("MGPO triton backend: one lr_tensors entry per group expected")
    if len(plan.master_index) != n or any(j >= len(plan.masters) for j in plan.master_index):
        raise ValueError("MGPO triton backend: master_index must give, for each tensor, -1 or a position in masters")
    if sum(plan.group_sizes) != len(plan.params) or any(n < 0 for n in plan.group_sizes):
        raise ValueError(f"MGPO triton backend: group_sizes {list(plan.group_sizes)} do not add up to the "
                         f"{len(plan.params)} tensors given")
    tensors = zip(plan.params, plan.grads, plan.exp_avgs, plan.exp_avg_sqs, _masters_per_tensor(plan), plan.steps)
    for i, (p, gr, m, v, ma, st) in enumerate(tensors):
        where = f"MGPO triton backend, tensor {i}"
        if p.dtype not in _DTYPE_CODE:
            raise TypeError(f"{where}: parameter dtype {p.dtype} (float32, bfloat16 or float16 expected)")
        for name, t in (("param", p), ("grad", gr), ("exp_avg", m), ("exp_avg_sq", v), ("master_param", ma),
                        ("step", st)):
            if t is not None and t.device != device:
                raise ValueError(f"{where}: {name} is on {t.device}, the kernels run on {device}")
        for name, t in (("exp_avg", m), ("exp_avg_sq", v), ("master_param", ma)):
            if t is not None and (t.dtype != torch.float32 or t.shape != p.shape):
                raise ValueError(f"{where}: {name} must be float32 of shape {tuple(p.shape)}, got {t.dtype} "
                                 f"{tuple(t.shape)}")
        if gr is not None:
            if gr.layout != torch.strided:
                raise RuntimeError(f"{where}: sparse gradients are not supported")
            if gr.dtype != p.dtype or gr.shape != p.shape:
                raise ValueError(f"{where}: grad {gr.dtype} {tuple(gr.shape)} does not match its parameter "
                                 f"{p.dtype} {tuple(p.shape)}")
        if st.dtype != torch.float32 or st.numel() != 1:
            raise ValueError(f"{where}: step must be a one-element float32 tensor, got {st.dtype} "
                             f"{tuple(st.shape)}")


def _build_tensor_table(entry: _Entry, plan: StepPlan, writeback: List[Tuple[Optional[Tensor], Tensor]]):
    _check_tensors(plan, entry.device)
    rows = []
    needs_copy = False

    def dense(t: Tensor, write: bool) -> Tensor:
        nonlocal needs_copy
        if t.is_contiguous():
            return t
        needs_copy = True
        c = t.contiguous()
        writeback.append((t, c) if write else (None, c))  # also keeps the temporary alive until the update ran
        return c

    tensors = zip(_group_of_tensor(plan), plan.params, plan.grads, plan.exp_avgs, plan.exp_avg_sqs,
                  _masters_per_tensor(plan), plan.steps)
    for gi, p, gr, m, v, ma, st in tensors:
        p, m, v = dense(p, True), dense(m, True), dense(v, True)
        gr = None if gr is None else dense(gr, False)
        ma = None if ma is None else dense(ma, True)
        pa, ga, mpa, va = p.data_ptr(), 0 if gr is None else gr.data_ptr(), m.data_ptr(), v.data_ptr()
        maa = 0 if ma is None else ma.data_ptr()
        code = _DTYPE_CODE[p.dtype]
        if code != 0 and ma is None:
            raise RuntimeError("MGPO triton backend: a bf16/fp16 parameter needs its fp32 master copy")
        aligned = _aligned(pa, ga, mpa, va, maa, entry.blk.data_ptr())  # blk_ptr: the kernels' base
        meta = (gr is not None) | (code << 1) | (int(aligned) << 3) | (gi << 8)
        rows.append((pa, ga, mpa, va, maa, st.data_ptr(), p.numel(), meta))
    tab = np.asarray(rows, dtype=np.int64).reshape(-1, _k.TAB_W)
    entry.tab = _h2d(np.ascontiguousarray(tab.reshape(-1)), entry.device)
    grp_lr = np.zeros(max(len(plan.group_sizes), 1), dtype=np.int64)
    slot0 = entry.lr_slots.data_ptr()
    for k, lr in enumerate(plan.lr_tensors):
        if lr is not None:
            grp_lr[k] = lr.data_ptr() if _direct_lr(lr, entry.device) else slot0 + k * entry.lr_slots.element_size()
    entry.grp_lr = _h2d(grp_lr, entry.device)
    entry.needs_copy = needs_copy


def _kernel_hyper(plan_hyper: List[float], has_scale: bool, has_found_inf: bool) -> List[float]:
    """The plan's table as the update kernel reads it (triton_kernels.py: rows of HYP_W, derived values
    precomputed in float64)."""
    n_opt, n_grp = len(HYPER_OPTIONS), len(HYPER_PER_GROUP)
    rho, ema_beta, adaptive, sign, has_clip, max_grad_norm, perturbed, gbar_floor = plan_hyper[:n_opt]
    vals = [sign * rho, ema_beta, 1.0 - ema_beta, max_grad_norm, has_clip, adaptive, perturbed, float(has_scale),
            float(has_found_inf), gbar_floor, 0.0, 0.0]
    for at in range(n_opt, len(plan_hyper), n_grp):
        lr, b1, b2, eps, wd = plan_hyper[at:at + n_grp]
        vals += [lr, b1, 1.0 - b1, b2, 1.0 - b2, eps, wd, b1 * b1, 2.0 * b1 * (1.0 - b1), (1.0 - b1) ** 2, 0.0, 0.0]
    return vals


def _set_hyper(entry: _Entry, plan: StepPlan):
    key = (tuple(plan.hyper.tolist()), plan.grad_scale is not None, plan.found_inf is not None)
    if key != entry.hyp_key:
        _refuse_in_capture(entry.device, "changed hyper-parameters (lr, betas, rho, ...)")
        arr = np.asarray(_kernel_hyper(list(key[0]), key[1], key[2]), dtype=np.float64)
        if entry.hyp is not None and entry.hyp.numel() == arr.size:
            # in place: a CUDA graph captured earlier keeps reading this buffer (it sees the new values)
            src = torch.from_numpy(arr) if entry.device.type == "cpu" else _pinned(arr)
            entry.hyp.copy_(src, non_blocking=True)
        else:
            entry.hyp = _h2d(arr, entry.device)
        entry.hyp_key = key


# ------------------------------------------------------------------------------------------------- launches

def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the parameters' one."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch_reduce(entry: _Entry, sums: Tensor) -> None:
    """The reduce pass: ``sums`` (float64, base.py's layout) from the gradients and m."""
    with _device_guard(entry.device):
        _k.mgpo_reduce_kernel[(entry.n_blocks,)](
            entry.tab, entry.blk, entry.grp_blk, entry.partials, sums, entry.counter_reduce,
            entry.n_blocks, entry.n_groups, entry.iters,
            BLOCK=entry.block, RBLOCK=_k.RBLOCK, TAB_W=_k.TAB_W, num_warps=entry.num_warps, **_COMPILE_OPTIONS,
        )


def _launch_update(entry: _Entry, sums: Tensor, gstate: GlobalState, scale: Tensor, found_inf: Tensor) -> None:
    """The update pass: scalar stage, restore, AdamW, step counts and the optimizer-wide scalars, in place."""
    with _device_guard(entry.device):
        _k.mgpo_update_kernel[(entry.n_blocks,)](
            entry.tab, entry.blk, entry.grp_lr, entry.hyp, sums,
            gstate.step, gstate.gbar, gstate.coef, gstate.skipped, scale, found_inf, entry.counter_update,
            entry.pending, entry.n_blocks, entry.n_tensors, entry.n_groups, entry.iters,
            BLOCK=entry.block, TBLOCK=_k.TBLOCK, TAB_W=_k.TAB_W, HYP_W=_k.HYP_W, num_warps=entry.num_warps,
            **_COMPILE_OPTIONS,
        )


def _launch_apply(entry: _Entry, coef: Tensor) -> None:
    """The apply pass: p = theta + coef * m (nothing while coef is 0 on the device)."""
    with _device_guard(entry.device):
        _k.mgpo_apply_kernel[(entry.n_blocks,)](
            entry.tab, entry.blk, coef.reshape(1) if coef.dim() == 0 else coef, entry.iters,
            BLOCK=entry.block, TAB_W=_k.TAB_W, num_warps=entry.num_warps, **_COMPILE_OPTIONS,
        )


def _reduce(tables: Tables, plan: StepPlan) -> Tuple[Tensor, _Prepared]:
    device = plan.params[0].device
    prep = _prepare(tables, plan, device)
    sums = torch.empty(SUMS_PER_GROUP * len(plan.group_sizes), dtype=torch.float64, device=device)
    _launch_reduce(prep.entry, sums)
    return sums, prep


def _update(prep: _Prepared, plan: StepPlan, sums: Tensor):
    gstate = GlobalState(*plan.gstate)
    _set_hyper(prep.entry, plan)
    scale = gstate.coef if plan.grad_scale is None else plan.grad_scale  # not read when absent
    found_inf = gstate.coef if plan.found_inf is None else plan.found_inf
    _launch_update(prep.entry, sums, gstate, scale, found_inf)
    prep.write_back()


# ------------------------------------------------------------------------------------------------- custom ops
# The kernels find their tensors through address tables, which a tracer cannot see; a compiled training step
# therefore sees the two passes as opaque custom ops that declare every tensor they read and write (so
# functionalization orders them correctly against the surrounding graph), and builds the tables when they run.
# An op has no backend argument: it takes the instance's integer handle and finds its tables in a weak registry.

_INSTANCES: "weakref.WeakValueDictionary[int, TritonBackend]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def _tables_of(handle: int) -> Tables:
    backend = _INSTANCES.get(int(handle))
    if backend is None:
        raise RuntimeError(f"MGPO triton backend: no backend with handle {handle} (the optimizer that recorded this "
                           "compiled step no longer exists)")
    return backend._tables


_OPS_REGISTERED = False


def _register_ops() -> None:
    """torch.ops.mgpo.triton_reduce / triton_update: the step plan's arguments (plan.py), after the handle."""
    global _OPS_REGISTERED
    if _OPS_REGISTERED:
        return

    @torch.library.custom_op("mgpo::triton_reduce", mutates_args=(),
                             schema=f"(int handle, {plan_schema(mutable=False)}) -> Tensor")
    def _reduce_op(handle, *plan):
        sums, _ = _reduce(_tables_of(handle), StepPlan(*plan))
        return sums

    @_reduce_op.register_fake
    def _(handle, *plan):
        plan = StepPlan(*plan)
        return plan.params[0].new_empty(SUMS_PER_GROUP * len(plan.group_sizes), dtype=torch.float64)

    @torch.library.custom_op("mgpo::triton_update", mutates_args=PLAN_MUTATES,
                             schema=f"(int handle, {plan_schema(mutable=True)}, Tensor sums) -> ()")
    def _update_op(handle, *args):
        plan, sums = StepPlan(*args[:-1]), args[-1]
        _update(_prepare(_tables_of(handle), plan, plan.params[0].device), plan, sums)

    @_update_op.register_fake
    def _(*args):
        return None

    _OPS_REGISTERED = True


def _step_via_ops(handle: int, plan: StepPlan, reduce_hook) -> None:
    """The step as two custom ops (what a compiled graph records) on the tables of the backend ``handle``; the
    eager path calls the same code directly."""
    sums = torch.ops.mgpo.triton_reduce(handle, *plan)
    if reduce_hook is not None:
        reduce_hook(sums)
    torch.ops.mgpo.triton_update(handle, *plan, sums)


if _k is not None:
    _register_ops()


class TritonBackend(Backend):
    """Owns its device tables (``_tables``) and registers itself under an integer ``handle`` for the custom ops."""

    name = "triton"

    def __init__(self):
        self._tables: Tables = collections.OrderedDict()
        self._apply_tables: Tables = collections.OrderedDict()  # the apply pass's (no gradients: its own key)
        self._plans = PlanCache()
        self.handle = next(_HANDLES)
        _INSTANCES[self.handle] = self

    def __reduce__(self):
        """A copy (deepcopy, pickle) is a new instance: its own handle, tables built at its first step."""
        return (type(self), ())

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        device = torch.device(device)
        if _k is None:
            return f"Triton is not installed or failed to import ({_IMPORT_ERROR})"
        if device.type == "cpu":
            if not _interpreted():
                return ("on CPU Triton runs only under its interpreter: set TRITON_INTERPRET=1 before triton is "
                        "first imported")
            return None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available"
            if _interpreted():
                return ("Triton was imported with TRITON_INTERPRET=1 (CPU interpreter), which cannot run the "
                        "kernels on CUDA tensors; unset it to use the triton backend on the GPU")
            return None
        return f"the triton backend runs on CUDA devices (and on CPU under TRITON_INTERPRET=1), not {device.type}"

    @classmethod
    def priority(cls, device: torch.device) -> int:
        return 10 if torch.device(device).type == "cuda" else -1

    @torch.no_grad()
    def perturb(self, groups: List[GroupTensors], coef: Tensor, apply: bool) -> None:
        """The apply pass of theta at rest in one launch (``mgpo_apply_kernel``: reads p or the master and m,
        writes p; nothing while coef is 0 on the device).  Removing eps (``eval()`` between a forward and its
        step) and a compiled region use the generic multi-tensor ops."""
        if not apply or torch.compiler.is_compiling() or sum(len(g.params) for g in groups) == 0:
            return super().perturb(groups, coef, apply)
        params, grads, ms, vs, masters, master_index, steps, sizes = flatten(groups)
        device = params[0].device
        if any(st is None for st in steps):  # functional.apply_perturbation passes no step counts (not read)
            dummy = self.__dict__.get("_no_step")
            if dummy is None or dummy.device != device:
                dummy = self.__dict__["_no_step"] = torch.zeros((), dtype=torch.float32, device=device)
            steps = [dummy if st is None else st for st in steps]
        plan = StepPlan(params, [None] * len(params), ms, vs, masters, master_index, steps, sizes, None,
                        plan_lr_tensors(groups, device), [], None, None)
        prep = _prepare(self._apply_tables, plan, device)
        _launch_apply(prep.entry, coef)
        prep.write_back()

    @torch.no_grad()
    def step(self, groups: List[GroupTensors], gstate: GlobalState, cfg: StepConfig) -> None:
        if sum(len(g.params) for g in groups) == 0:
            from .reference import ReferenceBackend

            return ReferenceBackend().step(groups, gstate, cfg)
        plan = self._plans.build(groups, gstate, cfg)
        if torch.compiler.is_compiling():
            return _step_via_ops(self.handle, plan, cfg.reduce_hook)
        sums, prep = _reduce(self._tables, plan)
        if cfg.reduce_hook is not None:
            cfg.reduce_hook(sums)
        _update(prep, plan, sums)


BACKEND = TritonBackend
