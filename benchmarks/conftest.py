"""pytest configuration of the benchmarks: importable from a fresh clone (no install needed)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
