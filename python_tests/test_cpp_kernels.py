"""What is particular to the cpp backend's kernels (torch.ops.mgpo.*): every CPU instruction set and thread
count gives the same bits, pass 1's sums are near exact, the ops trace and pass opcheck, CUDA-graph capture,
the reduce-hook path, errors before any change, and a long run's restore drift against float64.

Its agreement with the reference backend on every configuration is test_backends_vs_reference.py's (the cases
of backend_cases.py); here it is checked on every instruction set.  The general semantics suite
(test_semantics.py, test_api.py) runs the cpp backend as well, through available_backends().
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

try:
    from mgpo_kernels import _C
except ImportError as e:  # pragma: no cover - depends on the build
    pytest.skip(f"mgpo_kernels._C is not built ({e}); run pip install --no-build-isolation -e .",
                allow_module_level=True)

from backend_cases import CASES, run_case  # noqa: E402
from mgpo_kernels import MGPO  # noqa: E402
from mgpo_kernels.backends import unavailable_reason  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if unavailable_reason("cpp", "cuda") is None else [])
needs_cuda = pytest.mark.skipif("cuda" not in DEVICES,
                                reason=f"cpp CUDA kernels not usable here: {unavailable_reason('cpp', 'cuda')}")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RAGGED = [(1,), (3,), (17,), (8, 300), (300, 8), (3, 5, 7), (16385,), (2, 16384), (40001,)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=_C.available_cpu_isas())
def cpu_isa(request):
    """Run a test with each CPU instruction set this machine has (the default one is restored after)."""
    before = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(before)


# ---------------------------------------------------------------------------------------------- helpers
def op_plan(params, grads, ms, vs, masters, steps, gstate, group_sizes=None, lr=1e-2, rho=0.5, max_grad_norm=None,
            perturbed=True):
    """The step plan (the ops' arguments) for these tensors, built by the backend's own PlanCache."""
    from mgpo_kernels.backends.base import GlobalState, GroupTensors, StepConfig
    from mgpo_kernels.backends.plan import PlanCache

    sizes = group_sizes or [len(params)]
    groups, at = [], 0
    for n in sizes:
        sl = slice(at, at + n)
        groups.append(GroupTensors(params[sl], grads[sl], ms[sl], vs[sl], masters[sl], steps[sl], lr, 0.9, 0.999,
                                   1e-8, 0.01))
        at += n
    cfg = StepConfig(rho=rho, ema_beta=0.9, adaptive_norm=True, sign=1.0, max_grad_norm=max_grad_norm,
                     perturbed=perturbed)
    return PlanCache().build(groups, GlobalState(*gstate), cfg)


def reduce_plan(grads, ms, group_sizes=None):
    """A plan whose pass 1 reads these gradients and moments (params, v and steps are placeholders)."""
    params = [torch.zeros(m.shape, dtype=torch.float32 if g is None else g.dtype) for g, m in zip(grads, ms)]
    n = len(ms)
    gstate = [torch.zeros(()), torch.zeros(()), torch.zeros(()), torch.zeros((), dtype=torch.int64)]
    return op_plan(params, list(grads), list(ms), [torch.zeros_like(m) for m in ms], [None] * n,
                   [torch.zeros(()) for _ in ms], gstate, group_sizes)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_params(shapes, dtype, device, seed=0, offset=0):
    """Fresh leaf parameters; offset > 0 makes each one a view at that element offset into a larger buffer
    (misaligned storage: 4 bytes for offset 1 in fp32)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        n = math.prod(s)
        vals = torch.randn(n, generator=g).to(dtype)
        if offset:
            buf = torch.zeros(n + 2 * offset + 3, dtype=dtype, device=device)
            buf[offset:offset + n] = vals.to(device)
            p = buf[offset:offset + n].view(s)
            p.requires_grad_(True)
        else:
            p = vals.view(s).to(device).requires_grad_(True)
        out.append(p)
    return out


def rand_grads(shapes, dtype, device, gen, scale=1.0, offset=0, none=()):
    out = []
    for i, s in enumerate(shapes):
        if i in none:
            out.append(None)
            continue
        n = math.prod(s)
        v = (torch.randn(n, generator=gen) * scale).to(dtype)
        if offset:
            buf = torch.zeros(n + 2 * offset + 1, dtype=dtype, device=device)
            buf[offset:offset + n] = v.to(device)
            out.append(buf[offset:offset + n].view(s))
        else:
            out.append(v.view(s).to(device))
    return out


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


# ---------------------------------------------------------------------------------------------- agreement
def test_matches_reference_every_cpu_isa(cpu_isa):
    """A few of the agreement cases on each instruction set (the others run on the default one)."""
    for name in ("clip_and_weight_decay", "dtype_bfloat16", "dtype_float16"):
        run_case(CASES[name], "cpp", "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_isa_gives_the_same_bits(dtype):
    """The base build (scalar conversions) and the AVX2/AVX-512 builds (vector F16C/bf16 conversions in blocks
    of 512, vector tails) write the same bits: steps with and without a gradient, eval()/train(), and the
    op-level path without a master copy (the parameter restored from its own low-precision value)."""
    shapes = [(1,), (7,), (515,), (1031,), (3, 700), (16385,)]
    isas = _C.available_cpu_isas()
    before = _C.cpu_isa()
    results = {}
    try:
        for isa in isas:
            _C.set_cpu_isa(isa)
            ps = make_params(shapes, dtype, "cpu", seed=3, offset=1)
            opt = MGPO(ps, lr=1e-2, rho=2.0, weight_decay=0.01, backend="cpp")
            gen = torch.Generator().manual_seed(4)
            for t in range(4):
                grads = rand_grads(shapes, dtype, "cpu", gen)
                if t == 2:
                    grads[3] = None
                set_grads(ps, grads)
                opt.step()
            opt.eval()
            theta = [p.detach().clone() for p in ps]
            opt.train()
            # the op alone, no master copies: p is read, restored, updated and re-perturbed in its own dtype
            st = [opt.state[p] for p in ps]
            q = [p.detach().clone() for p in ps]
            ms = [s["exp_avg"].clone() for s in st]
            vs = [s["exp_avg_sq"].clone() for s in st]
            gstate = [torch.tensor(3.0), torch.tensor(0.5), torch.tensor(0.25), torch.tensor(0)]
            torch.ops.mgpo.step(*op_plan(q, rand_grads(shapes, dtype, "cpu", gen), ms, vs, [None] * len(q),
                                         [s["step"].clone() for s in st], gstate, rho=2.0, max_grad_norm=0.5))
            results[isa] = ([p.detach().clone() for p in ps], theta, q, ms, vs,
                            [s["exp_avg"] for s in st] + [s["exp_avg_sq"] for s in st]
                            + [s.get("master_param", s["exp_avg"]) for s in st])
    finally:
        _C.set_cpu_isa(before)
    ref = results[isas[0]]
    for isa in isas[1:]:
        for what, xs, ys in zip(("params", "theta", "update op", "m", "v", "state"), ref, results[isa]):
            for i, (x, y) in enumerate(zip(xs, ys)):
                assert torch.equal(x, y), f"{isa} differs from {isas[0]}: {what} {i}"


# ---------------------------------------------------------------------------------------------- layouts
def test_non_dense_parameter_raises_a_clear_error(device):
    base = torch.randn(8, 10, device=device)
    p = base[:, ::2]  # every other column: not dense
    p.requires_grad_(True)
    opt = MGPO([p], lr=1e-2, backend="cpp")
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="not dense"):
        opt.step()
    assert torch.equal(p.detach(), before)


# ---------------------------------------------------------------------------------------------- determinism
def _trajectory(device, threads=None):
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        shapes = RAGGED + [(70000,)]
        pa = make_params(shapes, torch.float32, device)
        opt = MGPO(pa, lr=1e-2, rho=2.0, max_grad_norm=10.0, backend="cpp")
        gen = torch.Generator().manual_seed(9)
        sums = []
        for _ in range(3):
            grads = rand_grads(shapes, torch.float32, device, gen)
            set_grads(pa, grads)
            ms = [opt.state[p]["exp_avg"] for p in pa] if opt.state else [torch.zeros_like(g) for g in grads]
            sums.append(torch.ops.mgpo.reduce_sums(*reduce_plan(grads, ms)))
            opt.step()
        out = [p.detach().clone() for p in pa] + [opt.state[p][k].clone() for p in pa for k in ("exp_avg", "exp_avg_sq")]
        return out + sums + [opt.global_state["gbar"].clone(), opt.global_state["coef"].clone()]
    finally:
        torch.set_num_threads(old)


def test_bit_identical_run_to_run(device):
    a, b = _trajectory(device), _trajectory(device)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bit_identical_for_any_thread_count():
    """The CPU partials are per chunk, not per thread: the result does not depend on the thread count."""
    a, b = _trajectory("cpu", threads=1), _trajectory("cpu", threads=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _exact_sums(grads, ms, group_index, num_groups):
    """reduce_sums' four sums per group, exactly (products of fp32 values are exact in float64; math.fsum
    rounds the exact sum once), and the sums of the terms' magnitudes for the error bound."""
    exact = [[] for _ in range(4 * num_groups)]
    for g, m, k in zip(grads, ms, group_index):
        m64 = m.detach().double().reshape(-1).numpy()
        if g is None:
            exact[4 * k + 3].append(m64 * m64)
            continue
        g64 = g.detach().double().reshape(-1).numpy()
        exact[4 * k].append(g64 * g64)
        exact[4 * k + 1].append(m64 * g64)
        exact[4 * k + 2].append(m64 * m64)
    cat = [np.concatenate(t) if t else np.zeros(0) for t in exact]
    return [math.fsum(t) for t in cat], [math.fsum(np.abs(t)) for t in cat], [t.size for t in cat]


@pytest.mark.parametrize("dtype", DTYPES + ["mixed"], ids=str)
def test_reduce_sums_same_bits_on_every_isa_and_thread_count_and_near_exact(dtype):
    """Pass 1's float64 sums: the same bits from every CPU instruction set and thread count (each accumulator
    lane is fixed by the element's index, not by the vector width, the schedule or which chunks the AVX-512 loop
    reads side by side), and within float64 rounding of the exact sums (an fp32 accumulation anywhere would be
    ~1e-7 off, a lost chunk or tail far more). "mixed": the gradients' dtypes differ from tensor to tensor."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1,), (15,), (17,), (3, 700), (16385,), (2, 16384), (40001,), (300000,), (8, 4096)]
    if dtype == "mixed":
        cycle = [torch.float32, torch.bfloat16, torch.float32, torch.float16]
        grads = [rand_grads([s], cycle[i % 4], "cpu", gen, scale=1e-3, offset=1)[0] for i, s in enumerate(shapes)]
        grads[4] = None
    else:
        grads = rand_grads(shapes, dtype, "cpu", gen, scale=1e-3, offset=1, none=(4,))
    ms = [torch.zeros(math.prod(s) + 1)[1:].view(s).normal_(0.0, 1e-2, generator=gen) for s in shapes]  # misaligned
    group_index = [0, 0, 0, 0, 1, 1, 1, 1, 1]
    exact, mag, count = _exact_sums(grads, ms, group_index, 2)
    isas, before, threads = _C.available_cpu_isas(), _C.cpu_isa(), torch.get_num_threads()
    got = {}
    try:
        for isa in isas:
            _C.set_cpu_isa(isa)
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                got[isa, t] = torch.ops.mgpo.reduce_sums(*reduce_plan(grads, ms, [4, 5]))
    finally:
        _C.set_cpu_isa(before)
        torch.set_num_threads(threads)
    first = next(iter(got))
    for key, sums in got.items():
        assert torch.equal(sums, got[first]), f"seed {seed}: {key} differs from {first}: {sums} vs {got[first]}"
    sums = got[first].tolist()
    for j, (s, e, a, n) in enumerate(zip(sums, exact, mag, count)):
        # 16 lanes of n/16 terms, the lanes, then the chunks' partials: at most n/16 + 16 + n/16384 roundings
        bound = (n / 16 + 16 + n / 16384 + 2) * 2.0 ** -53 * a
        assert abs(s - e) <= bound, f"seed {seed}: sum {j}: {s!r} vs exact {e!r} (bound {bound:.3g})"
        assert bound <= 1e-10 * a  # far below what an fp32 accumulation would be off by (~1e-7)


# ---------------------------------------------------------------------------------------------- long run
class F64AdamMGPO:
    """The equations of README/base.py in float64 numpy, fed with the gradients the fp32 run saw."""

    def __init__(self, init, lr, betas, eps, rho, ema_beta):
        self.theta = [x.astype(np.float64).copy() for x in init]
        self.m = [np.zeros_like(x) for x in self.theta]
        self.v = [np.zeros_like(x) for x in self.theta]
        self.lr, (self.b1, self.b2), self.eps, self.rho, self.ema = lr, betas, eps, rho, ema_beta
        self.t, self.gbar = 0, 0.0

    def step(self, grads):
        n = math.sqrt(sum(float((g * g).sum()) for g in grads))
        self.t += 1
        self.gbar = n if self.t == 1 else self.ema * self.gbar + (1 - self.ema) * n
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for i, g in enumerate(grads):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            self.theta[i] = self.theta[i] - self.lr / bc1 * self.m[i] / (np.sqrt(self.v[i]) / math.sqrt(bc2) + self.eps)

    def perturbed(self):
        mn = math.sqrt(sum(float((m * m).sum()) for m in self.m))
        c = self.rho / (mn * self.gbar)
        return [th + c * m for th, m in zip(self.theta, self.m)]


def test_long_run_restore_drift_against_float64():
    """10,000 steps with a large rho on a small, well-conditioned fp32 problem: the in-place restore
    (theta = p - coef*m every step, no copy of theta kept) does not drift.

    fp32 AdamW itself ends ~2e-5 (relative) away from the float64 equations after 10,000 steps here, with or
    without a perturbation (rounding of theta's accumulation and of the fp32 bias corrections), so the restore's
    own drift is measured against an identical fp32 run with rho=0 fed the same gradients: same m, v and
    bias corrections, so any difference in theta comes from the restores."""
    steps, rho = 10_000, 2.0
    gen = torch.Generator().manual_seed(11)
    shapes = [(6, 5), (5, 6), (17,)]
    init = [torch.randn(s, generator=gen) + 2.0 for s in shapes]
    target = [torch.randn(s, generator=gen) for s in shapes]
    diag = [0.5 + torch.rand(s, generator=gen) for s in shapes]  # condition number <= 3
    params = [x.clone().requires_grad_(True) for x in init]
    plain = [x.clone().requires_grad_(True) for x in init]
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, ema_beta=0.9, gbar_floor=None,
              backend="cpp")  # the paper's formula, as F64AdamMGPO
    opt = MGPO(params, rho=rho, **hp)
    opt0 = MGPO(plain, rho=0.0, **hp)
    ref = F64AdamMGPO([x.numpy() for x in init], 1e-3, (0.9, 0.999), 1e-8, rho, 0.9)
    noise = torch.Generator().manual_seed(12)
    max_pert = 0.0
    for t in range(steps):
        opt.apply_perturbation()  # what a training forward does (theta at rest; no module here)
        with torch.no_grad():  # gradient at the point the model holds (theta + eps), plus noise
            grads = [d * (p - c) + 0.1 * torch.randn(p.shape, generator=noise)
                     for p, d, c in zip(params, diag, target)]
        for p, q, g in zip(params, plain, grads):
            p.grad = g
            q.grad = g.clone()
        opt.step()
        opt0.step()
        ref.step([g.double().numpy() for g in grads])
        if t % 1000 == 999:
            max_pert = max(max_pert, max(rel(torch.from_numpy(x), torch.from_numpy(th))
                                         for x, th in zip(ref.perturbed(), ref.theta)))
    assert max_pert > 1e-2  # the perturbation is large against the tolerance: the restores matter
    # the perturbed point the next forward sees matches the float64 one
    opt.apply_perturbation()
    assert max(rel(p, torch.from_numpy(x)) for p, x in zip(params, ref.perturbed())) < 1e-4
    with opt.unperturbed():
        theta = [p.detach().clone() for p in params]
    ref_theta = [torch.from_numpy(x) for x in ref.theta]
    fp32_adamw = max(rel(q, r) for q, r in zip(plain, ref_theta))
    total = max(rel(a, r) for a, r in zip(theta, ref_theta))
    restore_drift = max(float((a.double() - q.detach().double()).norm() / r.norm())
                        for a, q, r in zip(theta, plain, ref_theta))
    assert restore_drift < 1e-5, (restore_drift, fp32_adamw, total)
    assert total < fp32_adamw + 1e-5, (restore_drift, fp32_adamw, total)


# ---------------------------------------------------------------------------------------------- ops
def _op_args(device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    shapes = [(5,), (3, 7)]
    params = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    grads = [torch.randn(shapes[0], generator=gen).to(device, dtype), None]
    ms = [torch.randn(s, generator=gen).to(device) for s in shapes]
    vs = [torch.rand(s, generator=gen).to(device) for s in shapes]
    masters = [p.float().clone() for p in params] if dtype != torch.float32 else []
    steps = [torch.tensor(1.0, device=device) for _ in shapes]
    gs = [torch.tensor(v, device=device) for v in (1.0, 0.5, 0.1)] + [torch.tensor(0, device=device)]
    return params, grads, ms, vs, masters, steps, gs


def test_opcheck_custom_ops():
    _opcheck_all(*_op_args())
    _opcheck_all(*_op_args(dtype=torch.bfloat16))


def _opcheck_all(params, grads, ms, vs, masters, steps, gs):
    full = [None] * len(params) if not masters else masters
    plan = tuple(op_plan(params, grads, ms, vs, full, steps, gs, max_grad_norm=1.0))
    sums = torch.ops.mgpo.reduce_sums(*plan)
    torch.library.opcheck(torch.ops.mgpo.reduce_sums.default, plan)
    torch.library.opcheck(torch.ops.mgpo.finish_step.default, plan + (sums,))
    torch.library.opcheck(torch.ops.mgpo.step.default, plan)
    mi = list(plan[5])
    torch.library.opcheck(torch.ops.mgpo.perturb.default, (params, ms, plan[4], mi, gs[2], True))


def test_ops_trace_under_torch_compile():
    params, grads, ms, vs, masters, steps, gstate = _op_args()
    hyper = op_plan(params, grads, ms, vs, [None, None], steps, gstate).hyper

    def step(params, grads, ms, vs, steps, gstate, hyper):
        plan = (params, grads, ms, vs, [], [-1, -1], steps, [2], hyper, [None], gstate, None, None)
        sums = torch.ops.mgpo.reduce_sums(*plan)
        torch.ops.mgpo.finish_step(*plan, sums)
        return sums + torch.ops.mgpo.step(*plan)

    clone = lambda xs: [None if x is None else x.clone() for x in xs]  # noqa: E731
    a = (clone(params), grads, clone(ms), clone(vs), clone(steps), clone(gstate), hyper)
    b = (clone(params), grads, clone(ms), clone(vs), clone(steps), clone(gstate), hyper)
    torch._dynamo.reset()
    sa = step(*a)
    sb = torch.compile(step, backend="aot_eager", fullgraph=True)(*b)
    assert torch.equal(sa, sb)
    for x, y in zip(a[0] + a[2] + a[3] + a[4] + a[5], b[0] + b[2] + b[3] + b[4] + b[5]):
        assert torch.equal(x, y)
    assert float(a[5][0]) == 3.0  # two steps taken on the global step count of 1


def test_plan_layout_and_schemas_agree_with_the_extension():
    """One argument list for every fused op: the extension's schemas and table layout are plan.py's."""
    from mgpo_kernels.backends import plan as plan_mod

    assert (_C.HYPER_OPTION_COUNT, _C.HYPER_GROUP_COUNT) == (len(plan_mod.HYPER_OPTIONS), len(plan_mod.HYPER_PER_GROUP))
    assert str(torch.ops.mgpo.step.default._schema) == f"mgpo::step({plan_mod.plan_schema(True)}) -> Tensor"
    assert str(torch.ops.mgpo.reduce_sums.default._schema) == (
        f"mgpo::reduce_sums({plan_mod.plan_schema(False)}) -> Tensor")
    assert str(torch.ops.mgpo.finish_step.default._schema) == (
        f"mgpo::finish_step({plan_mod.plan_schema(True)}, Tensor sums) -> ()")
    assert list(plan_mod.StepPlan._fields) == [a.name for a in torch.ops.mgpo.step.default._schema.arguments]


NOT_READ_BY_PASS_1 = ("master_index out of range", "a step count in float64")


def _bad(plan, field, value):
    return plan._replace(**{field: value})


@pytest.mark.parametrize("what,make,match", [
    ("hyper of the wrong size", lambda p: _bad(p, "hyper", p.hyper[:-1].clone()), "hyper must be"),
    ("hyper in float32", lambda p: _bad(p, "hyper", p.hyper.float()), "hyper must be"),
    ("group sizes that do not add up", lambda p: _bad(p, "group_sizes", [1]), "group_sizes add up to 1"),
    ("a negative group size", lambda p: p._replace(group_sizes=[3, -1], lr_tensors=[None, None],
                                                   hyper=torch.cat([p.hyper, p.hyper[-5:]])), "is negative"),
    ("lr_tensors of another length", lambda p: _bad(p, "lr_tensors", [None, None]), "lr_tensors for 1 groups"),
    ("a global state of three tensors", lambda p: _bad(p, "gstate", p.gstate[:3]), "gstate must be"),
    ("skipped in float32", lambda p: _bad(p, "gstate", p.gstate[:3] + [torch.zeros(())]), "skipped must be"),
    ("master_index out of range", lambda p: _bad(p, "master_index", [0, -1]), "outside the masters list"),
    ("a list of another length", lambda p: _bad(p, "steps", p.steps[:1]), "must have the same length"),
    ("a step count in float64", lambda p: _bad(p, "steps", [torch.zeros((), dtype=torch.float64)] + p.steps[1:]),
     "step of tensor 0"),
])
@pytest.mark.parametrize("op", ["step", "reduce_sums", "finish_step"])
def test_bad_plan_is_refused_by_name_before_anything_changes(op, what, make, match):
    params, grads, ms, vs, _, steps, gstate = _op_args()
    plan = make(op_plan(params, grads, ms, vs, [None, None], steps, gstate))
    watched = params + ms + vs + steps + gstate
    before = [t.clone() for t in watched]
    extra = (torch.zeros(4, dtype=torch.float64),) if op == "finish_step" else ()
    if op == "reduce_sums" and what in NOT_READ_BY_PASS_1:  # checked by the finish_step that must follow
        getattr(torch.ops.mgpo, op)(*plan, *extra)
    else:
        with pytest.raises(RuntimeError, match=match):
            getattr(torch.ops.mgpo, op)(*plan, *extra)
    assert all(torch.equal(a, b) for a, b in zip(watched, before)), what


# ---------------------------------------------------------------------------------------------- CUDA only
@needs_cuda
def test_cuda_graph_capture_matches_eager():
    shapes = RAGGED
    pa = make_params(shapes, torch.float32, "cuda")
    pb = make_params(shapes, torch.float32, "cuda")
    oa = MGPO(pa, lr=1e-2, rho=2.0, max_grad_norm=5.0, backend="cpp")
    ob = MGPO(pb, lr=1e-2, rho=2.0, max_grad_norm=5.0, backend="cpp")
    gen = torch.Generator().manual_seed(0)
    static = rand_grads(shapes, torch.float32, "cuda", gen)
    for p, g in zip(pa, static):
        p.grad = g.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        oa.step()  # warm-up (state allocation) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        oa.step()
    # eager twin: same warm-up step
    for p, g in zip(pb, static):
        p.grad = g.clone()
    ob.step()
    for t in range(4):
        grads = rand_grads(shapes, torch.float32, "cuda", gen)
        for p, g in zip(pa, grads):
            p.grad.copy_(g)
        graph.replay()
        for p, g in zip(pb, grads):
            p.grad.copy_(g)
        ob.step()
        for a, b in zip(pa, pb):
            assert torch.equal(a, b), f"replay {t}"
    assert torch.equal(oa.global_state["coef"], ob.global_state["coef"])


def test_reduce_hook_path_matches_reference():
    """With a reduce_hook (FSDP2's all-reduce) the step runs as three ops; here a hook that doubles the sums,
    as an all-reduce over two identical ranks would."""
    from mgpo_kernels.backends.base import GlobalState, GroupTensors, StepConfig
    from mgpo_kernels.backends.cpp import CppBackend
    from mgpo_kernels.backends.reference import ReferenceBackend

    shapes = RAGGED[:6]
    gen = torch.Generator().manual_seed(8)
    init = [torch.randn(s, generator=gen) for s in shapes]
    runs = []
    for backend in (CppBackend(), ReferenceBackend()):
        params = [x.clone() for x in init]
        st = dict(m=[torch.zeros_like(x) for x in init], v=[torch.zeros_like(x) for x in init],
                  steps=[torch.zeros(()) for _ in init])
        gs = GlobalState.zeros(torch.device("cpu"))
        g2 = torch.Generator().manual_seed(9)
        seen = []
        for t in range(4):
            grads = [torch.randn(s, generator=g2) for s in shapes]
            if t == 2:
                grads[1] = None
            grp = GroupTensors(params, grads, st["m"], st["v"], [None] * len(init), st["steps"], 1e-2, 0.9, 0.999,
                               1e-8, 0.0)
            cfg = StepConfig(rho=2.0, ema_beta=0.9, adaptive_norm=True, sign=1.0, max_grad_norm=3.0, perturbed=True,
                             reduce_hook=lambda s: (seen.append(s.clone()), s.mul_(2.0)))
            backend.step([grp], gs, cfg)
        runs.append((params, st, gs, seen))
    (pa, sa, ga, seen_a), (pb, sb, gb, seen_b) = runs
    assert len(seen_a) == 4 and all(rel(x, y) < 1e-12 for x, y in zip(seen_a, seen_b))
    for i in range(len(shapes)):
        assert rel(pa[i], pb[i]) < 1e-6
        assert rel(sa["m"][i], sb["m"][i]) < 1e-6
        assert float(sa["steps"][i]) == float(sb["steps"][i])
    assert abs(float(ga.coef) - float(gb.coef)) <= 1e-6 * abs(float(gb.coef))


def test_errors_leave_everything_unchanged():
    """A bad layout is found before the scalar stage changes any state (both the fused and the hook path)."""
    from mgpo_kernels.backends.base import GlobalState, GroupTensors, StepConfig
    from mgpo_kernels.backends.cpp import CppBackend

    params = [torch.randn(5, 6), torch.randn(8, 10)[:, ::2]]  # the second one is not dense
    grads = [torch.randn(5, 6), torch.randn(8, 5)]
    for hook in (None, lambda s: None):
        gs = GlobalState.zeros(torch.device("cpu"))
        steps = [torch.zeros(()), torch.zeros(())]
        grp = GroupTensors(params, grads, [torch.zeros(5, 6), torch.zeros(8, 5)],
                           [torch.zeros(5, 6), torch.zeros(8, 5)], [None, None], steps, 1e-2, 0.9, 0.999, 1e-8, 0.0)
        cfg = StepConfig(rho=1.0, ema_beta=0.9, adaptive_norm=True, sign=1.0, max_grad_norm=None, perturbed=True,
                         reduce_hook=hook)
        before = [p.clone() for p in params]
        with pytest.raises(RuntimeError, match="not dense"):
            CppBackend().step([grp], gs, cfg)
        assert all(torch.equal(a, b) for a, b in zip(params, before))
        assert float(gs.step) == 0.0 and float(steps[0]) == 0.0 and int(gs.skipped) == 0


def test_step_without_tensors_still_runs_the_reduce_hook():
    """A rank whose shard holds no tensor must still take part in the all-reduce: with nothing to launch, the cpp
    backend runs the reference step (hook included), so its global state ends as the reference backend's."""
    from mgpo_kernels import functional

    def run(backend):
        gs = functional.init_global_state(torch.device("cpu"))
        seen = []
        group = dict(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[], state_steps=[], lr=1e-2)
        for _ in range(2):
            functional.mgpo([group], gs, rho=0.5, reduce_hook=lambda s: (seen.append(s.clone()), s.add_(1.0)),
                            backend=backend)
        return seen, {k: v.clone() for k, v in gs.items()}

    seen_cpp, gs_cpp = run("cpp")
    seen_ref, gs_ref = run("reference")
    assert len(seen_cpp) == 2 and all(torch.equal(a, b) for a, b in zip(seen_cpp, seen_ref))
    assert all(torch.equal(gs_cpp[k], gs_ref[k]) for k in gs_ref), (gs_cpp, gs_ref)


# ---------------------------------------------------------------------------------------------- KeptPlan
def _no_kept_plan(monkeypatch):
    """The cpp backend without a held plan: every call through the ops, as under torch.compile."""
    from mgpo_kernels.backends import cpp, plan

    monkeypatch.setattr(cpp.CppBackend, "__init__", lambda self: setattr(self, "_plans", plan.PlanCache()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kept_plan_steps_are_the_ops_steps_bit_for_bit(dtype, monkeypatch):
    """Eagerly the cpp backend runs through a _C.KeptPlan (the persistent lists held in C++, made again when they
    change), its apply pass too; the run is bitwise the run through the ops alone, across missing gradients, a tensor lr changed
    in place, GradScaler's unscale, ``p.data`` reassigned and a new param group."""
    shapes = [(5,), (3, 40), (16385,), (8, 33)]
    init = make_params(shapes, dtype, "cpu", seed=4)
    extra_init = make_params([(7, 3)], dtype, "cpu", seed=5)
    runs = []
    for kept in (True, False):
        with monkeypatch.context() as mp:
            if not kept:
                _no_kept_plan(mp)
            params = [p.detach().clone().requires_grad_(True) for p in init]
            extra = extra_init[0].detach().clone().requires_grad_(True)
            lr = torch.tensor(1e-2)
            opt = MGPO([{"params": params[:2]}, {"params": params[2:], "lr": lr}], lr=2e-2, rho=0.5,
                       max_grad_norm=3.0, weight_decay=0.01, backend="cpp")
            gen = torch.Generator().manual_seed(6)
            used = []
            for t in range(12):
                if t == 6:
                    lr.mul_(0.5)
                if t == 7:
                    params[1].data = params[1].data.clone()
                if t == 8:
                    opt.add_param_group({"params": [extra]})
                    params.append(extra)
                opt.apply_perturbation()  # the apply pass: KeptPlan.perturb, or the perturb op
                grads = rand_grads([p.shape for p in params], dtype, "cpu", gen, none=(2,) if t == 3 else ())
                set_grads(params, grads)
                if t == 11:
                    opt.grad_scale = torch.tensor(4.0)
                    opt.found_inf = torch.tensor(0.0)
                opt.step()
                used.append(opt._backend._plans.held is not None)
            runs.append(([p.detach().clone() for p in params], opt.state_dict(), used,
                         {k: v.clone() for k, v in opt.global_state.items()}))
    (pa, sa, used_a, ga), (pb, sb, used_b, gb) = runs
    assert all(used_a) and not any(used_b), used_a
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    for i in sa["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]), (i, k)
    assert all(torch.equal(ga[k], gb[k]) for k in gb), (ga, gb)


@pytest.mark.parametrize("what,change,match", [
    ("a gradient in another dtype", lambda a: a.update(grads=[a["grads"][0].double()] + a["grads"][1:]),
     "grad of tensor 0 has dtype"),
    ("a gradient of another shape", lambda a: a.update(grads=[a["grads"][0][:-1]] + a["grads"][1:]),
     "grad of tensor 0 has shape"),
    ("one gradient too few", lambda a: a.update(grads=a["grads"][:-1]), "must have the same length"),
    ("hyper of the wrong size", lambda a: a.update(hyper=a["hyper"][:-1].clone()), "hyper must be"),
    ("lr_tensors of another length", lambda a: a.update(lr_tensors=[None, None]), "lr_tensors for 1 groups"),
])
@pytest.mark.parametrize("call", ["step", "reduce_sums", "finish_step"])
def test_kept_plan_refuses_bad_step_arguments_before_anything_changes(call, what, change, match):
    """What a step passes to a KeptPlan is checked as the ops check it: refused by name, nothing modified."""
    params, grads, ms, vs, _, steps, gstate = _op_args()
    plan = op_plan(params, grads, ms, vs, [None, None], steps, gstate)
    kept = _C.KeptPlan(plan.params, plan.exp_avgs, plan.exp_avg_sqs, plan.masters, plan.master_index, plan.steps,
                       plan.group_sizes, plan.gstate)
    assert len(kept) == len(params)
    args = dict(grads=list(plan.grads), hyper=plan.hyper, lr_tensors=plan.lr_tensors, grad_scale=None,
                found_inf=None)
    change(args)
    if call == "finish_step":
        args["sums"] = torch.zeros(4, dtype=torch.float64)
    watched = params + ms + vs + steps + gstate
    before = [t.clone() for t in watched]
    with pytest.raises(RuntimeError, match=match):
        getattr(kept, call)(**args)
    assert all(torch.equal(a, b) for a, b in zip(watched, before)), what


def test_kept_plan_on_a_device_without_kernels_is_refused():
    with pytest.raises(RuntimeError, match="no kernels for meta tensors"):
        _C.KeptPlan([torch.empty(3, device="meta")], [torch.empty(3, device="meta")], [torch.empty(3, device="meta")],
                    [], [-1], [torch.zeros((), device="meta")], [1], [torch.zeros(())] * 3 + [torch.zeros((), dtype=torch.int64)])


def test_grads_of_returns_the_gradient_objects():
    """_C.grads_of (the host cache's batched ``p.grad``) gives the very objects ``p.grad`` gives, None included."""
    ps = [torch.nn.Parameter(torch.randn(3)), torch.randn(2, requires_grad=True), torch.nn.Parameter(torch.randn(4))]
    ps[0].grad = torch.randn(3)
    ps[2].grad = torch.randn(4)[::1]
    got = _C.grads_of(ps)
    assert len(got) == 3 and got[0] is ps[0].grad and got[1] is None and got[2] is ps[2].grad
    with pytest.raises(RuntimeError, match="item 1 is not a tensor"):
        _C.grads_of([ps[0], 3.0])


def test_host_cache_reads_a_subclass_grad_through_python():
    """A parameter subclass may define ``grad`` itself: the cached path then reads it as Python does."""
    from mgpo_kernels import _host_cache

    class Shadowed(torch.nn.Parameter):
        @property
        def grad(self):
            return torch.Tensor.grad.__get__(self) * 0.0 if torch.Tensor.grad.__get__(self) is not None else None

        @grad.setter
        def grad(self, value):
            torch.Tensor.grad.__set__(self, value)

    pa = [Shadowed(torch.randn(5)), torch.nn.Parameter(torch.randn(5))]
    pb = [torch.nn.Parameter(pa[0].detach().clone()), torch.nn.Parameter(pa[1].detach().clone())]
    oa, ob = MGPO(pa, lr=1e-2, rho=0.5, backend="cpp"), MGPO(pb, lr=1e-2, rho=0.5, backend="cpp")
    gen = torch.Generator().manual_seed(3)
    for t in range(4):
        g = [torch.randn(5, generator=gen), torch.randn(5, generator=gen)]
        pa[0].grad, pa[1].grad = g[0].clone(), g[1].clone()
        pb[0].grad, pb[1].grad = torch.zeros(5), g[1].clone()  # what Shadowed.grad returns
        if t >= 2:
            assert _host_cache.lookup(oa) is not None
        oa.step()
        ob.step()
    for a, b in zip(pa, pb):
        assert torch.equal(a.detach(), b.detach())


def test_host_cache_identity_checks():
    """The host cache's identity checks (csrc/host_path.cpp) answer what their Python equivalents would."""
    a, b, c = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    d1, d2 = {"exp_avg": a, "step": b}, {"exp_avg": c}
    for x, y in (([a, b], [a, b]), ([a, b], [b, a]), ([a], [a, b]), ([], [])):
        assert _C.same_items(x, y) == (len(x) == len(y) and all(u is v for u, v in zip(x, y))), (x, y)
    state = {a: d1, b: d2}
    for keys, values in (([a, b], [d1, d2]), ([b, a], [d2, d1]), ([a], [d1]), ([a, b], [d1, dict(d2)])):
        want = (len(state) == len(keys) and all(u is v for u, v in zip(state, keys))
                and all(u is v for u, v in zip(state.values(), values)))
        assert _C.dict_is(state, keys, values) == want
    for dicts, key, expected in (([d1, d2], "exp_avg", [a, c]), ([d1, d2], "exp_avg", [a, a]),
                                 ([d1, d2], "step", [b, None]), ([d1, d2], "master_param", [None, None]),
                                 ([d1, 3], "exp_avg", [a, None]), ([d1], "exp_avg", [a, c])):
        want = (len(dicts) == len(expected) and all(isinstance(d, dict) for d in dicts)
                and all(d.get(key) is e for d, e in zip(dicts, expected)))
        assert _C.values_are(dicts, key, expected) == want, (key, expected)
