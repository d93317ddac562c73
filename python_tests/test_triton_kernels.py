"""What is particular to the triton backend (on a CUDA device if there is one, else on the CPU under the Triton
interpreter, which conftest.py turns on): its launch geometry, its device tables (cached per optimizer, rebuilt
when an address changes, updated in place), its custom ops under torch.compile, compilation for sm_90, its
availability, and the checks of the functional API's inputs.

Its agreement with the reference backend on every configuration is test_backends_vs_reference.py's (the cases
of backend_cases.py).  Shapes are small: under TRITON_INTERPRET=1 every program of a launch runs in numpy, one
after the other.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

from backend_cases import CASES, run_case, same
from mgpo_kernels import MGPO, available_backends
from mgpo_kernels.backends.plan import PlanCache, plan_schema

DEVICE = "cuda" if torch.cuda.is_available() and "triton" in available_backends("cuda") else "cpu"
pytestmark = pytest.mark.skipif("triton" not in available_backends(DEVICE),
                                reason="triton backend not usable here")

if "triton" in available_backends(DEVICE):
    from mgpo_kernels.backends import triton as tb
    from mgpo_kernels.backends import triton_kernels as tk

RAGGED = [(1,), (1, 1), (17,), (8, 30), (30, 8), (3, 5, 7), (1025,)]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    """|a - b| <= tol * max|b| elementwise (relative to the tensor's scale), NaN-free."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = b.abs().max().clamp_min(1e-30)
    return bool(torch.isfinite(a).all() and ((a - b).abs() <= tol * scale).all())


def _params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=DEVICE, dtype=dtype)) for s in shapes]


def _pair(shapes, dtype=torch.float32, groups=None, **kw):
    """Identical parameters for a reference and a triton optimizer."""
    pa, pb = _params(shapes, dtype), _params(shapes, dtype)
    if groups is not None:  # list of (indices, overrides)
        ga = [dict(params=[pa[i] for i in idx], **o) for idx, o in groups]
        gb = [dict(params=[pb[i] for i in idx], **o) for idx, o in groups]
        return pa, pb, MGPO(ga, backend="reference", **kw), MGPO(gb, backend="triton", **kw)
    return pa, pb, MGPO(pa, backend="reference", **kw), MGPO(pb, backend="triton", **kw)


def _set_grads(ps_list, shapes, dtype, gen, active=None, scale=1.0):
    grads = []
    for i, s in enumerate(shapes):
        if active is not None and not active[i]:
            grads.append(None)
        else:
            grads.append((torch.randn(s, generator=gen) * scale).to(device=DEVICE, dtype=dtype))
    for ps in ps_list:
        for p, g in zip(ps, grads):
            p.grad = None if g is None else g.clone()


def _entry(opt):
    """The device tables of ``opt``'s parameters, held by its own backend instance."""
    key = tuple(p.data_ptr() for g in opt.param_groups for p in g["params"])
    return next(e for k, e in opt._backend._tables.items() if k[0] == key)


def _assert_same_state(pa, pb, oa, ob, tol=1e-6, param_tol=None, skipped=True):
    param_tol = tol if param_tol is None else param_tol
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert _close(b, a, param_tol), f"param {i} differs: {(a.double() - b.double()).abs().max()}"
        sa, sb = oa.state.get(a, {}), ob.state.get(b, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            if k == "step":
                assert float(sa[k]) == float(sb[k]), f"step of param {i}"
            else:
                assert _close(sb[k], sa[k], tol), f"state {k} of param {i} differs"
    ga, gb = oa.global_state, ob.global_state
    for k in ("step", "gbar", "coef") + (("skipped",) if skipped else ()):
        x, y = ga[k], gb[k]
        assert _close(y, x, tol) if k in ("gbar", "coef") else float(x) == float(y), k


def test_several_blocks_per_program_match_reference(monkeypatch):
    """Several inner iterations per program, full and ragged ones, 2 programs a tensor."""
    monkeypatch.setattr(tb, "_TARGET_PROGRAMS", 1)
    shapes = RAGGED + [(4100,)]
    assert tb._Entry([math.prod(s) for s in shapes], [len(shapes)], torch.device(DEVICE)).iters == 4
    case = CASES["weight_decay_clip_minus_momentum_missing_grads_eval_step"]
    run_case(dataclasses.replace(case, name="several_blocks_per_program", shapes=same(shapes)), "triton", DEVICE,
             interpreted=DEVICE == "cpu")


def test_tiny_tensors_get_one_block_each():
    """More tensors and blocks than one iteration of the kernels' table loops (256 rows); a tensor bigger than
    a block is split (3000 and 2049 elements: 3 blocks each)."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(int(n),) for n in torch.randint(1, 6, (600,), generator=gen)] + [(3000,), (1,), (2049,)]
    entry = tb._Entry([math.prod(s) for s in shapes], [len(shapes)], torch.device(DEVICE))
    assert entry.n_tensors == len(shapes) and entry.n_blocks == len(shapes) + 4


def test_mixed_dtypes_in_one_launch_per_pass(monkeypatch):
    shapes = [(17,), (8, 30), (3, 5, 7), (1,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]

    def make():
        return [torch.nn.Parameter(p.to(dt)) for p, dt in zip(_params(shapes), dtypes)]

    pa, pb = make(), make()
    oa, ob = MGPO(pa, lr=1e-2, rho=0.3, backend="reference"), MGPO(pb, lr=1e-2, rho=0.3, backend="triton")
    launches = []
    from triton.runtime.interpreter import InterpretedFunction

    if DEVICE == "cpu":
        orig = InterpretedFunction.run

        def counting(self, *a, **k):
            launches.append(self.fn.__name__)
            return orig(self, *a, **k)

        monkeypatch.setattr(InterpretedFunction, "run", counting)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen).to(DEVICE, dt) for s, dt in zip(shapes, dtypes)]
        for ps in (pa, pb):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        launches.clear()
        oa.step(), ob.step()
        if DEVICE == "cpu":
            assert launches == ["mgpo_reduce_kernel", "mgpo_update_kernel"]
        _assert_same_state(pa, pb, oa, ob, param_tol=1e-2)


def test_tables_cached_and_rebuilt_when_grads_are_recreated():
    pa, pb, oa, ob = _pair(RAGGED, lr=1e-2, rho=0.5)
    gen = torch.Generator().manual_seed(10)
    _set_grads([pa, pb], RAGGED, torch.float32, gen)
    oa.step(), ob.step()
    entry = _entry(ob)
    tab = entry.tab
    oa.step(), ob.step()  # same gradient tensors: no rebuild
    assert entry.tab is tab
    _assert_same_state(pa, pb, oa, ob)
    keep = [p.grad for p in pb]  # keep the old storage alive so the new grads get new addresses
    ob.zero_grad(set_to_none=True)
    oa.zero_grad(set_to_none=True)
    _set_grads([pa, pb], RAGGED, torch.float32, gen)
    assert all(p.grad.data_ptr() != k.data_ptr() for p, k in zip(pb, keep))
    oa.step(), ob.step()
    assert entry.tab is not tab  # rebuilt: the kernels read the new gradients
    _assert_same_state(pa, pb, oa, ob)


def test_bit_identical_run_to_run(monkeypatch):
    monkeypatch.setattr(tb, "_TARGET_PROGRAMS", 1)
    shapes = RAGGED + [(4100,), (2, 2)]

    def run():
        ps = _params(shapes)
        opt = MGPO(ps, lr=1e-2, rho=0.7, backend="triton")
        sums = []
        opt._reduce_hook = lambda: (lambda s: sums.append(s.clone()))
        gen = torch.Generator().manual_seed(11)
        for _ in range(3):
            _set_grads([ps], shapes, torch.float32, gen)
            opt.step()
        return [p.detach().clone() for p in ps] + [opt.state[p]["exp_avg_sq"] for p in ps] + sums

    a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_compiled_step_sees_the_custom_ops():
    pa, pb, oa, ob = _pair([(5,), (3, 4)], lr=1e-2, rho=0.3)
    gen = torch.Generator().manual_seed(12)
    _set_grads([pa, pb], [(5,), (3, 4)], torch.float32, gen)
    oa.step()
    groups, gstate, cfg = ob._groups(with_grads=True), ob._gstate, ob._config(cached=False)
    backend = ob._backend
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    @torch.compile(backend=capture, fullgraph=True)
    def compiled_step(groups, gstate):
        backend.step(groups, gstate, cfg)

    compiled_step(groups, gstate)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("triton_reduce" in t for t in targets) and any("triton_update" in t for t in targets), targets
    _assert_same_state(pa, pb, oa, ob)


def test_two_optimizers_over_the_same_parameters_keep_their_own_tables(monkeypatch):
    """Each optimizer's backend owns its tables: stepping one never rebuilds or rewrites the other's (a CUDA
    graph captured by one would replay on buffers the other changed, and capture refuses any rebuild)."""
    shapes = [(17,), (8, 30), (3,)]
    pa, pb = _params(shapes), _params(shapes)
    kws = [dict(lr=1e-2, rho=0.5), dict(lr=3e-2, rho=0.2, weight_decay=0.1)]
    refs = [MGPO(pa, backend="reference", **kw) for kw in kws]
    tris = [MGPO(pb, backend="triton", **kw) for kw in kws]
    assert tris[0]._backend.handle != tris[1]._backend.handle
    rebuilds = []
    orig = tb._refuse_in_capture
    monkeypatch.setattr(tb, "_refuse_in_capture", lambda device, what: (rebuilds.append(what), orig(device, what)))
    gen = torch.Generator().manual_seed(13)
    _set_grads([pa, pb], shapes, torch.float32, gen)
    for t in range(4):
        for ref, tri in zip(refs, tris):
            for a, b in zip(pa, pb):  # new values at the same addresses, as in a captured training step
                b.grad.copy_(a.grad.copy_(torch.randn(a.shape, generator=gen)))
            ref.step(), tri.step()
            _assert_same_state(pa, pb, ref, tri)
        if t == 0:  # warm-up: each built its own tables once
            assert len(rebuilds) == 6, rebuilds  # per optimizer: new parameters, tensor table, hyper table
            tabs = [(_entry(o), _entry(o).tab, _entry(o).hyp) for o in tris]
            rebuilds.clear()
    assert rebuilds == []  # after warm-up neither step rebuilt or rewrote a table
    assert [(_entry(o), _entry(o).tab, _entry(o).hyp) for o in tris] == tabs
    e0, e1 = tabs[0][0], tabs[1][0]
    assert e0 is not e1 and e0.counters.data_ptr() != e1.counters.data_ptr()
    assert e0.partials.data_ptr() != e1.partials.data_ptr() and float(e0.hyp[12]) != float(e1.hyp[12])  # lr
    copied = copy.deepcopy(tris[0]._backend)  # a copy starts with its own handle and no tables
    assert copied.handle != tris[0]._backend.handle and not copied._tables and _entry(tris[0]) is e0


def test_compiled_steps_run_on_their_own_optimizers_tables():
    """The custom ops find the tables of the backend that recorded them by its handle; a handle whose backend is
    gone is refused by name."""
    shapes = [(5,), (3, 4)]
    pb = _params(shapes)
    opts = [MGPO(pb, backend="triton", lr=1e-2, rho=0.3), MGPO(pb, backend="triton", lr=2e-2, rho=0.1)]
    gen = torch.Generator().manual_seed(14)
    for o in opts:
        _set_grads([pb], shapes, torch.float32, gen)
        o.step()  # allocates the state
    for o in opts:
        assert len(o._backend._tables) == 1
        o._backend._tables.clear()
        groups, gstate, cfg, backend = o._groups(with_grads=True), o._gstate, o._config(cached=False), o._backend

        @torch.compile(backend=lambda gm, example_inputs: gm.forward, fullgraph=True)
        def compiled_step(groups, gstate):
            backend.step(groups, gstate, cfg)

        torch._dynamo.reset()
        compiled_step(groups, gstate)
        assert len(backend._tables) == 1
    first = dict(opts[0]._backend._tables)
    assert first.keys() == opts[1]._backend._tables.keys()  # the same parameters ...
    assert next(iter(first.values())) is not next(iter(opts[1]._backend._tables.values()))  # ... own tables
    gone = tb.TritonBackend()
    handle = gone.handle
    del gone
    o = opts[0]
    plan = PlanCache().build(o._groups(with_grads=True), o._gstate, o._config(cached=False))
    with pytest.raises(RuntimeError, match="no longer exists"):
        torch.ops.mgpo.triton_reduce(handle, *plan)


def test_ops_take_the_step_plan_of_the_cpp_ops():
    """One argument list for both fused backends: the Triton ops' schemas are the plan's, after the handle."""
    assert str(torch.ops.mgpo.triton_reduce.default._schema) == (
        f"mgpo::triton_reduce(int handle, {plan_schema(False)}) -> Tensor")
    assert str(torch.ops.mgpo.triton_update.default._schema) == (
        f"mgpo::triton_update(int handle, {plan_schema(True)}, Tensor sums) -> ()")


def test_availability_and_priority():
    assert tb.TritonBackend.priority(torch.device("cpu")) < 0
    assert tb.TritonBackend.priority(torch.device("cuda")) == 10
    assert "triton" in available_backends(DEVICE)
    assert MGPO([torch.nn.Parameter(torch.randn(3))]).backend != "triton"
    # without the interpreter, triton is not usable on the CPU, and says why
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    code = ("from mgpo_kernels.backends import unavailable_reason as u; import triton; print(u('triton', 'cpu'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


_AOT = r'''
import os, re, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.nvidia.compiler import get_ptxas
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mgpo_kernels.backends import triton_kernels as tk
from mgpo_kernels.backends import triton as tb

PTRS = {
    "mgpo_reduce_kernel": dict(tab_ptr="*i64", blk_ptr="*i64", grp_blk_ptr="*i64", part_ptr="*fp64",
                               sums_ptr="*fp64", counter_ptr="*i32"),
    "mgpo_update_kernel": dict(tab_ptr="*i64", blk_ptr="*i64", grp_lr_ptr="*i64", hyp_ptr="*fp64", sums_ptr="*fp64",
                               g_step_ptr="*fp32", g_gbar_ptr="*fp32", g_coef_ptr="*fp32", g_skipped_ptr="*i64",
                               scale_ptr="*fp32", found_inf_ptr="*fp32", counter_ptr="*i32",
                               pending_ptr="*fp32"),
    "mgpo_apply_kernel": dict(tab_ptr="*i64", blk_ptr="*i64", coef_ptr="*fp32"),
}
CONSTS = {"mgpo_reduce_kernel": dict(BLOCK=1024, RBLOCK=tk.RBLOCK, TAB_W=tk.TAB_W),
          "mgpo_update_kernel": dict(BLOCK=1024, TBLOCK=tk.TBLOCK, TAB_W=tk.TAB_W, HYP_W=tk.HYP_W),
          "mgpo_apply_kernel": dict(BLOCK=1024, TAB_W=tk.TAB_W)}
for fn in (tk.mgpo_reduce_kernel, tk.mgpo_update_kernel, tk.mgpo_apply_kernel):
    ptrs, consts = PTRS[fn.__name__], CONSTS[fn.__name__]
    sig = {a: ptrs.get(a, "constexpr" if a in consts else "i32") for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ptrs}  # as the JIT specializes them
    k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 8, **tb._COMPILE_OPTIONS})
    ops = sorted(set(re.findall(r"(?:ld|st|atom|div|sqrt|fma)\.[a-z0-9._]+", k.asm["ptx"])))
    print(fn.__name__, " ".join(ops))
    with tempfile.TemporaryDirectory() as d:  # ptxas -v: the spills of the code that runs on an H100/H200
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(k.asm["ptx"])
        target = re.search(r"^\.target\s+(\S+)", k.asm["ptx"], re.M).group(1)
        log = subprocess.run([get_ptxas(90).path, "-v", f"--gpu-name={target}", f.name, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True)
    log = log.stdout + log.stderr if log.returncode == 0 else "failed: " + log.stderr
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)) if log[:7] != "failed:" else -1
    print(fn.__name__ + ".ptxas", spills, *re.findall(r"Used (\d+) registers", log))
'''


def test_kernels_compile_for_h100_h200_with_vector_accesses(tmp_path):
    """The interpreter checks semantics only: compile the three kernels for sm_90 (no GPU needed, Triton's ptxas)
    as the JIT specializes them (16-byte aligned pointer arguments) to catch what only the compiler rejects (branch
    types, loop-carried types), and check that full blocks use 16-byte vector accesses, that ptxas spills nothing,
    and that the update is IEEE (div.rn / sqrt.rn, no approximate division, and no fused multiply-add: products
    are rounded before the sum, as in the reference and the C++/CUDA build)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    for name in ("mgpo_reduce_kernel", "mgpo_update_kernel"):
        assert "ld.global.v4.b32" in lines[name], lines[name]
        assert "atom.global.gpu.acq_rel.add" in lines[name], lines[name]
        assert "ld.volatile" in lines[name], lines[name]
    upd = lines["mgpo_update_kernel"]
    assert "st.global.v4.b32" in upd and "div.rn.f32" in upd and "sqrt.rn.f32" in upd, upd
    assert "approx" not in upd and "div.full" not in upd, upd
    assert "ld.global.v4.b32" in lines["mgpo_apply_kernel"] and "st.global.v4.b32" in lines["mgpo_apply_kernel"]
    for name in ("mgpo_reduce_kernel", "mgpo_update_kernel", "mgpo_apply_kernel"):
        assert "fma." not in lines[name], lines[name]
        spills, *_ = lines[name + ".ptxas"].split()  # spill bytes (-1: ptxas failed), registers
        assert spills == "0", (name, lines[name + ".ptxas"])


def test_aligned_tensors_take_the_vector_path():
    ps = _params([(2048,), (17,)])
    ps.append(torch.nn.Parameter(torch.randn(40, device=DEVICE)[1:33]))  # a view at a 4-byte offset
    opt = MGPO(ps, lr=1e-2, backend="triton")
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    entry = _entry(opt)
    aligned = [(int(meta) >> 3) & 1 for meta in entry.tab.view(-1, tk.TAB_W)[:, 7].cpu()]
    assert aligned == [1, 1, 0]


def _call(a):
    """(param_groups, global_state) of functional.mgpo from the lists made by args() below."""
    group = dict(params=a[0], grads=a[1], exp_avgs=a[2], exp_avg_sqs=a[3], state_steps=a[4], lr=1e-2)
    return [group], a[5]


def test_functional_api_inputs_are_checked_before_the_kernels():
    """The tensor table is built from raw addresses: a state tensor of the wrong dtype or shape, or a gradient
    that does not match its parameter, is refused with a message (and nothing runs) instead of being read as
    memory of another type."""
    from mgpo_kernels.functional import init_global_state, mgpo

    def args():
        p = torch.randn(6, device=DEVICE)
        return ([p], [torch.randn(6, device=DEVICE)], [torch.zeros(6, device=DEVICE)], [torch.zeros(6, device=DEVICE)],
                [torch.zeros((), device=DEVICE)], init_global_state(DEVICE))

    cases = [
        (lambda a: a[4].__setitem__(0, torch.zeros((), dtype=torch.int64, device=DEVICE)), "step must be"),
        (lambda a: a[2].__setitem__(0, torch.zeros(7, device=DEVICE)), "exp_avg must be float32 of shape"),
        (lambda a: a[3].__setitem__(0, torch.zeros(6, dtype=torch.float64, device=DEVICE)), "exp_avg_sq must be"),
        (lambda a: a[1].__setitem__(0, torch.randn(6, dtype=torch.float64, device=DEVICE)), "does not match"),
    ]
    for mutate, match in cases:
        a = args()
        mutate(a)
        before = a[0][0].clone()
        with pytest.raises((ValueError, TypeError), match=match):
            mgpo(*_call(a), backend="triton")
        assert torch.equal(a[0][0], before)
    a = args()
    before = a[0][0].clone()
    mgpo(*_call(a), backend="triton")  # the same call with valid inputs runs
    assert not torch.equal(a[0][0], before)


def test_table_not_reused_for_a_view_at_a_freed_gradients_address():
    """A non-contiguous gradient at the address of the previous (contiguous) one must not find the old table:
    the kernels would read it in storage order."""
    pa, pb, oa, ob = _pair([(9, 9), (5,)], lr=1e-2, rho=1.0)
    gen = torch.Generator().manual_seed(3)
    buf = torch.randn(81, generator=gen).to(DEVICE)
    other = torch.randn(5, generator=gen).to(DEVICE)
    for view in (buf.view(9, 9), buf.view(9, 9).t(), buf.view(9, 9)):  # same data_ptr every step
        pa[0].grad, pb[0].grad = view.contiguous(), view
        pa[1].grad, pb[1].grad = other.clone(), other  # the same address every step too
        oa.step()
        ob.step()
        _assert_same_state(pa, pb, oa, ob)


def test_hyper_parameter_table_updated_in_place():
    """A changed float lr is written into the same device buffer (a CUDA graph captured before keeps reading
    it), and the step uses the new value."""
    pa, pb, oa, ob = _pair([(17,), (8, 30)], lr=1e-2, rho=0.5)
    gen = torch.Generator().manual_seed(4)
    _set_grads([pa, pb], [(17,), (8, 30)], torch.float32, gen)
    oa.step()
    ob.step()
    entry = _entry(ob)
    hyp = entry.hyp.data_ptr()
    for lr in (3e-2, 5e-3):
        for o in (oa, ob):
            o.param_groups[0]["lr"] = lr
        _set_grads([pa, pb], [(17,), (8, 30)], torch.float32, gen)
        oa.step()
        ob.step()
        _assert_same_state(pa, pb, oa, ob)
        assert entry.hyp.data_ptr() == hyp
