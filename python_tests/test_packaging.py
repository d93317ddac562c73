"""Packaging: the sdist holds every source a build needs (and no build output), builds without torch, and says
what the package is; setup.py's CUDA decision on fake toolkits (no compiler runs here)."""
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_module():
    spec = importlib.util.spec_from_file_location("mgpo_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ != "__main__": defines the functions, runs no setup()
    return mod


S = _setup_module()


# ---------------------------------------------------------------------------------------------- sdist
def _git_files():
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "csrc", "mgpo_kernels"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"git ls-files failed: {out.stderr}")
    return {f for f in out.stdout.splitlines() if os.path.exists(os.path.join(ROOT, f))}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """`setup.py sdist` with torch made unimportable: a source distribution must not need it."""
    tmp = tmp_path_factory.mktemp("sdist")
    code = ("import sys, runpy; sys.modules['torch'] = None; "
            f"sys.argv = ['setup.py', 'egg_info', '--egg-base', {str(tmp)!r}, 'sdist', '--dist-dir', {str(tmp)!r}]; "
            "runpy.run_path('setup.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (path,) = [p for p in tmp.iterdir() if p.name.endswith(".tar.gz")]
    with tarfile.open(path) as tf:
        names = tf.getnames()
        prefix = names[0].split("/")[0] + "/"
        pkg_info = tf.extractfile(prefix + "PKG-INFO").read().decode()
    return {n[len(prefix):] for n in names if n.startswith(prefix)}, pkg_info


def test_sdist_has_every_tracked_source(sdist):
    files, _ = sdist
    missing = sorted(_git_files() - files)
    assert not missing, f"missing from the sdist (MANIFEST.in): {missing}"
    for f in ("setup.py", "pyproject.toml", "LICENSE", "README.md", "MANIFEST.in", "mgpo_kernels/py.typed"):
        assert f in files, f
    assert any(f.startswith("csrc/cuda/") and f.endswith(".cu") for f in files)


def test_sdist_has_no_build_output(sdist):
    files, _ = sdist
    bad = [f for f in files if f.endswith((".so", ".pyc", ".o")) or f == "mgpo_kernels/_build_info.py"]
    assert not bad, bad


def test_sdist_metadata(sdist):
    _, info = sdist
    fields = {}
    for line in info.split("\n\n", 1)[0].splitlines():
        k, _, v = line.partition(": ")
        fields.setdefault(k, []).append(v)
    lic = fields.get("License-Expression", []) + fields.get("License", [])
    assert "BSD-3-Clause" in lic, fields.keys()
    assert fields["Summary"][0]
    assert fields["Author"][0]
    assert any(c.startswith("Programming Language :: Python :: 3") for c in fields["Classifier"])
    assert any(r.split(";")[0].strip() == "torch" for r in fields["Requires-Dist"]), fields["Requires-Dist"]
    assert fields["Description-Content-Type"] == ["text/markdown"]
    assert "mgpo_kernels" in info.split("\n\n", 1)[1]  # the README as long description


# ---------------------------------------------------------------------------------------------- CUDA decision
def _toolkit(root, version="13.0.88", cudart=True, nvcc=True):
    os.makedirs(os.path.join(root, "bin"), exist_ok=True)
    os.makedirs(os.path.join(root, "lib64"), exist_ok=True)
    if nvcc:
        open(os.path.join(root, "bin", "nvcc"), "w").close()
    if cudart:
        open(os.path.join(root, "lib64", "libcudart.so"), "w").close()
    if version:
        with open(os.path.join(root, "version.json"), "w") as f:
            f.write('{"cuda": {"name": "CUDA SDK", "version": "%s"}}' % version)
    return str(root)


def _no_which(_):
    return None


def test_decide_uses_a_complete_toolkit(tmp_path):
    home = _toolkit(tmp_path / "cuda")
    d = S.decide_cuda({"CUDA_HOME": home}, "2.14.1+cu130", "13.0", which=_no_which)
    assert d["build"] and d["home"] == home


def test_decide_rejects_a_wrapper_nvcc(tmp_path):
    # the case: an `nvcc` on PATH outside any toolkit; torch would guess CUDA_HOME from it
    wrapper = _toolkit(tmp_path / "usr", cudart=False, version=None)
    nvcc = os.path.join(wrapper, "bin", "nvcc")
    d = S.decide_cuda({}, "2.14.1+cu130", "13.0", which=lambda _: nvcc,
                      problem_of=lambda h, tc: S.toolkit_problem(h, tc) if h == wrapper else f"{h}: absent")
    assert not d["build"] and "libcudart" in d["reason"] and "wrapper" in d["reason"]
    # and the real toolkit is found beside it
    real = _toolkit(tmp_path / "real")
    d = S.decide_cuda({}, "2.14.1+cu130", "13.0", which=lambda _: nvcc,
                      problem_of=lambda h, tc: S.toolkit_problem(real if h == "/usr/local/cuda" else h, tc))
    assert d["build"] and d["home"] == "/usr/local/cuda"


def test_decide_major_version_must_match(tmp_path):
    home = _toolkit(tmp_path / "cuda", version="12.8.1")
    d = S.decide_cuda({"CUDA_HOME": home}, "2.14.1+cu130", "13.0", which=_no_which)
    assert not d["build"] and "CUDA 12.8" in d["reason"] and "13.0" in d["reason"]


def test_decide_cpu_torch_and_forced_modes(tmp_path):
    home = _toolkit(tmp_path / "cuda")
    d = S.decide_cuda({"CUDA_HOME": home}, "2.14.1+cpu", None, which=_no_which)
    assert not d["build"] and "CPU-only" in d["reason"]
    assert not S.decide_cuda({"CUDA_HOME": home, "MGPO_BUILD_CUDA": "0"}, "2.14.1", "13.0")["build"]
    assert S.decide_cuda({"CUDA_HOME": home, "MGPO_BUILD_CUDA": "1"}, "2.14.1", "13.0")["build"]
    with pytest.raises(SystemExit, match="MGPO_BUILD_CUDA=1 but .*no bin/nvcc"):
        S.decide_cuda({"CUDA_HOME": str(tmp_path / "none"), "MGPO_BUILD_CUDA": "1"}, "2.14.1", "13.0")
    with pytest.raises(SystemExit, match="CPU-only"):
        S.decide_cuda({"MGPO_BUILD_CUDA": "1"}, "2.14.1+cpu", None)
    with pytest.raises(SystemExit, match="must be 0, 1"):
        S.decide_cuda({"MGPO_BUILD_CUDA": "yes"}, "2.14.1", "13.0")


def test_arch_list_default_and_override():
    assert S.arch_list({}) == "8.0;9.0;10.0;12.0+PTX"
    assert S.arch_list({}, {"7.5", "8.0", "8.6", "9.0"}) == "8.0;9.0+PTX"  # an older toolkit: what it can compile
    assert S.arch_list({"TORCH_CUDA_ARCH_LIST": "9.0a"}, {"8.0"}) == "9.0a"
    assert S.describe_archs("8.0;9.0;10.0;12.0+PTX") == "sm_80, sm_90, sm_100, sm_120 + PTX compute_120"


def test_decision_line_is_one_line():
    cuda = {"build": True, "home": "/usr/local/cuda", "reason": "found"}
    line = S.decision_line(["base", "avx2"], cuda, "8.0;9.0+PTX", "13.0", "2.14.1+cu130")
    assert "\n" not in line and "sm_80, sm_90" in line and "CUDA 13.0 at /usr/local/cuda" in line
    line = S.decision_line(["base"], {"build": False, "home": None, "reason": "MGPO_BUILD_CUDA=0"}, torch_version="x")
    assert "no CUDA kernels: MGPO_BUILD_CUDA=0" in line
