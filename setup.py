"""Build of mgpo_kernels and its extension mgpo_kernels._C (torch.ops.mgpo.*).

    pip install --no-build-isolation -e .            # the optimizer
    pip install --no-build-isolation -e ".[bench]"   # and what mgpo-bench imports (transformers, peft, ...)

CPU kernels are always built; CUDA kernels too when nvcc and a CUDA build of torch are present.
Environment:
    MGPO_BUILD_CUDA=0/1     force the CUDA kernels off/on (default: auto)
    TORCH_CUDA_ARCH_LIST    default "8.0;9.0+PTX" (Ampere, Hopper; PTX for newer GPUs) when no GPU is visible
    MGPO_PTXAS_VERBOSE=1    print register/spill counts of the CUDA kernels (nvcc -Xptxas -v)
    MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(
            "building mgpo_kernels needs torch in the build environment: "
            "pip install --no-build-isolation -e .  (after installing torch)"
        ) from e
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    want = os.environ.get("MGPO_BUILD_CUDA", "").strip()
    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None and (
        os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    if want in ("0", "1"):
        with_cuda = want == "1"
        if with_cuda and not cuda_possible:
            raise RuntimeError(
                "MGPO_BUILD_CUDA=1 but nvcc or a CUDA build of torch is missing "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
            )
    else:
        with_cuda = cuda_possible

    csrc = os.path.join(ROOT, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp"))) + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    sources = [os.path.relpath(s, ROOT) for s in sources]
    # No FMA contraction of the element math: the same roundings as the reference backend's torch ops, so that
    # CPU, CUDA and reference agree to the last bit wherever their scalar coefficients do.
    # -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` is compiled here (without
    # it the CPU passes silently run on one thread); libgomp resolves to the copy torch has already loaded.
    cxx = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "--fmad=false"]
    define_macros = []
    include_dirs = [csrc]

    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            visible = False
            try:
                visible = torch.cuda.is_available()
            except Exception:
                pass
            if not visible:
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources += [os.path.relpath(s, ROOT) for s in sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))]
        define_macros.append(("MGPO_WITH_CUDA", None))
        # Some torch headers include cusparse.h etc., which the pip CUDA 13 wheels keep in site-packages.
        wheel_inc = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
        if os.path.isdir(wheel_inc):
            include_dirs.append(wheel_inc)
        if os.environ.get("MGPO_PTXAS_VERBOSE") == "1":
            nvcc += ["-Xptxas", "-v"]
        ext = CUDAExtension(
            "mgpo_kernels._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "mgpo_kernels._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


#: What ``mgpo-bench`` imports beyond torch: the models of ``table3`` and ``stability`` (transformers, peft,
#: tokenizers), the charts (matplotlib, numpy), the progress bars (tqdm).  mgpo_kernels.bench.common names, per
#: subcommand, those it refuses to start without.
BENCH_REQUIRES = ["transformers", "peft", "tokenizers", "matplotlib", "numpy", "tqdm"]

ext_modules, cmdclass = _ext_modules()

setup(
    name="mgpo_kernels",
    version="0.1.0",
    description="Fused kernels for LoRA-MGPO (AdamW + momentum-guided perturbation) as a torch optimizer",
    packages=find_packages(include=["mgpo_kernels", "mgpo_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch"],
    extras_require={"bench": BENCH_REQUIRES},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["mgpo-bench = mgpo_kernels.bench:main"]},
    zip_safe=False,
)
