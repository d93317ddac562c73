"""The command line as a user would type it again (the study is run as ``python -m experiments.stability``)."""
from __future__ import annotations

import shlex
import sys


def command_line() -> str:
    return " ".join(["python -m experiments.stability"] + [shlex.quote(a) for a in sys.argv[1:]])
