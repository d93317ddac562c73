#!/usr/bin/env python3
"""End-to-end LoRA vs LoRA-MGPO, the paper's Table 3 side by side: same as ``mgpo-bench table3`` (--help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a fresh clone, not installed

from mgpo_kernels.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["table3"] + sys.argv[1:]))
