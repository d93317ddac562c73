"""GPU readiness without a GPU: the Triton kernels (reduce, update, and the apply pass where present) compile
ahead of time for each NVIDIA architecture of the default list (sm_80, sm_90, sm_100, sm_120: setup.py's
DEFAULT_ARCH_LIST) with the launch's options, and ptxas reports no spills; the AMD Instinct MI300 target (gfx942)
too where the installed Triton can compile it without ROCm.

The kernels are compiled in a subprocess without TRITON_INTERPRET (under the interpreter they are not JIT
functions). Each target is skipped, saying why, where this Triton cannot compile it. The launches' largest block
(BLOCK=1024, 8 warps) is compiled: the most registers per thread.
"""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

NVIDIA = [80, 90, 100, 120]


def _signatures():
    from mgpo_kernels.backends import triton_kernels as k

    i64p, f64p, f32p, i32p = "*i64", "*fp64", "*fp32", "*i32"
    reduce = dict(
        fn=k.mgpo_reduce_kernel,
        signature=dict(tab_ptr=i64p, blk_ptr=i64p, grp_blk_ptr=i64p, part_ptr=f64p, sums_ptr=f64p,
                       counter_ptr=i32p, n_blocks="i32", n_groups="i32", iters="i32",
                       BLOCK="constexpr", RBLOCK="constexpr", TAB_W="constexpr"),
        constexprs=dict(BLOCK=k.BLOCK, RBLOCK=k.RBLOCK, TAB_W=k.TAB_W),
    )
    update = dict(
        fn=k.mgpo_update_kernel,
        signature=dict(tab_ptr=i64p, blk_ptr=i64p, grp_lr_ptr=i64p, hyp_ptr=f64p, sums_ptr=f64p,
                       g_step_ptr=f32p, g_gbar_ptr=f32p, g_coef_ptr=f32p, g_skipped_ptr=i64p, scale_ptr=f32p,
                       found_inf_ptr=f32p, counter_ptr=i32p, pending_ptr=f32p, n_blocks="i32", n_tensors="i32",
                       n_groups="i32", iters="i32", BLOCK="constexpr", TBLOCK="constexpr", TAB_W="constexpr",
                       HYP_W="constexpr"),
        constexprs=dict(BLOCK=k.BLOCK, TBLOCK=k.TBLOCK, TAB_W=k.TAB_W, HYP_W=k.HYP_W),
    )
    kernels = {"reduce": reduce, "update": update}
    if hasattr(k, "mgpo_apply_kernel"):  # theta at rest's apply pass
        kernels["apply"] = dict(
            fn=k.mgpo_apply_kernel,
            signature=dict(tab_ptr=i64p, blk_ptr=i64p, coef_ptr=f32p, iters="i32", BLOCK="constexpr",
                           TAB_W="constexpr"),
            constexprs=dict(BLOCK=k.BLOCK, TAB_W=k.TAB_W),
        )
    return kernels, k.BLOCK // 128


def _ptxas_figures(ptx: str, arch: int):
    """`ptxas -v` on Triton's PTX with Triton's own ptxas: (registers, spill store bytes, spill load bytes)."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={target}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    stores = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
    loads = [int(x) for x in re.findall(r"(\d+) bytes spill loads", log)]
    return max(regs), sum(stores), sum(loads)


def _worker(target_spec: str) -> dict:
    """Compile both kernels for one target; a JSON line per kernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    from mgpo_kernels.backends.triton import _COMPILE_OPTIONS

    backend, arch, warp = target_spec.split(":")
    target = GPUTarget(backend, int(arch) if backend == "cuda" else arch, int(warp))
    kernels, num_warps = _signatures()
    out = {}
    for name, spec in kernels.items():
        src = triton.compiler.ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"])
        ck = triton.compile(src, target=target, options=dict(num_warps=num_warps, **_COMPILE_OPTIONS))
        if backend == "cuda":
            regs, st, ld = _ptxas_figures(ck.asm["ptx"], int(arch))
            out[name] = dict(registers=regs, spill_stores=st, spill_loads=ld, cubin_bytes=len(ck.asm["cubin"]),
                             fma=ck.asm["ptx"].count("fma.rn.f32"))
        else:
            asm = ck.asm["amdgcn"]
            spills = sum(int(x) for x in re.findall(r"[sv]gpr_spill_count:\s*(\d+)", asm))
            vgprs = [int(x) for x in re.findall(r"\.vgpr_count:\s*(\d+)", asm)]
            out[name] = dict(vgprs=max(vgprs) if vgprs else None, spills=spills, hsaco_bytes=len(ck.asm["hsaco"]))
    return out


TARGETS = [f"cuda:{a}:32" for a in NVIDIA] + ["hip:gfx942:64"]


@pytest.fixture(scope="module")
def compiled():
    """{target: figures or "error: ..."} for every target, compiled in one subprocess (Triton imported once)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.abspath(__file__)] + TARGETS, capture_output=True, text=True,
                       timeout=900, env=env)
    if r.returncode != 0:
        pytest.fail(f"the compile subprocess failed: {r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _can_target(backend: str) -> str:
    """'' if this Triton has the backend's compiler, else why not."""
    try:
        from triton.backends import backends
    except Exception as e:  # noqa: BLE001
        return f"cannot list Triton's backends: {e}"
    return "" if ("nvidia" if backend == "cuda" else "amd") in backends else f"this Triton has no {backend} backend"


@pytest.mark.parametrize("arch", NVIDIA)
def test_nvidia_compiles_without_spills(compiled, arch):
    why = _can_target("cuda")
    if why:
        pytest.skip(why)
    figures = compiled[f"cuda:{arch}:32"]
    assert not isinstance(figures, str), f"sm_{arch}: {figures}"
    for name, f in figures.items():
        assert f["spill_stores"] == 0 and f["spill_loads"] == 0, (arch, name, f)
        assert f["fma"] == 0, (arch, name, "enable_fp_fusion=False must keep products and sums apart", f)
    print(f"sm_{arch}: {figures}")


def test_amd_instinct_compiles_without_spills(compiled):
    why = _can_target("hip")
    if why:
        pytest.skip(why)
    figures = compiled["hip:gfx942:64"]
    if isinstance(figures, str):
        pytest.skip(f"this Triton cannot compile gfx942 here (no ROCm): {figures[-300:]}")
    for name, f in figures.items():
        assert f["spills"] == 0, (name, f)
    print(f"gfx942: {figures}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    results = {}
    for spec in sys.argv[1:]:
        try:
            results[spec] = _worker(spec)
        except Exception as e:  # noqa: BLE001 - reported per target
            results[spec] = f"error: {type(e).__name__}: {e}"
    print(json.dumps(results))
