"""The stability study: does MGPO make LoRA fine-tuning more stable?  The paper's Figures 2-4 and Table 4 at a
scale a CPU can run.  A research experiment, not a library feature: run it from the repository root,

    python -m experiments.stability [--preset quick|default|cuda|...] [--device cpu|cuda] ...

A small LlamaForCausalLM is pre-trained here on Python's own docs and source (cached), then LoRA-fine-tuned on
generated arithmetic word problems over a sweep of ranks r = α and learning rates, with LoRA (AdamW), LoRA-MGPO
(ρ = 0.05, β = 0.9), MGPO without adaptive normalisation, isotropic random noise of MGPO's ‖ε‖, and MGPO along
−momentum, each over several seeds.  Writes ``<out>/<date>-<device>-stability-<preset>.{json,md,png}`` (``--out``, default ``./mgpo-bench-results``).
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from typing import Any, Dict

import torch

from mgpo_kernels.bench import common as C

from ._cli import command_line

_BASE_SMALL = dict(hidden=64, intermediate=172, layers=2, heads=4, vocab=1024, seq=128, corpus_bytes=2_000_000,
                   pretrain_steps=300, pretrain_batch=16, pretrain_lr=3e-3)
_TASK = dict(n_train=4000, n_eval=256, batch=16, warmup_frac=0.05, weight_decay=0.0, ranks=[8, 32, 128],
             methods=["lora", "mgpo", "mgpo-noapn", "noise", "mgpo-neg"], n_seeds=3)

PRESETS: Dict[str, Dict[str, Any]] = {
    # a first look: under 10 minutes on a 2-core CPU (pre-training included)
    "quick": {**_BASE_SMALL, **_TASK, "steps": 80, "lrs": [2e-3, 1.6e-2], "smooth": 8},
    # under an hour on an otherwise idle 2-core CPU (an estimate from its per-step times; see the README)
    "default": {**_BASE_SMALL, **_TASK, "hidden": 128, "intermediate": 344, "layers": 4, "vocab": 2048,
                "pretrain_steps": 600,
                "steps": 160, "lrs": [1e-3, 4e-3, 1.6e-2], "smooth": 16},
    # an H200 (not run yet: sized by estimate to ~10 minutes): a 23M-parameter base, all of the stdlib text
    # (5 MB), longer runs, 4 lrs
    "cuda": {**_BASE_SMALL, **_TASK, "hidden": 512, "intermediate": 1376, "layers": 6, "heads": 8, "vocab": 8192,
             "seq": 256, "corpus_bytes": 12_000_000, "pretrain_steps": 2000, "pretrain_batch": 64,
             "pretrain_lr": 1e-3, "n_train": 20000, "n_eval": 1024, "batch": 32, "steps": 300,
             "lrs": [2e-4, 1e-3, 4e-3, 1.6e-2], "smooth": 30},
    # the dose-response study on a task LoRA learns (experiments/stability/dose.py): dose, dose-cuda, dose-tiny
    # for the tests: seconds
    "tiny": {**_BASE_SMALL, **_TASK, "hidden": 32, "intermediate": 64, "heads": 2, "vocab": 300,
             "corpus_bytes": 200_000, "pretrain_steps": 2, "pretrain_batch": 2, "seq": 32, "n_train": 64,
             "n_eval": 8, "batch": 4, "steps": 2, "ranks": [4], "lrs": [1e-3], "n_seeds": 1, "smooth": 2},
}
from .dose import PRESETS as _DOSE_PRESETS  # noqa: E402

PRESETS.update(_DOSE_PRESETS)


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="quick (<10 min on a CPU), default (<1 h on a CPU), cuda (an H200, a few minutes), tiny; "
                         "dose (the dose-response in rho on a task LoRA learns, a 2-core CPU), dose-cuda (the "
                         "same on a GPU), dose-tiny; default: cuda on a CUDA device, else default")
    sp.add_argument("--ranks", type=int, nargs="+", default=None,
                    help="LoRA ranks r (alpha = r); the dose presets: of the scan")
    sp.add_argument("--lrs", type=float, nargs="+", default=None, help="learning rates (the dose presets: of the scan)")
    sp.add_argument("--methods", nargs="+", default=None,
                    help="subset of: lora mgpo mgpo-noapn noise mgpo-neg (default: all)")
    sp.add_argument("--seeds", type=int, default=None, help="number of seeds (from --seed on)")
    sp.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run")
    sp.add_argument("--weight-decay", type=float, default=None, help="for every method (default 0, as the paper)")
    sp.add_argument("--mgpo-backend", default="auto", help="MGPO backend (auto, cpp, triton, reference)")
    sp.add_argument("--report-only", default=None, metavar="JSON",
                    help="no training: write the report of a finished or interrupted (<name>.partial.json) sweep")
    sp.add_argument("--cache-dir", default=None,
                    help="where pre-trained base models are kept (default ~/.cache/mgpo_kernels/stability)")


def resolve_config(args) -> Dict[str, Any]:
    from .sweep import METHODS

    device = C.pick_device(args.device)
    preset = args.preset or ("cuda" if device.type == "cuda" else "default")
    cfg = dict(PRESETS[preset])
    for k in ("ranks", "lrs", "methods", "steps", "weight_decay"):
        if getattr(args, k, None) is not None:
            cfg[k] = getattr(args, k)
    if args.seeds is not None:
        cfg["n_seeds"] = args.seeds
    bad = [m for m in cfg["methods"] if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    cfg["seeds"] = list(range(args.seed, args.seed + cfg["n_seeds"]))
    cfg["mgpo_backend"] = args.mgpo_backend
    cfg["preset"] = preset
    return cfg


def _complete_seeds(runs, cfg) -> list:
    """Seeds whose every (rank, lr, method) ran: an interrupted sweep is reported on those only."""
    need = len(cfg["ranks"]) * len(cfg["lrs"]) * len(cfg["methods"])
    return [s for s in cfg["seeds"] if sum(r["seed"] == s for r in runs) == need]


def finish(payload: Dict[str, Any], out_dir, device, name: str, chart: bool) -> Dict[str, Any]:
    """Aggregate, write JSON/markdown/PNG.  A sweep cut short keeps only its complete seeds, and says so."""
    from . import report

    cfg, runs = payload["config"], payload["runs"]
    planned = len(cfg["seeds"]) * len(cfg["ranks"]) * len(cfg["lrs"]) * len(cfg["methods"])
    note = ""
    if len(runs) < planned:
        keep = _complete_seeds(runs, cfg)
        note = (f"\n**Interrupted sweep**: {len(runs)} of {planned} runs done; reported: the seeds that completed "
                f"the whole grid, {keep} (of {cfg['seeds']}).\n")
        payload["interrupted"] = {"runs_done": len(runs), "runs_planned": planned, "seeds_planned": cfg["seeds"]}
        payload["runs"] = runs = [r for r in runs if r["seed"] in keep]
        cfg = payload["config"] = {**cfg, "seeds": keep}
    for r in runs:
        r["losses"] = [round(x, 5) for x in r["losses"]]
    payload.setdefault("loadavg_at_end", [round(x, 2) for x in os.getloadavg()])  # kept by --report-only
    payload["rows"] = report.aggregate(runs, cfg)
    md = report.markdown(payload) + note + f"\nTotal wall time {payload['total_s'] / 60:.1f} min.\n"
    return C.publish(out_dir, device, name, payload, md, report.chart if chart else None)


def run(args) -> Dict[str, Any]:
    from mgpo_kernels import MGPO

    from . import base, sweep

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, once per run
    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.pick_device(args.device)
    if args.report_only:
        payload = json.loads(open(args.report_only).read())
        name = args.name or f"stability-{payload['config']['preset']}"
        if payload.get("benchmark") == "stability-dose":
            from . import dose

            return dose.finish(payload, args.out_dir, device, name, not args.no_chart)
        return finish(payload, args.out_dir, device, name, not args.no_chart)
    if args.preset and PRESETS[args.preset].get("study") == "dose":
        from . import dose

        if args.methods:
            raise SystemExit("--methods: the dose presets run their own grid (ρ x APN x noise control)")
        cfg = dict(PRESETS[args.preset], preset=args.preset, mgpo_backend=args.mgpo_backend)
        if args.seeds is not None:
            cfg["n_seeds"] = args.seeds
        if args.weight_decay is not None:
            cfg["weight_decay"] = args.weight_decay
        return dose.run(args, cfg, device)
    cfg = resolve_config(args)
    progress = not args.no_progress
    payload: Dict[str, Any] = {
        "benchmark": "stability", "date": C.now_iso(), "command": command_line(), "preset": cfg["preset"],
        "device": str(device), "machine": C.machine_info(device), "versions": C.versions(),
    }
    t0 = time.perf_counter()
    model, tok, binfo = base.load_or_pretrain(cfg, device, args.cache_dir, progress)
    data = sweep.prepare_data(tok, cfg, device)
    probe = MGPO([torch.zeros(1, device=device, requires_grad=True)], lr=1e-3, weight_decay=0.0,
                 backend=cfg["mgpo_backend"])
    payload.update({
        "backends": [probe.backend], "config": cfg, "base": binfo, "example": data["examples"][0],
        "mgpo_options": (f"rho={sweep.RHO}, ema_beta={sweep.EMA_BETA}, weight_decay={cfg['weight_decay']} "
                         f"(passed), betas/eps/max_grad_norm and any bound on 1/ḡ: MGPO's defaults, "
                         f"backend {probe.backend}"),
    })
    name = args.name or f"stability-{cfg['preset']}"
    partial = C.results_dir(args.out_dir) / f"{C.result_stem(device, name)}.partial.json"

    def checkpoint(runs):
        payload.update(runs=runs, total_s=time.perf_counter() - t0)
        partial.write_text(json.dumps(payload, default=C._json_default))

    runs = sweep.run_sweep(model, data, cfg, device, progress, on_run=checkpoint)
    payload.update(runs=runs, total_s=time.perf_counter() - t0)
    res = finish(payload, args.out_dir, device, name, not args.no_chart)
    partial.unlink(missing_ok=True)
    return res


def build_parser() -> argparse.ArgumentParser:
    """The study's command line: its own options and the ones every ``mgpo-bench`` subcommand shares."""
    p = argparse.ArgumentParser(prog="python -m experiments.stability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if present)")
    p.add_argument("--out", "--out-dir", dest="out_dir", default=None,
                   help="folder to write the results to (default: ./mgpo-bench-results; the committed "
                        "benchmarks/results/ only when named here)")
    p.add_argument("--name", default=None, help="name part of the result files (default: stability-<preset>)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--no-chart", action="store_true", help="do not write the PNG charts")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads. Default on a CPU device: 1, so that other load on a shared machine "
                        "cannot stall OpenMP's barriers; on CUDA: torch's default")
    return p


def main(argv=None) -> int:
    import sys

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    C.require_packages("stability", chart=not args.no_chart, models=not args.report_only)
    if args.threads is None and args.device in ("cpu", "auto"):
        if args.device == "cpu" or not torch.cuda.is_available():
            args.threads = 1
    run(args)
    return 0


__all__ = ["PRESETS", "add_arguments", "build_parser", "main", "run", "resolve_config"]
