"""The configurations every fused backend is compared on against the reference backend, and the one closeness
metric of that comparison (in the spirit of torch's optim_db).

A case is data: shapes, dtypes, hyper-parameters (per param group), what happens between steps (lr and options
changed, missing gradients, eval-mode steps, non-finite gradients, GradScaler inputs) and where the parameters
and gradients live in memory.  :func:`run_case` builds the case twice, from the same seed, for the backend under
test and for the reference, feeds both the same fresh random gradients and compares them after every step.
Both sides go through the public API only (``MGPO`` or ``functional.mgpo``), never the kernels' ops, so the
harness does not change when a backend's internals do.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mgpo_kernels import MGPO
from mgpo_kernels.functional import apply_perturbation, init_global_state, mgpo

Shape = Tuple[int, ...]

# ---------------------------------------------------------------------------------------------- shapes
#: tails of every length class, the C++ kernels' chunk boundary (16384 elements) crossed, a 1-element tensor
RAGGED: Tuple[Shape, ...] = ((1,), (3,), (17,), (8, 300), (300, 8), (3, 5, 7), (16385,), (2, 16384), (40001,))
#: the same kinds of shapes, small enough for the Triton interpreter (each program of a launch runs in numpy)
RAGGED_SMALL: Tuple[Shape, ...] = ((1,), (1, 1), (17,), (8, 30), (30, 8), (3, 5, 7), (1025,))


@dataclass(frozen=True)
class Shapes:
    """A case's tensors for compiled kernels, and for the Triton interpreter (None: too big for it)."""

    compiled: Tuple[Shape, ...]
    interpreted: Optional[Tuple[Shape, ...]]


RAGGED_SHAPES = Shapes(RAGGED, RAGGED_SMALL)


def same(shapes: Sequence[Shape]) -> Shapes:
    return Shapes(tuple(shapes), tuple(shapes))


def compiled_only(shapes: Sequence[Shape]) -> Shapes:
    return Shapes(tuple(shapes), None)


def _tiny_shapes(count: int, high: int, seed: int = 5) -> List[Shape]:
    gen = torch.Generator().manual_seed(seed)
    return [(int(n),) for n in torch.randint(1, high, (count,), generator=gen)]


# ---------------------------------------------------------------------------------------------- metric
@dataclass(frozen=True)
class Tolerance:
    """Elementwise ``|actual - expected| <= scale * max|expected| + rounding * |expected|``.

    ``scale``: the fused kernels' fp32 arithmetic may round differently from the reference's (other summation
    orders, other but exact forms of the bias corrections), by a few ulps of the tensor's largest values.
    ``rounding``: a bf16/fp16 tensor holds one rounding of such an fp32 value, and two values a few fp32 ulps
    apart may round to neighbouring values of the small dtype: one of its ulps, at most eps * |value|.
    """

    scale: float
    rounding: float = 0.0


TOLERANCES: Dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(scale=1e-6),
    torch.bfloat16: Tolerance(scale=1e-6, rounding=torch.finfo(torch.bfloat16).eps),
    torch.float16: Tolerance(scale=1e-6, rounding=torch.finfo(torch.float16).eps),
    torch.float64: Tolerance(scale=1e-6),  # the reduce pass's sums, of fp32 moments that may differ so
}


def mismatch(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """How far ``actual`` is from ``expected``, in units of the tolerance of expected's dtype: <= 1 is close.

    Non-finite values must be where they are expected and equal (a NaN is never "close" to a number); another
    dtype or shape is infinitely far."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return math.inf
    tol = TOLERANCES[expected.dtype]
    work = torch.promote_types(expected.dtype, torch.float32)  # differences of bf16/fp16 values are exact there
    a, e = actual.detach().to(work), expected.detach().to(work)
    magnitude = e.abs()  # not in place: ``e`` may be the expected tensor itself
    if magnitude.numel() == 0:
        return 0.0
    top = magnitude.max()
    if not bool(torch.isfinite(top)):  # non-finite values expected: the same ones, and the rest close
        finite = torch.isfinite(e)
        if not (torch.equal(torch.isfinite(a), finite) and torch.equal(a.isnan(), e.isnan())
                and torch.equal(a[torch.isinf(e)], e[torch.isinf(e)])):
            return math.inf
        return mismatch(actual[finite], expected[finite])
    diff = (a - e).abs_()  # NaN where ``a`` is NaN: the max below is then NaN, infinitely far
    if float(top) == 0.0:
        return 0.0 if float(diff.max()) == 0.0 else math.inf
    scale = tol.scale * top
    allowed = magnitude.mul_(tol.rounding).add_(scale) if tol.rounding else scale
    worst = float(diff.div_(allowed).max())
    return worst if math.isfinite(worst) else math.inf


# ---------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Layout:
    """Where the parameters and gradients live: the fused kernels address raw memory."""

    param_offset: int = 0  # each parameter a view this many elements into a larger buffer (misaligned)
    grad_offset: int = 0  # the same for the gradients
    one_buffer_gap: Optional[int] = None  # all parameters views of one buffer, this many elements apart
    transposed: bool = False  # parameters of 2+ dims dense, with their dims reversed in memory
    foreign_grads: bool = False  # gradients in another layout than their parameter's (transposed, strided)


#: the options of every case unless it says otherwise (the MGPO defaults for the rest)
BASE_OPTIONS = dict(lr=1e-2, rho=0.5)
FAULT_TENSOR = 3  # the gradient a non-finite value is written into (the first one with a gradient from here)
FAULT_ELEMENT = 7


@dataclass(frozen=True)
class Case:
    """One configuration, run for ``steps`` steps on both sides and compared after each of them."""

    name: str
    shapes: Shapes = RAGGED_SHAPES
    dtypes: Tuple[torch.dtype, ...] = (torch.float32,)  # cycled over the tensors
    steps: int = 4
    options: Dict = field(default_factory=dict)  # MGPO keyword arguments (over BASE_OPTIONS)
    #: param groups: (number of tensors, or None for the rest; hyper-parameters) each
    groups: Optional[Tuple[Tuple[Optional[int], Dict], ...]] = None
    tensor_lr: Tuple[int, ...] = ()  # groups whose lr the backend under test gets as a 0-d tensor (reference: float)
    #: before step t: {"lr": one value or one per group, option: value}
    schedule: Optional[Callable[[int], Dict]] = None
    without_grad: Optional[Callable[[int, int], bool]] = None  # (step, tensor) -> no gradient this step
    eval_steps: Tuple[int, ...] = ()  # steps taken in eval mode (eval() before, train() after)
    faults: Dict[int, float] = field(default_factory=dict)  # step -> NaN/inf written into one gradient
    grad_scale: Optional[float] = None  # gradients scaled by it, passed as grad_scale (with found_inf)
    found_inf_steps: Tuple[int, ...] = ()
    grad_scaler: Optional[Dict] = None  # torch.amp.GradScaler(device, **this) runs the steps
    layout: Layout = Layout()
    api: str = "optimizer"  # "optimizer" (MGPO) or "functional" (functional.mgpo)
    reduce_hook: Optional[str] = None  # functional only: "observe", or "double" (the sums of 2 identical ranks)
    grad_magnitude: float = 1.0
    seed: int = 0

    def __post_init__(self):
        assert self.api in ("optimizer", "functional"), self.api
        if self.api == "functional":
            assert not self.eval_steps and self.grad_scaler is None, "the functional API has no modes or scaler"
        else:
            assert self.reduce_hook is None, "a reduce hook is given through the functional API"

    def shapes_for(self, interpreted: bool) -> Optional[Tuple[Shape, ...]]:
        return self.shapes.interpreted if interpreted else self.shapes.compiled

    def skips_expected(self, t: int) -> bool:
        return t in self.faults or t in self.found_inf_steps

    @property
    def may_skip(self) -> bool:
        return bool(self.faults or self.found_inf_steps)


def _missing_grads_and_an_eval_step(name, **options):
    """A few tensors without a gradient in steps 2 and 3, step 3 in eval mode."""
    return Case(name, shapes=RAGGED_SHAPES, steps=5, options=options,
                without_grad=lambda t, i: t in (2, 3) and i % 3 == 1, eval_steps=(3,))


def _many_groups(count: int) -> Tuple[Tuple[int, Dict], ...]:
    return tuple((2, dict(lr=1e-3 * (k + 1), weight_decay=0.01 * (k % 3), betas=(0.9, 0.99 if k % 2 else 0.999)))
                 for k in range(count))


_RAGGED_5 = Shapes(RAGGED[:5], RAGGED_SMALL)
_RAGGED_6 = Shapes(RAGGED[:6], RAGGED_SMALL)
_TINY = _tiny_shapes(600, 6) + [(3000,), (1,), (2049,)]
_NAN, _INF = float("nan"), float("inf")

CASE_LIST: List[Case] = [
    # hyper-parameters
    Case("defaults", steps=5),
    Case("large_rho_weight_decay", steps=5, options=dict(rho=20.0, weight_decay=0.1)),
    Case("max_grad_norm", steps=5, options=dict(max_grad_norm=1.0)),
    Case("max_grad_norm_inactive", steps=5, options=dict(max_grad_norm=1e6)),
    Case("clip_and_weight_decay", options=dict(max_grad_norm=2.0, weight_decay=0.01)),
    Case("no_adaptive_norm_minus_momentum", steps=5, options=dict(adaptive_norm=False, direction="-momentum",
                                                                  rho=0.05)),
    Case("nlg_hyperparameters", steps=5, options=dict(rho=0.01, ema_beta=0.8, betas=(0.8, 0.999), eps=1e-6)),
    Case("rho0", steps=5, options=dict(rho=0.0)),
    Case("no_gbar_floor_small_gradients", options=dict(gbar_floor=None, rho=0.05), grad_magnitude=1e-4),
    Case("gbar_floor_reached", options=dict(rho=0.05), grad_magnitude=1e-4),
    _missing_grads_and_an_eval_step("defaults_missing_grads_eval_step", lr=1e-2, rho=0.5),
    _missing_grads_and_an_eval_step("weight_decay_clip_minus_momentum_missing_grads_eval_step", lr=2e-2, rho=0.3,
                                    weight_decay=0.1, max_grad_norm=0.5, direction="-momentum"),
    _missing_grads_and_an_eval_step("no_adaptive_norm_missing_grads_eval_step", lr=1e-2, rho=0.05,
                                    adaptive_norm=False, betas=(0.8, 0.99), ema_beta=0.8),
    # dtypes
    Case("dtype_float32", options=dict(rho=2.0)),
    *[Case(f"dtype_{str(dt)[6:]}", dtypes=(dt,), options=dict(rho=2.0, weight_decay=0.01),
           without_grad=lambda t, i: t == 2 and i == 3) for dt in (torch.bfloat16, torch.float16)],
    Case("mixed_dtypes", shapes=same([(17,), (8, 30), (3, 5, 7), (1,)]), steps=3, options=dict(rho=0.3),
         dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float32)),
    # param groups and lr
    Case("param_groups_with_different_hyperparameters", steps=5, options=dict(rho=1.0, max_grad_norm=3.0),
         groups=((3, dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)),
                 (2, dict(lr=3e-2, betas=(0.5, 0.9), weight_decay=0.0)),
                 (None, dict(lr=2e-2, betas=(0.0, 0.999), eps=1e-3, weight_decay=0.3))),
         tensor_lr=(1,)),
    Case("many_param_groups", shapes=same([(3 + 5 * i,) for i in range(40)]), steps=3, options=dict(rho=1.0),
         groups=_many_groups(20)),
    Case("lr_and_rho_changed_between_steps_tensor_lr", shapes=Shapes(RAGGED[:4], RAGGED_SMALL[:4]),
         options=dict(rho=1.0), tensor_lr=(0,), schedule=lambda t: dict(lr=1e-2 * (t + 1), rho=1.0 + t)),
    Case("param_groups_tensor_lr_changed_in_place_reduce_hook", shapes=same([(5,), (7, 3), (1,), (40,)]),
         options=dict(rho=0.2), groups=((2, dict(lr=3e-2, weight_decay=0.05)), (2, dict(lr=1e-2, betas=(0.5, 0.9)))),
         tensor_lr=(0,), schedule=lambda t: dict(lr=(1e-3, 1e-2)) if t == 3 else {},
         api="functional", reduce_hook="double"),
    # missing gradients, eval mode
    Case("params_without_grad", steps=6, options=dict(rho=3.0),
         without_grad=lambda t, i: i in ((1, 4) if t in (2, 3) else (2,) if t > 0 else ())),
    Case("params_without_grad_bfloat16", shapes=Shapes(RAGGED[:5], RAGGED_SMALL[:5]), dtypes=(torch.bfloat16,),
         steps=5, options=dict(rho=3.0),
         without_grad=lambda t, i: i in ((1, 4) if t in (2, 3) else (2,) if t > 0 else ())),
    Case("eval_mode_steps", steps=6, options=dict(rho=3.0), eval_steps=(2, 3)),
    # memory layouts
    *[Case(f"misaligned_views_{dname}_param{po}_grad{go}", shapes=shapes, dtypes=(dt,), steps=steps,
           layout=Layout(param_offset=po, grad_offset=go))
      for po, go in ((1, 0), (3, 5), (2, 1))
      for dname, dt, shapes, steps in (("float32", torch.float32, RAGGED_SHAPES, 4),
                                       ("bfloat16", torch.bfloat16, _RAGGED_6, 3))],
    Case("views_of_one_buffer", shapes=same([(5, 7), (13,), (2, 3, 4)]), steps=3, options=dict(rho=2.0),
         layout=Layout(param_offset=1, one_buffer_gap=0)),
    Case("views_at_odd_offsets_of_one_buffer_transposed", shapes=same([(1,), (17,), (8, 30), (1025,), (4, 9)]),
         steps=3, options=dict(rho=0.4), layout=Layout(param_offset=1, one_buffer_gap=1, grad_offset=5,
                                                       transposed=True)),
    Case("transposed_parameters", shapes=same([(9, 40), (5, 3, 4)]), steps=3, options=dict(rho=2.0),
         layout=Layout(transposed=True)),
    Case("gradients_in_another_layout", shapes=same([(9, 9), (40, 9), (33,)]), steps=3, options=dict(rho=2.0),
         layout=Layout(foreign_grads=True)),
    Case("gradients_in_another_layout_reduce_hook", shapes=same([(9, 9), (40, 9), (33,)]), steps=3,
         options=dict(rho=2.0), layout=Layout(foreign_grads=True), api="functional", reduce_hook="observe"),
    # sizes
    Case("thousands_of_tiny_tensors", shapes=compiled_only(_tiny_shapes(3000, 8)), steps=2, options=dict(rho=1.0)),
    Case("hundreds_of_tiny_tensors_some_without_grad", shapes=same(_TINY), steps=2, options=dict(rho=0.3),
         without_grad=lambda t, i: i % 7 == 3 and t > 0),
    Case("one_50m_element_tensor", shapes=compiled_only([(50_000_000,)]), steps=2,
         options=dict(rho=5.0, max_grad_norm=100.0)),
    # skipped steps, GradScaler
    *[Case(f"nonfinite_gradients_skip_{str(dt)[6:]}", shapes=_RAGGED_5, dtypes=(dt,), steps=5,
           options=dict(rho=2.0), faults={2: _NAN, 3: _INF}) for dt in (torch.float32, torch.bfloat16)],
    Case("grad_scale_and_found_inf", shapes=_RAGGED_6, steps=5, options=dict(rho=2.0, max_grad_norm=5.0),
         grad_scale=1024.0, found_inf_steps=(2,)),
    Case("grad_scale_and_found_inf_functional", shapes=_RAGGED_6, steps=5, options=dict(rho=2.0, max_grad_norm=5.0),
         grad_scale=1024.0, found_inf_steps=(2,), api="functional"),
    Case("torch_grad_scaler", shapes=_RAGGED_5, steps=6, options=dict(rho=2.0), faults={3: _INF},
         grad_scaler=dict(init_scale=2.0 ** 12, growth_interval=2)),
]
CASES: Dict[str, Case] = {c.name: c for c in CASE_LIST}
assert len(CASES) == len(CASE_LIST), "case names must be unique"


# ---------------------------------------------------------------------------------------------- building
@dataclass
class _Guard:
    """The elements of a buffer outside the views placed in it: no step may write them."""

    buffer: torch.Tensor
    outside: torch.Tensor
    values: torch.Tensor

    def check(self, what: str) -> None:
        assert torch.equal(self.buffer[self.outside], self.values), f"{what}: memory next to a tensor was written"


def _view(buf: torch.Tensor, start: int, shape: Shape, transposed: bool) -> torch.Tensor:
    n = math.prod(shape)
    if transposed and len(shape) >= 2:
        return buf[start:start + n].view(tuple(reversed(shape))).permute(*reversed(range(len(shape))))
    return buf[start:start + n].view(shape)


def _guarded(views_at: Sequence[Tuple[int, Shape]], size: int, dtype, device, transposed: bool, seed: int):
    """Views at the given element offsets of one buffer filled with random values, and its guard."""
    buf = torch.randn(size, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    outside = torch.ones(size, dtype=torch.bool, device=device)
    views = []
    for start, shape in views_at:
        views.append(_view(buf, start, shape, transposed))
        outside[start:start + math.prod(shape)] = False
    return views, _Guard(buf, outside, buf[outside].clone())


def _place(values: torch.Tensor, shape: Shape, dtype, device, offset: int, transposed: bool, seed: int):
    """A tensor holding ``values`` (flat, logical order) at ``offset`` elements into its own buffer."""
    n = math.prod(shape)
    if offset:
        (t,), guard = _guarded([(offset, shape)], n + 2 * offset + 3, dtype, device, transposed, seed)
    elif transposed:
        t, guard = _view(torch.empty(n, dtype=dtype, device=device), 0, shape, transposed), None
    else:
        t, guard = torch.empty(shape, dtype=dtype, device=device), None
    t.copy_(values.view(shape))
    return t, guard


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (a NaN equals itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
    return torch.equal(a.detach().view(as_int), b.detach().view(as_int))


def _foreign(values: torch.Tensor, shape: Shape, dtype, device, param_transposed: bool) -> torch.Tensor:
    """The same values in a layout other than the parameter's: transposed (2+ dims) or strided (1 dim)."""
    if len(shape) >= 2:
        t = _view(torch.empty(math.prod(shape), dtype=dtype, device=device), 0, shape, not param_transposed)
    else:
        t = torch.empty(2 * math.prod(shape), dtype=dtype, device=device)[::2].view(shape)
    return t.copy_(values.view(shape))


# ---------------------------------------------------------------------------------------------- one side
class Side:
    """One backend's run of a case: parameters, gradients, optimizer (or functional) state, built from the case."""

    def __init__(self, case: Case, backend: str, device, shapes: Sequence[Shape], under_test: bool):
        self.case, self.backend, self.device = case, backend, torch.device(device)
        self.shapes = list(shapes)
        self.dtypes = [case.dtypes[i % len(case.dtypes)] for i in range(len(self.shapes))]
        self.options = {**BASE_OPTIONS, **case.options}
        self.guards: List[_Guard] = []
        self.grad_guards: List[_Guard] = []
        self.grads_before: List = []
        self.sums_seen: List[torch.Tensor] = []
        self.training = True
        gen = torch.Generator().manual_seed(case.seed)
        self.params = self._make_params([torch.randn(math.prod(s), generator=gen) for s in self.shapes])
        self.group_sizes = self._group_sizes()
        self.base_lrs = [float(hp.get("lr", self.options["lr"])) for _, hp in self._group_specs()]
        self.lr_tensors = {k: torch.tensor(self.base_lrs[k], device=self.device)
                           for k in (case.tensor_lr if under_test else ())}
        self.scaler = (torch.amp.GradScaler(self.device.type, **case.grad_scaler)
                       if case.grad_scaler is not None else None)
        if case.api == "optimizer":
            self.opt = MGPO(self._param_groups(), backend=backend, **self.options)
        else:
            self._init_functional_state()

    # -------------------------------------------------------------- construction
    def _make_params(self, values: List[torch.Tensor]) -> List[torch.Tensor]:
        lay, seed = self.case.layout, self.case.seed + 100
        if lay.one_buffer_gap is not None:
            assert len(set(self.dtypes)) == 1, "one buffer holds one dtype"
            starts, at = [], lay.param_offset
            for s in self.shapes:
                starts.append(at)
                at += math.prod(s) + lay.one_buffer_gap
            views, guard = _guarded(list(zip(starts, self.shapes)), at + 3, self.dtypes[0], self.device,
                                    lay.transposed, seed)
            self.guards.append(guard)
            for v, x, s in zip(views, values, self.shapes):
                v.copy_(x.view(s))
            params = views
        else:
            params = []
            for i, (x, s, dt) in enumerate(zip(values, self.shapes, self.dtypes)):
                p, guard = _place(x, s, dt, self.device, lay.param_offset, lay.transposed, seed + i)
                params.append(p)
                self.guards += [guard] if guard is not None else []
        for p in params:
            assert lay.param_offset == 0 or p.storage_offset() > 0
            p.requires_grad_(True)
        return params

    def _group_specs(self):
        return self.case.groups if self.case.groups is not None else ((None, {}),)

    def _group_sizes(self) -> List[int]:
        specs = self._group_specs()
        fixed = sum(n for n, _ in specs if n is not None)
        sizes = [len(self.params) - fixed if n is None else n for n, _ in specs]
        assert sum(sizes) == len(self.params) and min(sizes) > 0, (sizes, len(self.params))
        return sizes

    def _group_params(self):
        at = 0
        for size in self.group_sizes:
            yield self.params[at:at + size]
            at += size

    def _param_groups(self) -> List[dict]:
        out = []
        for k, (ps, (_, hp)) in enumerate(zip(self._group_params(), self._group_specs())):
            hp = dict(hp)
            hp["lr"] = self.lr_tensors.get(k, self.base_lrs[k])
            out.append(dict(params=ps, **hp))
        return out

    def _init_functional_state(self) -> None:
        ps = [p.detach() for p in self.params]
        zeros = [torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format) for p in ps]
        self.state_dicts = []
        for p, z in zip(ps, zeros):
            st = dict(step=torch.zeros((), device=self.device), exp_avg=z, exp_avg_sq=z.clone())
            if p.dtype != torch.float32:
                st["master_param"] = p.clone(memory_format=torch.preserve_format).float()
            self.state_dicts.append(st)
        self.gstate = init_global_state(self.device)
        self.lrs = list(self.base_lrs)

    # -------------------------------------------------------------- views
    def state(self, i: int) -> Optional[Dict[str, torch.Tensor]]:
        if self.case.api == "functional":
            return self.state_dicts[i]
        p = self.params[i]
        return self.opt.state[p] if p in self.opt.state else None

    def global_state(self) -> Dict[str, torch.Tensor]:
        if self.case.api == "functional":
            return {k: v.detach().clone() for k, v in self.gstate.items()}
        return self.opt.global_state

    def _tensors(self) -> Dict[Tuple[int, str], torch.Tensor]:
        out = {}
        for i, p in enumerate(self.params):
            out[i, "param"] = p.detach()
            out.update({(i, k): v for k, v in (self.state(i) or {}).items()})
        return out

    # -------------------------------------------------------------- a step
    def apply_schedule(self, t: int) -> None:
        changes = dict(self.case.schedule(t)) if self.case.schedule else {}
        lr = changes.pop("lr", None)
        if lr is not None:
            lrs = lr if isinstance(lr, tuple) else (lr,) * len(self.group_sizes)
            for k, value in enumerate(lrs):
                if self.case.api == "functional":
                    self.lrs[k] = value
                if k in self.lr_tensors:
                    self.lr_tensors[k].fill_(value)  # in place: the kernels read it on the device
                elif self.case.api == "optimizer":
                    self.opt.param_groups[k]["lr"] = value
        for name, value in changes.items():
            if self.case.api == "functional":
                self.options[name] = value
            else:
                setattr(self.opt, name, value)

    def set_grads(self, values: List[Optional[torch.Tensor]]) -> None:
        """Gradients from the values (None: no gradient), scaled by the case's or the GradScaler's scale."""
        lay = self.case.layout
        self.grad_guards = []
        for i, (p, x) in enumerate(zip(self.params, values)):
            if x is None:
                p.grad = None
                continue
            if self.scaler is not None:  # as the gradients of a scaled loss
                x = self.scaler.scale(x.to(self.device))
            elif self.case.grad_scale is not None:
                x = x * self.case.grad_scale
            if lay.foreign_grads:
                g = _foreign(x, p.shape, p.dtype, self.device, lay.transposed)
            else:
                g, guard = _place(x, p.shape, p.dtype, self.device, lay.grad_offset, lay.transposed,
                                  self.case.seed + 200 + i)
                self.grad_guards += [guard] if guard is not None else []
            p.grad = g
        self.grads_before = [None if p.grad is None else (p.grad, p.grad.clone(), p.grad.stride())
                             for p in self.params]

    def step(self, t: int) -> None:
        case = self.case
        before = {k: x.clone() for k, x in self._tensors().items()} if case.may_skip else None
        gs_before = self.global_state()
        if t in case.eval_steps:
            self.opt.eval()
            self.training = False
        # theta at rest: a loop without module calls applies eps itself before its forward (here: the gradients)
        if self.training:
            if case.api == "functional":
                apply_perturbation(self._functional_groups(), self.gstate, backend=self.backend)
            else:
                self.opt.apply_perturbation()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"MGPO\.step\(\) was called in eval mode")
            if case.api == "functional":
                self._functional_step(t)
            elif self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            elif case.grad_scale is not None:
                self.opt.grad_scale = torch.tensor(case.grad_scale, device=self.device)
                self.opt.found_inf = torch.tensor(1.0 if t in case.found_inf_steps else 0.0, device=self.device)
                self.opt.step()
                del self.opt.grad_scale, self.opt.found_inf
            else:
                self.opt.step()
        self.check_invariants(f"{self.backend} step {t}", t, gs_before, before)

    def _functional_groups(self) -> List[dict]:
        groups, at = [], 0
        for size in self.group_sizes:
            sts = [self.state_dicts[i] for i in range(at, at + size)]
            groups.append(dict(params=[self.params[i].detach() for i in range(at, at + size)],
                               exp_avgs=[s["exp_avg"] for s in sts], master_params=[s.get("master_param") for s in sts]))
            at += size
        return groups

    def _functional_step(self, t: int) -> None:
        case, groups, at = self.case, [], 0
        for k, ((_, hp), size) in enumerate(zip(self._group_specs(), self.group_sizes)):
            idx = range(at, at + size)
            at += size
            sts = [self.state_dicts[i] for i in idx]
            group = dict(params=[self.params[i].detach() for i in idx], grads=[self.params[i].grad for i in idx],
                         exp_avgs=[s["exp_avg"] for s in sts], exp_avg_sqs=[s["exp_avg_sq"] for s in sts],
                         state_steps=[s["step"] for s in sts],
                         master_params=[s.get("master_param") for s in sts],
                         lr=self.lr_tensors.get(k, self.lrs[k]))
            for key in ("betas", "eps", "weight_decay"):
                if key in hp or key in self.options:
                    group[key] = hp.get(key, self.options.get(key))
            groups.append(group)
        opts = {k: v for k, v in self.options.items() if k not in ("lr", "betas", "eps", "weight_decay")}
        if case.grad_scale is not None:
            opts["grad_scale"] = torch.tensor(case.grad_scale, device=self.device)
            opts["found_inf"] = torch.tensor(1.0 if t in case.found_inf_steps else 0.0, device=self.device)
        if case.reduce_hook is not None:
            opts["reduce_hook"] = self._hook
        opts["perturbed"] = self.training
        mgpo(groups, self.gstate, backend=self.backend, **opts)

    def _hook(self, sums: torch.Tensor) -> None:
        self.sums_seen.append(sums.clone())
        if self.case.reduce_hook == "double":
            sums.mul_(2.0)

    def train(self) -> None:
        self.opt.train()
        self.training = True
        self.check_invariants(f"{self.backend} train()")

    # -------------------------------------------------------------- what every backend keeps true
    def check_invariants(self, what: str, t: Optional[int] = None, gs_before=None, before=None) -> None:
        for guard in self.guards + self.grad_guards:
            guard.check(what)
        for i, held in enumerate(self.grads_before):  # a step reads the gradients, never writes them
            if held is not None:
                g, values, stride = held
                assert self.params[i].grad is g and g.stride() == stride and _same_bits(g, values), \
                    f"{what}: the gradient of tensor {i} was changed"
        gs = self.global_state()
        if t is not None:
            skipped = int(gs["skipped"]) - int(gs_before["skipped"])
            assert skipped == int(self.case.skips_expected(t)), \
                f"{what}: skipped went {int(gs_before['skipped'])} -> {int(gs['skipped'])}"
            if skipped and before is not None:  # a skipped step changes nothing but the count
                after = self._tensors()
                for key, x in before.items():
                    if key[1] == "param" and x.dtype == torch.float32:  # theta + eps - eps: theta up to rounding
                        assert torch.allclose(after[key], x, rtol=1e-6, atol=1e-7), \
                            f"{what}: the skipped step did not leave {key} at theta"
                    else:
                        assert _same_bits(after[key], x), f"{what}: the skipped step changed {key}"
                for key in ("step", "gbar", "coef"):
                    assert _same_bits(gs[key], gs_before[key]), f"{what}: the skipped step changed {key}"
        if self.sums_seen:
            sums = self.sums_seen[-1]
            assert sums.dtype == torch.float64 and sums.shape == (4 * len(self.group_sizes),), \
                f"{what}: the reduce hook got sums of {sums.dtype} {tuple(sums.shape)}"
        # theta at rest: a bf16/fp16 parameter holds exactly its fp32 master, rounded once
        for i, p in enumerate(self.params):
            st = self.state(i)
            if st is not None and "master_param" in st:
                want = st["master_param"].to(p.dtype)
                assert torch.equal(p.detach(), want), f"{what}: param {i} is not its rounded master (theta)"


# ---------------------------------------------------------------------------------------------- comparison
def compare(side: Side, ref: Side, what: str) -> None:
    """Parameters, moments, masters and step counts of every tensor, and the global state: the backend under
    test against the reference, in the one metric above."""
    far: List[Tuple[float, str]] = []

    def close(name, actual, expected):
        err = mismatch(actual, expected)
        if not err <= 1.0:
            diff = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs()
            far.append((err, f"{name} ({expected.dtype}): {err:.3g} x its tolerance, max |diff| "
                             f"{float(diff.nan_to_num(math.inf).max()) if diff.numel() else 0.0:.3g}"))

    for i, (p, q) in enumerate(zip(side.params, ref.params)):
        close(f"param {i}", p, q)
        sa, sb = side.state(i), ref.state(i)
        assert (sa is None) == (sb is None), f"{what}: tensor {i} has state on one side only"
        if sb is None:
            continue
        assert set(sa) == set(sb), f"{what}: state keys of tensor {i}: {sorted(sa)} vs {sorted(sb)}"
        for key in ("exp_avg", "exp_avg_sq", "master_param"):
            if key in sb:
                close(f"{key} {i}", sa[key], sb[key])
        assert float(sa["step"]) == float(sb["step"]), f"{what}: step count of tensor {i}"
    ga, gb = side.global_state(), ref.global_state()
    assert float(ga["step"]) == float(gb["step"]), f"{what}: global step {float(ga['step'])} vs {float(gb['step'])}"
    assert int(ga["skipped"]) == int(gb["skipped"]), f"{what}: skipped {int(ga['skipped'])} vs {int(gb['skipped'])}"
    for key in ("gbar", "coef"):
        close(key, ga[key], gb[key])
    assert len(side.sums_seen) == len(ref.sums_seen), f"{what}: reduce hook calls"
    for k, (x, y) in enumerate(zip(side.sums_seen, ref.sums_seen)):
        close(f"sums of step {k}", x, y)
    if ref.scaler is not None:
        assert side.scaler.get_scale() == ref.scaler.get_scale(), f"{what}: GradScaler scale"
    if far:
        far.sort(key=lambda e: -e[0])
        raise AssertionError(f"{what}: {len(far)} quantities differ from the reference; worst:\n  "
                             + "\n  ".join(m for _, m in far[:8]))


def run_case(case: Case, backend: str, device="cpu", interpreted: bool = False) -> Tuple[Side, Side]:
    """``case`` on ``backend`` and on the reference (same device), compared after every step."""
    shapes = case.shapes_for(interpreted)
    assert shapes is not None, f"{case.name} is too big for the Triton interpreter"
    side = Side(case, backend, device, shapes, under_test=True)
    ref = Side(case, "reference", device, shapes, under_test=False)
    compare(side, ref, f"{case.name}: {backend} on {device}, initial")
    gen = torch.Generator().manual_seed(case.seed + 1)
    for t in range(case.steps):
        values: List[Optional[torch.Tensor]] = []
        for i, s in enumerate(shapes):
            x = torch.randn(math.prod(s), generator=gen) * case.grad_magnitude
            values.append(None if case.without_grad and case.without_grad(t, i) else x)
        if t in case.faults:
            k = next(i for i in list(range(FAULT_TENSOR, len(values))) + list(range(len(values)))
                     if values[i] is not None)
            values[k][min(FAULT_ELEMENT, values[k].numel() - 1)] = case.faults[t]
        for s in (side, ref):
            s.apply_schedule(t)
            s.set_grads(values)
            s.step(t)
        compare(side, ref, f"{case.name}: {backend} on {device}, step {t}")
        if t in case.eval_steps:
            side.train()
            ref.train()
            compare(side, ref, f"{case.name}: {backend} on {device}, train() after step {t}")
    return side, ref
