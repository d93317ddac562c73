#!/usr/bin/env python3
"""Optimizer-step benchmark on LLaMA-2-7B's LoRA tensors: same as ``mgpo-bench step`` (options: --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a fresh clone, not installed

from mgpo_kernels.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["step"] + sys.argv[1:]))
