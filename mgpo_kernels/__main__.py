"""``python -m mgpo_kernels``: what is installed, how the extension was built, which backends run here, and whether
they compute what the reference backend computes.

    python -m mgpo_kernels            # versions, build, backends per device, a few steps of each against reference
    python -m mgpo_kernels --no-check # without the steps

Exit status 1 when a usable backend disagrees with the reference beyond the tolerance; 0 otherwise (an unusable
backend is reported with its reason, not an error: run this to learn why "auto" picked what it picked).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import platform
import sys
import warnings
from typing import Dict, List, Optional

# Tolerance of the check: the fused backends agree with the reference to rounding (they use the same roundings;
# the sums' order differs), so anything near 1e-4 after a few steps of lr 1e-2 is a real disagreement.
TOL = 1e-4


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def section_versions(torch) -> List[str]:
    import mgpo_kernels
    from mgpo_kernels.bench.common import cpu_model  # the benchmarks' reading of the CPU model

    out = [f"mgpo_kernels {mgpo_kernels.__version__} ({os.path.dirname(mgpo_kernels.__file__)})",
           f"python {platform.python_version()} on {platform.platform()}",
           f"cpu: {cpu_model()}, {os.cpu_count()} logical cores",
           f"torch {torch.__version__} (CUDA {torch.version.cuda}, HIP {getattr(torch.version, 'hip', None)})",
           f"triton {_version('triton')}, numpy {_version('numpy')}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        out.append("cuda: not available in this process")
    return out


def section_build(torch) -> List[str]:
    from mgpo_kernels import backends as B

    path = B.extension_path()
    if path is None:
        return ["mgpo_kernels._C: not built"]
    out = [f"mgpo_kernels._C: {path}"]
    info = B.build_info()
    if info is None:
        out.append("  built by a setup.py that did not record how (no mgpo_kernels/_build_info.py)")
    else:
        out.append(f"  built against torch {info.TORCH_VERSION} (CUDA {info.TORCH_CUDA})"
                   + ("" if info.TORCH_VERSION == torch.__version__ else f"  <-- this is torch {torch.__version__}"))
        out.append(f"  CPU kernels: {', '.join(info.CPU_ISAS)}")
        if info.CUDA_BUILT:
            out.append(f"  CUDA kernels: TORCH_CUDA_ARCH_LIST={info.CUDA_ARCH_LIST}, CUDA {info.CUDA_VERSION} at "
                       f"{info.CUDA_HOME}")
        else:
            out.append("  CUDA kernels: not built")
        out.append(f"  the build said: {info.DECISION}")
    problem = B.extension_problem()
    if problem is not None:
        out.append(f"  not loaded: {problem}")
        return out
    try:
        from mgpo_kernels import _C
    except Exception as e:  # noqa: BLE001 - reported, that is the point
        cause = e.__cause__ or e
        out.append(f"  fails to load: {type(cause).__name__}: {cause}")
        return out
    out.append(f"  loaded: cuda_built={_C.cuda_built}, CPU instruction set in use {_C.cpu_isa()} "
               f"(this CPU can run {', '.join(_C.available_cpu_isas())}; MGPO_CPU_ISA picks one)")
    return out


def _devices(torch) -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def section_backends(torch) -> List[str]:
    from mgpo_kernels import backends as B

    out = []
    for dev in _devices(torch):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            auto = type(B.resolve("auto", dev)).__name__
        out.append(f"{dev}: auto -> {auto}")
        for name, why in B.backend_reasons(dev).items():
            out.append(f"  {name:<10} {'usable' if why is None else 'not usable: ' + why}")
        for w in caught:
            out.append(f"  warning: {w.message}")
    return out


def _problem(torch, device: str, seed: int = 0):
    """A few LoRA-like tensors in fp32 and bf16 (with an fp32 master), two groups, and their gradients per step."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 16), (16, 96), (33,), (7, 5)]
    params = [torch.randn(s, generator=g).to(device) for s in shapes]
    params.append(torch.randn(40, 8, generator=g).to(device=device, dtype=torch.bfloat16))
    grads = [[torch.randn(p.shape, generator=g).to(device=device, dtype=p.dtype) for p in params] for _ in range(5)]
    return params, grads


def run_steps(torch, backend: str, device: str, steps: int = 5):
    from mgpo_kernels import MGPO

    params, grads = _problem(torch, device)
    params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = MGPO([{"params": params[:3]}, {"params": params[3:], "lr": 3e-3, "weight_decay": 0.0}], lr=1e-2,
               backend=backend, max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no model here: "no training forward applied the perturbation", etc.
        for t in range(steps):
            for p, gr in zip(params, grads[t % len(grads)]):
                p.grad = gr.clone()
            opt.step()
        opt.eval()  # theta, without the perturbation
    return [p.detach().float().cpu() for p in params]


def section_check(torch) -> (List[str], bool):
    from mgpo_kernels import available_backends

    out, ok = [], True
    for dev in _devices(torch):
        ref = run_steps(torch, "reference", dev)
        for name in available_backends(dev):
            if name == "reference":
                continue
            try:
                got = run_steps(torch, name, dev)
            except Exception as e:  # noqa: BLE001
                out.append(f"{dev} {name:<8} FAILED: {type(e).__name__}: {e}")
                ok = False
                continue
            worst = max(float((a - b).abs().max()) for a, b in zip(got, ref))
            good = worst <= TOL
            ok &= good
            out.append(f"{dev} {name:<8} 5 steps vs reference: worst |difference| {worst:.3g} "
                       f"{'OK' if good else f'> {TOL:g}: DISAGREES'}")
        if len(out) == 0 or not any(line.startswith(dev) for line in out):
            out.append(f"{dev}: no backend but the reference is usable")
    return out, ok


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mgpo_kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-check", action="store_true", help="do not run the backends against the reference")
    args = ap.parse_args(argv)
    import torch

    sections: Dict[str, List[str]] = {}
    sections["versions"] = section_versions(torch)
    sections["extension"] = section_build(torch)
    sections["backends"] = section_backends(torch)
    ok = True
    if not args.no_check:
        sections["check"], ok = section_check(torch)
    for title, lines in sections.items():
        print(f"== {title}")
        print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
