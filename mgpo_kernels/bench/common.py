"""What every benchmark's record shares: the packages it needs, the device, the machine and versions it ran on
(the CPU model and the commit included, also as the one header line of the scripts in benchmarks/), the run's
common JSON fields, its result files and their markdown heading and tables."""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch

# ----------------------------------------------------------------------------------------------- packages

#: What each subcommand cannot run without beyond torch, from setup.py's ``extras_require["bench"]`` (tqdm is not
#: here: without it there are only no progress bars); the charts need matplotlib.  "stability" is the experiment
#: outside the package (``python -m experiments.stability``), which uses the same check.
NEEDS = {"step": (), "table3": ("transformers", "peft"), "stability": ("transformers", "tokenizers")}
CHART_NEEDS = ("matplotlib",)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_packages(cmd: str, chart: bool, models: bool = True) -> None:
    """Refuse to start ``mgpo-bench <cmd>`` (or the stability experiment) when a package it imports later is
    missing: before any measurement (a chart's import failing after a run of minutes, or every row of table3 failing
    in its own process, says less).  ``models=False`` where the command trains nothing (``--report-only``)."""
    need = (list(NEEDS.get(cmd, ())) if models else []) + (list(CHART_NEEDS) if chart else [])
    missing = [m for m in need if not _installed(m)]
    if missing:
        raise SystemExit(
            f"{'python -m experiments.stability' if cmd == 'stability' else 'mgpo-bench ' + cmd} needs "
            f"{', '.join(missing)}, not installed in this environment: in the checkout, "
            f"pip install --no-build-isolation -e '.[bench]' (or pip install {' '.join(missing)})"
            + ("; --no-chart runs without matplotlib" if set(missing) <= set(CHART_NEEDS) else ""))


# ----------------------------------------------------------------------------------------------- device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here")
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_slug(device: torch.device) -> str:
    """Short name for file names: 'cpu', 'nvidia-h200', ..."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or device.type


# ----------------------------------------------------------------------------------------------- machine info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) * 1024
    except Exception:
        pass
    return None


def _git(*args: str) -> Optional[str]:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def _version(mod: str) -> Optional[str]:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception:
        return None


def load_average() -> Optional[List[float]]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def git_commit_line(watched: str = "csrc") -> str:
    """The short commit, and whether ``watched`` (the kernels' sources) differs from it: a timing of the built
    extension is that commit's only if nothing under csrc/ was changed."""
    rev = _git("rev-parse", "--short", "HEAD")
    if rev is None:
        return "?"
    dirty = _git("status", "--porcelain", "--", watched)
    return rev + (f" + uncommitted {watched} changes" if dirty else "")


def machine_line() -> str:
    """The header line of the scripts in benchmarks/: CPU model, commit and load (figures of a shared machine
    mean little without the load they were taken at)."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"# CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); git {git_commit_line()}; load average {load}"


def machine_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mem_total_gib": round((_mem_total() or 0) / 2**30, 1),
        "loadavg_at_start": load_average(),
        "device": str(device),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_mem_gib=round(p.total_memory / 2**30, 1),
            gpu_sms=p.multi_processor_count,
            capability=f"{p.major}.{p.minor}",
            cuda_runtime=torch.version.cuda,
        )
    return info


def versions() -> Dict[str, Any]:
    import mgpo_kernels
    from mgpo_kernels import backend_reasons

    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mgpo_kernels": mgpo_kernels.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    for mod in ("triton", "transformers", "peft", "numpy"):
        v[mod] = _version(mod)
    v["backends"] = {}
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        v["backends"][dev] = backend_reasons(dev)
    return v


# ----------------------------------------------------------------------------------------------- results


def repo_root() -> Optional[Path]:
    """The source checkout this package lives in, if it is one (a fresh clone, an editable install)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "setup.py").exists() or (root / ".git").exists():
        return root
    return None


#: Where results go without --out: a folder of the current directory, never the committed benchmarks/results/
#: (committing a run's results there is a deliberate step: copy the files).
DEFAULT_OUT = "mgpo-bench-results"


def results_dir(out_dir: Optional[str]) -> Path:
    """--out (--out-dir), else ./mgpo-bench-results."""
    p = Path(out_dir) if out_dir else Path.cwd() / DEFAULT_OUT
    p.mkdir(parents=True, exist_ok=True)
    return p


def command_line() -> str:
    argv0 = Path(sys.argv[0]).name if sys.argv else "mgpo-bench"
    if argv0 in ("__main__.py", "-m", "-c", ""):
        argv0 = "python -m mgpo_kernels.bench"
    return " ".join([argv0] + [shlex.quote(a) for a in sys.argv[1:]])


def result_stem(device: torch.device, name: str) -> str:
    return f"{_dt.date.today().isoformat()}-{device_slug(device)}-{name}"


def write_results(out: Path, stem: str, payload: Dict[str, Any], markdown: str) -> Dict[str, Path]:
    jp, mp = out / f"{stem}.json", out / f"{stem}.md"
    jp.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    mp.write_text(markdown)
    return {"json": jp, "md": mp}


def _json_default(o):
    if isinstance(o, (torch.device, torch.dtype, Path)):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def md_table(headers: List[str], rows: Iterable[List[Any]], align: Optional[str] = None) -> str:
    """A GitHub markdown table; ``align`` is a string of 'l'/'r' per column (default: first left, rest right)."""
    rows = [[("—" if c is None else str(c)) for c in r] for r in rows]
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = [(":---" if a == "l" else "---:") for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run_record(kind: str, device: torch.device, backends: List[str], usable: List[str],
               unusable: Dict[str, str]) -> Dict[str, Any]:
    """The fields every ``mgpo-bench`` result's JSON starts with (``header_md`` reads them)."""
    return {
        "kind": kind, "date": now_iso(), "command": command_line(), "device": str(device),
        "machine": machine_info(device), "versions": versions(), "backends": backends,
        "unusable_backends": unusable, "skipped_backends": [b for b in usable if b not in backends],
    }


def report_heading(title: str, payload: Dict[str, Any]) -> str:
    """``header_md``, and a line saying the results are partial when the run was interrupted."""
    md = header_md(title, payload)
    if payload.get("interrupted"):
        md += f"**Partial results: {payload['interrupted']}.**\n\n"
    return md


def header_md(title: str, payload: Dict[str, Any]) -> str:
    m, v = payload["machine"], payload["versions"]
    dev = m.get("gpu") or f"CPU ({m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads)"
    lines = [
        f"# {title}",
        "",
        f"- date: {payload['date']}",
        f"- command: `{payload['command']}`",
        f"- device: {dev}; host {m['host']}; load average at start {m.get('loadavg_at_start')}"
        + (f", at end {payload.get('loadavg_at_end')}" if payload.get("loadavg_at_end") else ""),
        f"- versions: python {v['python']}, torch {v['torch']}, triton {v['triton']}, transformers "
        f"{v['transformers']}, peft {v['peft']}, mgpo_kernels {v['mgpo_kernels']} "
        f"(git {v['git_commit']}{', dirty tree' if v['git_dirty'] else ''})",
        f"- MGPO backends benchmarked on {payload['device']}: {', '.join(payload['backends']) or 'none'}"
        + (f"; usable but not benchmarked: {', '.join(payload['skipped_backends'])} (Triton's interpreter on a CPU)"
           if payload.get("skipped_backends") else "")
        + (
            "; not usable: "
            + "; ".join(f"{k} ({r})" for k, r in payload.get("unusable_backends", {}).items())
            if payload.get("unusable_backends")
            else ""
        ),
        "",
        "",
    ]
    return "\n".join(lines)


def fmt(x: Optional[float], nd: int = 2) -> Optional[str]:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return f"{x:.{nd}f}"


def fmt_bytes(n: Optional[float], unit: str = "auto") -> Optional[str]:
    if n is None:
        return None
    if unit == "auto":
        unit = "GiB" if n >= 2**30 else "MiB"
    div = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10}[unit]
    return f"{n / div:.2f} {unit}"


def tqdm(*a, **k):
    """tqdm when installed (in ``.[bench]``), else a plain iterator."""
    try:
        from tqdm.auto import tqdm as _t
    except Exception:  # pragma: no cover
        it = a[0] if a else k.get("iterable")

        class _Null:
            def __init__(self, it):
                self.it = it

            def __iter__(self):
                return iter(self.it)

            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *e):
                return False

        return _Null(it if it is not None else [])
    k.setdefault("file", sys.stderr)
    k.setdefault("dynamic_ncols", True)
    k.setdefault("leave", False)
    return _t(*a, **k)


def now_iso() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def publish(out_dir, device, name, payload, md, chart_fn=None):
    """Write the run's JSON and markdown (and, with ``chart_fn``, its PNG) under the results folder, print the
    table, and return the payload with the file paths."""
    out = results_dir(out_dir)
    stem = result_stem(device, name)
    files = write_results(out, stem, payload, md)
    if chart_fn is not None:
        files["png"] = out / f"{stem}.png"
        chart_fn(payload, files["png"])
        md += f"\n![chart]({stem}.png)\n"
        files["md"].write_text(md)
    print(md)
    print("wrote " + ", ".join(str(p) for p in files.values()))
    payload["files"] = {k: str(v) for k, v in files.items()}
    return payload
