"""No silent fallback: why a backend is unusable names the real cause and the fix, backend="auto" warns once when it
settles below what the device could run; `python -m mgpo_kernels`; importing needs no numpy."""
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

import mgpo_kernels.backends as B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def registry(monkeypatch):
    """The registry's caches, restored afterwards (the tests below fake load failures)."""
    saved = dict(B._loaded), dict(B._import_errors), set(B._warned_fallback)
    yield B
    B._loaded.clear()
    B._loaded.update(saved[0])
    B._import_errors.clear()
    B._import_errors.update(saved[1])
    B._warned_fallback.clear()
    B._warned_fallback.update(saved[2])


def _forget(name):
    B._loaded.pop(name, None)
    B._import_errors.pop(name, None)


def test_not_built(registry, monkeypatch):
    _forget("cpp")
    monkeypatch.setattr(B, "extension_path", lambda: None)
    why = B.unavailable_reason("cpp", "cpu")
    assert "is not built" in why and "pip install --no-build-isolation" in why


def test_built_for_another_torch(registry, monkeypatch):
    _forget("cpp")
    monkeypatch.setattr(B, "extension_path", lambda: "/x/_C.so")
    monkeypatch.setattr(B, "_truncated", lambda path: None)
    monkeypatch.setattr(B, "build_info", lambda: types.SimpleNamespace(TORCH_VERSION="2.0.0+cu118"))
    why = B.unavailable_reason("cpp", "cpu")
    assert "built against torch 2.0.0+cu118" in why and torch.__version__ in why and "--force-reinstall" in why


def test_built_but_fails_to_load(registry, monkeypatch):
    _forget("cpp")
    monkeypatch.setattr(B, "extension_path", lambda: "/x/_C.so")
    monkeypatch.setattr(B, "_truncated", lambda path: None)
    monkeypatch.setattr(B, "build_info", lambda: None)
    real = B.importlib.import_module

    def broken(name, *a, **k):
        if name == "mgpo_kernels.backends.cpp":
            try:
                raise ImportError("/x/_C.so: file too short")
            except ImportError as e:
                raise ImportError("mgpo_kernels._C is not built: run pip install") from e
        return real(name, *a, **k)

    monkeypatch.setattr(B.importlib, "import_module", broken)
    why = B.unavailable_reason("cpp", "cpu")
    assert "is built (/x/_C.so) but failed to load" in why and "file too short" in why and "not built" not in why


def test_auto_warns_once_when_it_falls_back(registry, monkeypatch):
    _forget("cpp")
    monkeypatch.delenv("MGPO_NO_FALLBACK_WARNING", raising=False)
    monkeypatch.setattr(B, "extension_path", lambda: None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert type(B.resolve("auto", "cpu")).__name__ == "ReferenceBackend"
        B.resolve("auto", "cpu")
    msgs = [str(x.message) for x in w if issubclass(x.category, B.MGPOFallbackWarning)]
    assert len(msgs) == 1, msgs
    assert "'reference'" in msgs[0] and "'cpp' is not usable" in msgs[0] and "not built" in msgs[0]


def test_auto_is_quiet_when_nothing_better_exists(registry):
    if B.unavailable_reason("cpp", "cpu") is not None:
        pytest.skip("the extension is not usable here")
    with warnings.catch_warnings():
        warnings.simplefilter("error", B.MGPOFallbackWarning)
        assert type(B.resolve("auto", "cpu")).__name__ != "ReferenceBackend"


def test_import_needs_no_numpy():
    code = ("import sys; sys.modules['numpy'] = None; import mgpo_kernels; "
            "print(mgpo_kernels.backend_reasons('cpu')['triton'])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "numpy is not installed" in r.stdout


def test_diagnostic_command():
    r = subprocess.run([sys.executable, "-m", "mgpo_kernels"], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    for section in ("== versions", "== extension", "== backends", "== check"):
        assert section in out, out
    assert f"torch {torch.__version__}" in out
    assert "cpu: auto ->" in out
    if B.unavailable_reason("cpp", "cpu") is None:
        assert "built against torch" in out or "did not record" in out
        assert "cpu cpp" in out and "OK" in out


def test_import_warns_when_built_for_another_torch(registry, monkeypatch):
    monkeypatch.setattr(B, "extension_path", lambda: "/x/_C.so")
    monkeypatch.setattr(B, "_truncated", lambda path: None)
    monkeypatch.setattr(B, "build_info", lambda: types.SimpleNamespace(TORCH_VERSION="2.0.0+cu118"))
    monkeypatch.delitem(sys.modules, "mgpo_kernels._C", raising=False)
    with pytest.warns(B.MGPOFallbackWarning, match=r"cpp backend is disabled: .*built against torch 2\.0\.0\+cu118"):
        B._warn_if_built_for_another_torch()
    assert sys.modules["mgpo_kernels._C"] is None  # blocked: never loaded into this torch
    monkeypatch.delitem(sys.modules, "mgpo_kernels._C")
    monkeypatch.setattr(B, "build_info", lambda: types.SimpleNamespace(TORCH_VERSION=torch.__version__))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        B._warn_if_built_for_another_torch()


@pytest.mark.parametrize("archs,cap,ok", [
    ("8.0;9.0;10.0;12.0+PTX", (8, 6), True),    # sm_80 code runs on sm_86
    ("8.0;9.0;10.0;12.0+PTX", (12, 1), True),
    ("8.0;9.0;10.0;12.0+PTX", (13, 0), True),   # PTX
    ("8.0;9.0;10.0;12.0+PTX", (7, 5), False),
    ("8.0;9.0a", (9, 0), True),
    ("9.0a", (10, 0), False),
    ("8.6", (8, 0), False),
])
def test_arch_coverage(monkeypatch, archs, cap, ok):
    monkeypatch.setattr(B, "build_info", lambda: types.SimpleNamespace(CUDA_ARCH_LIST=archs))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    why = B._arch_problem(torch.device("cuda"))
    assert (why is None) == ok, why
    if not ok:
        assert f"sm_{cap[0]}{cap[1]}" in why and "TORCH_CUDA_ARCH_LIST" in why


def test_truncated_extension_is_not_loaded(tmp_path):
    so = B.extension_path()
    if so is None:
        pytest.skip("the extension is not built")
    cut = tmp_path / "_C.so"
    cut.write_bytes(open(so, "rb").read(4096))
    assert "is truncated" in B._truncated(str(cut))
    assert B._truncated(so) is None
