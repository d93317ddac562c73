"""Build of mgpo_kernels and its extension mgpo_kernels._C (torch.ops.mgpo.*).

    pip install --no-build-isolation .               # the optimizer (torch must be installed first)
    pip install --no-build-isolation -e ".[bench]"   # editable, and what mgpo-bench imports (transformers, peft, ...)
    python -m build --sdist                          # needs no torch

The extension is compiled against the torch of the build environment (hence --no-build-isolation), and the wheel
requires that torch release (torch==X.Y.Z) and records its exact version in mgpo_kernels/_build_info.py.
CPU kernels are always built (x86-64: base, AVX2 and AVX-512 variants, chosen at run time). CUDA kernels are built
when a usable toolkit is found: a CUDA_HOME (or CUDA_PATH; else the toolkit of the nvcc on PATH, else
/usr/local/cuda) with bin/nvcc and the runtime library (lib64/libcudart.so), of the CUDA major version torch was
built with. The build prints one line with its decision and the reason.
Environment:
    MGPO_BUILD_CUDA=0/1     force the CUDA kernels off/on (1 fails at once, saying why, when they cannot be built)
    CUDA_HOME               the CUDA toolkit to use (default: found as above)
    TORCH_CUDA_ARCH_LIST    default "8.0;9.0;10.0;12.0+PTX": Ampere (sm_80 code also runs on sm_86/sm_89),
                            Hopper, Blackwell (B200/GB200, RTX 50), PTX for newer GPUs; like torch's own wheels
    MGPO_PTXAS_VERBOSE=1    print register/spill counts of the CUDA kernels (nvcc -Xptxas -v)
    MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.2.0"
DEFAULT_ARCH_LIST = "8.0;9.0;10.0;12.0+PTX"
BUILD_INFO = os.path.join("mgpo_kernels", "_build_info.py")


# ---------------------------------------------------------------------------------------------- decision
# Pure functions of (environment, torch's CUDA version, what is on disk): python_tests/test_packaging.py calls them.

def cpu_isas(machine=None):
    """The instruction-set variants of the CPU kernels compiled on this machine (csrc/cpu/isa_*.cpp)."""
    machine = (machine or platform.machine()).lower()
    return ["base", "avx2", "avx512"] if machine in ("x86_64", "amd64", "x64") else ["base"]


def _lib_dir(home):
    # torch.utils.cpp_extension links with -L<CUDA_HOME>/lib64 (or lib when lib64 does not exist) -lcudart
    lib64 = os.path.join(home, "lib64")
    return lib64 if os.path.isdir(lib64) else os.path.join(home, "lib")


def toolkit_version(home, run=subprocess.run):
    """'13.0' from <home>/version.json, else from `<home>/bin/nvcc --version`; None if neither says."""
    try:
        with open(os.path.join(home, "version.json")) as f:
            v = json.load(f)["cuda"]["version"]
        return ".".join(v.split(".")[:2])
    except (OSError, KeyError, ValueError, TypeError):
        pass
    try:
        out = run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out or "")
    return m.group(1) if m else None


def toolkit_problem(home, torch_cuda, version_of=toolkit_version):
    """None if ``home`` is a CUDA toolkit torch (built with CUDA ``torch_cuda``) can build with, else why not."""
    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return f"{home}: no bin/nvcc"
    lib = _lib_dir(home)
    if not any(os.path.exists(os.path.join(lib, n)) for n in ("libcudart.so", "libcudart.a")):
        return f"{home}: bin/nvcc but no CUDA runtime library ({lib}/libcudart.so): not a toolkit (a wrapper?)"
    version = version_of(home)
    if version is None:
        return f"{home}: cannot tell the CUDA version (no version.json, `nvcc --version` failed)"
    if version.split(".")[0] != torch_cuda.split(".")[0]:
        return f"{home}: CUDA {version}, but torch was built with CUDA {torch_cuda} (the major versions must match)"
    return None


def toolkit_candidates(env, which=shutil.which):
    """(path, where it came from): an explicit CUDA_HOME/CUDA_PATH only, else the nvcc on PATH and /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return [(env[var], var)]
    out = []
    nvcc = which("nvcc")
    if nvcc:
        out.append((os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"nvcc on PATH ({nvcc})"))
    out.append(("/usr/local/cuda", "the default location"))
    return out


def decide_cuda(env, torch_version, torch_cuda, which=shutil.which, problem_of=toolkit_problem):
    """{"build": bool, "home": str|None, "reason": str}: whether to build the CUDA kernels, with which toolkit, why.

    Raises SystemExit with the reason when MGPO_BUILD_CUDA=1 and they cannot be built."""
    want = env.get("MGPO_BUILD_CUDA", "").strip()
    if want not in ("", "0", "1"):
        raise SystemExit(f"mgpo_kernels: MGPO_BUILD_CUDA must be 0, 1 or unset, not {want!r}")
    if want == "0":
        return {"build": False, "home": None, "reason": "MGPO_BUILD_CUDA=0"}
    home, why = None, None
    if torch_cuda is None:
        why = f"torch {torch_version} is a CPU-only build (torch.version.cuda is None)"
    else:
        problems = []
        for path, origin in toolkit_candidates(env, which):
            p = problem_of(path, torch_cuda)
            if p is None:
                home = path
                break
            problems.append(f"{p} [{origin}]")
        if home is None:
            why = "no usable CUDA toolkit: " + "; ".join(problems) + " (set CUDA_HOME to a CUDA toolkit's directory)"
    if home is None:
        if want == "1":
            raise SystemExit(f"mgpo_kernels: MGPO_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why}")
        return {"build": False, "home": None, "reason": why}
    return {"build": True, "home": home, "reason": "MGPO_BUILD_CUDA=1" if want == "1" else "found"}


def arch_list(env, supported=None):
    """TORCH_CUDA_ARCH_LIST if set, else DEFAULT_ARCH_LIST less what the toolkit cannot compile (``supported``:
    the compute capabilities `nvcc --list-gpu-arch` names, e.g. {"8.0", "9.0"}; None: no filter)."""
    if env.get("TORCH_CUDA_ARCH_LIST"):
        return env["TORCH_CUDA_ARCH_LIST"]
    if supported is None:
        return DEFAULT_ARCH_LIST
    keep = [a for a in DEFAULT_ARCH_LIST.split(";") if a.replace("+PTX", "") in supported]
    if keep and not keep[-1].endswith("+PTX"):
        keep[-1] += "+PTX"
    return ";".join(keep)


def _nvcc_archs(home):
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = {f"{m[:-1]}.{m[-1]}" for m in re.findall(r"compute_(\d+)", out or "")}
    return found or None


def describe_archs(archs):
    """'sm_80, sm_90, sm_100, sm_120 + PTX compute_120' for '8.0;9.0;10.0;12.0+PTX'."""
    sm, ptx = [], []
    for a in re.split(r"[;\s]+", archs.strip()):
        if not a:
            continue
        n = a.replace("+PTX", "").replace(".", "")
        sm.append(f"sm_{n}")
        if a.endswith("+PTX"):
            ptx.append(f"compute_{n}")
    return ", ".join(sm) + (" + PTX " + ", ".join(ptx) if ptx else "")


def decision_line(isas, cuda, archs=None, cuda_version=None, torch_version=""):
    cpu = f"CPU kernels ({', '.join(isas)}; chosen at run time)"
    if cuda["build"]:
        gpu = (f"CUDA kernels for {describe_archs(archs)} (CUDA {cuda_version} at {cuda['home']}"
               f"{', MGPO_BUILD_CUDA=1' if cuda['reason'] == 'MGPO_BUILD_CUDA=1' else ''})")
        return f"mgpo_kernels: building {cpu} and {gpu} against torch {torch_version}"
    return f"mgpo_kernels: building {cpu} against torch {torch_version}; no CUDA kernels: {cuda['reason']}"


# ---------------------------------------------------------------------------------------------- the build
def _sources(with_cuda):
    csrc = os.path.join(ROOT, "csrc")
    s = sorted(glob.glob(os.path.join(csrc, "*.cpp"))) + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    if with_cuda:
        s += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    return [os.path.relpath(p, ROOT) for p in s]


def _configure():
    """Import torch, decide, print the decision line; the extension and the build_ext class to build it."""
    try:
        import torch
    except ImportError as e:
        raise SystemExit(
            "mgpo_kernels: building the extension needs torch in the build environment: install torch, then "
            "pip install --no-build-isolation .   (the extension is compiled against that torch)"
        ) from e
    cuda = decide_cuda(os.environ, torch.__version__, torch.version.cuda)
    if cuda["build"]:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import, and would otherwise guess it from the nvcc on
        # PATH (a wrapper outside the toolkit fails only at the link, minutes later).
        os.environ["CUDA_HOME"] = cuda["home"]
    import torch.utils.cpp_extension as cpp_ext

    if cuda["build"]:
        cpp_ext.CUDA_HOME = cuda["home"]
    archs, cuda_version = None, None
    isas = cpu_isas()
    # No FMA contraction of the element math: the same roundings as the reference backend's torch ops, so that
    # CPU, CUDA and reference agree to the last bit wherever their scalar coefficients do.
    # -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` is compiled here (without
    # it the CPU passes silently run on one thread); libgomp resolves to the copy torch has already loaded.
    cxx = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "--fmad=false"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    sources = _sources(cuda["build"])
    if cuda["build"]:
        cuda_version = toolkit_version(cuda["home"])
        archs = arch_list(os.environ, _nvcc_archs(cuda["home"]))
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch reads it when compiling the .cu files
        define_macros.append(("MGPO_WITH_CUDA", None))
        # Some torch headers include cusparse.h etc., which the pip CUDA 13 wheels keep in site-packages.
        wheel_inc = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
        if os.path.isdir(wheel_inc):
            include_dirs.append(wheel_inc)
        if os.environ.get("MGPO_PTXAS_VERBOSE") == "1":
            nvcc += ["-Xptxas", "-v"]
        ext = cpp_ext.CUDAExtension(
            "mgpo_kernels._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_ext.CppExtension(
            "mgpo_kernels._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    line = decision_line(isas, cuda, archs, cuda_version, torch.__version__)
    print(line, file=sys.stderr, flush=True)
    info = {
        "VERSION": VERSION, "TORCH_VERSION": torch.__version__, "TORCH_CUDA": torch.version.cuda,
        "CPU_ISAS": tuple(isas), "CUDA_BUILT": bool(cuda["build"]), "CUDA_HOME": cuda["home"],
        "CUDA_VERSION": cuda_version, "CUDA_ARCH_LIST": archs, "DECISION": line,
        "PYTHON": platform.python_version(), "MACHINE": platform.machine(),
    }

    class BuildExt(cpp_ext.BuildExtension):
        def run(self):
            super().run()
            # The build's record, beside the extension (a wheel's, an in-place or editable build's):
            # `python -m mgpo_kernels` shows it, and importing under another torch says so.
            text = ("# Generated by setup.py when mgpo_kernels._C was built (not in git): how it was built.\n"
                    + "".join(f"{k} = {v!r}\n" for k, v in info.items()))
            dirs = {os.path.dirname(self.get_ext_fullpath("mgpo_kernels._C"))}
            if self.inplace or getattr(self, "editable_mode", False):
                dirs.add(os.path.join(ROOT, "mgpo_kernels"))
            for d in dirs:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, "_build_info.py"), "w") as f:
                    f.write(text)

    return ext, BuildExt.with_options(use_ninja=True)


_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "install", "develop", "editable_wheel", "bdist_egg"}


class LazyBuildExt(_setuptools_build_ext):
    """build_ext, resolved when setuptools first asks for it: torch's BuildExtension (importing torch, deciding,
    printing the decision) for a build, plain setuptools' for sdist/egg_info, which need only the file list.
    (A subclass of setuptools' build_ext for distutils' checks; __new__ returns the instance to use.)"""

    def __new__(cls, dist, *args, **kwargs):
        if not _BUILD_COMMANDS & set(dist.commands or []):
            return _setuptools_build_ext(dist, *args, **kwargs)
        ext, klass = _configure()
        dist.ext_modules[:] = [ext]
        return klass(dist, *args, **kwargs)


def _torch_requirement():
    """torch==<the build's torch release> in a wheel (the extension's ABI is that torch's); plain torch in the
    sdist, whose build then pins it."""
    if "sdist" in sys.argv or "egg_info" in sys.argv and "bdist_wheel" not in sys.argv:
        return "torch"
    try:
        import importlib.metadata as md

        v = md.version("torch")
    except Exception:
        return "torch"
    m = re.match(r"(\d+(?:\.\d+)*)", v)
    return f"torch=={m.group(1)}" if m else "torch"


#: What ``mgpo-bench`` imports beyond torch: the models of ``table3`` and of the stability study in experiments/
#: (transformers, peft, tokenizers), the charts (matplotlib, numpy), the progress bars (tqdm).
#: mgpo_kernels.bench.common names, per subcommand, those it refuses to start without.
BENCH_REQUIRES = ["transformers", "peft", "tokenizers", "matplotlib", "numpy", "tqdm"]

if __name__ == "__main__":
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        long_description = f.read()
    setup(
        name="mgpo_kernels",
        version=VERSION,
        description="Fused CPU, CUDA and Triton kernels for LoRA-MGPO (AdamW + momentum-guided perturbation) "
                    "as a torch optimizer",
        long_description=long_description,
        long_description_content_type="text/markdown",
        author="the mgpo_kernels authors",
        license="BSD-3-Clause",
        license_files=["LICENSE"],
        # No project home page is published yet; the source checkout is the documentation.
        keywords=["pytorch", "optimizer", "lora", "sam", "adamw", "cuda", "triton"],
        classifiers=[
            "Development Status :: 3 - Alpha",
            "Intended Audience :: Science/Research",
            "Intended Audience :: Developers",
            "Operating System :: POSIX :: Linux",
            "Programming Language :: C++",
            "Programming Language :: Python :: 3",
            "Programming Language :: Python :: 3 :: Only",
            "Environment :: GPU :: NVIDIA CUDA",
            "Topic :: Scientific/Engineering :: Artificial Intelligence",
            "Typing :: Typed",
        ],
        packages=find_packages(include=["mgpo_kernels", "mgpo_kernels.*"]),
        package_data={"mgpo_kernels": ["py.typed"]},
        python_requires=">=3.9",
        install_requires=[_torch_requirement()],
        extras_require={"bench": BENCH_REQUIRES},
        # A placeholder until LazyBuildExt configures the real one (torch is imported only to build).
        ext_modules=[Extension("mgpo_kernels._C", _sources(with_cuda=True))],
        cmdclass={"build_ext": LazyBuildExt},
        entry_points={"console_scripts": ["mgpo-bench = mgpo_kernels.bench:main"]},
        zip_safe=False,
    )
