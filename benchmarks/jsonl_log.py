"""The result files of the benchmarks: JSON lines appended to --out, after the command that wrote them
as a comment line at the top of a new file."""

from __future__ import annotations

import json
import shlex
import sys


def start(out: str) -> None:
    """Write the command line at the top of `out` if it is new or empty ("" = no file)."""
    if out:
        with open(out, "a") as f:
            if f.tell() == 0:
                f.write("# .venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv) + "\n")


def emit(line: dict, out: str) -> None:
    """Print one result line and append it to `out` ("" = print only)."""
    print(json.dumps(line), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(line) + "\n")
