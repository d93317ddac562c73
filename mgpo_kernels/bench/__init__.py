"""``mgpo-bench``: overhead benchmarks of MGPO against plain LoRA (the paper's Table 3, side by side).

    mgpo-bench step   [--ranks 8 32 128] [--layers N] ...   optimizer step on LLaMA-2-7B's LoRA tensors
    mgpo-bench table3 [--preset default|llama2-7b|tiny] ... end-to-end LoRA training steps, Table 3's columns

Each prints a markdown table and writes ``<out>/<date>-<device>-<name>.{json,md,png}`` (``--out``, default
``./mgpo-bench-results``).
Also ``python -m mgpo_kernels.bench``.  The stability study (the paper's Figures 2-4) is a research experiment
outside the package: ``python -m experiments.stability`` from the repository root.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    from . import step, table3

    p = argparse.ArgumentParser(prog="mgpo-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if present)")
        sp.add_argument("--out", "--out-dir", dest="out_dir", default=None,
                        help="folder to write the results to (default: ./mgpo-bench-results; the committed "
                             "benchmarks/results/ only when named here)")
        sp.add_argument("--name", default=None, help="name part of the result files (default from the options)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--no-chart", action="store_true", help="do not write the PNG chart")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        sp.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (per row process in table3). Default on a CPU device: 1, so that "
                             "other load on a shared machine cannot stall OpenMP's barriers (seen: 10x slower "
                             "steps with 2 threads on a busy 2-core machine); on CUDA: torch's default")

    sp = sub.add_parser("step", help="optimizer-step benchmark on LLaMA-2-7B LoRA tensors")
    step.add_arguments(sp)
    common(sp)
    sp = sub.add_parser("table3", help="end-to-end LoRA training steps, the paper's Table 3 side by side")
    table3.add_arguments(sp)
    common(sp)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from .common import require_packages

    require_packages(args.cmd, chart=not args.no_chart, models=not getattr(args, "report_only", None))
    if args.threads is None and args.device in ("cpu", "auto"):
        import torch

        if args.device == "cpu" or not torch.cuda.is_available():
            args.threads = 1
    if args.cmd == "step":
        from . import step

        step.run(args)
    else:
        from . import table3

        table3.run(args)
    return 0


__all__ = ["main", "build_parser"]
