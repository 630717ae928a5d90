"""The Triton interpreter runs: the tests that execute the Triton kernels on CPU tensors.

TRITON_INTERPRET=1 must be set before triton is first imported, which this process has already
done, so they run in child pytest processes: the conformance suite's "triton" CPU entries (the
full sweep's and the symmetric sweep's) and test_triton.py's interpreter tests. The children
interpret on one core each, so they run side by side. Each file can also be run directly:
`TRITON_INTERPRET=1 pytest -m "not cuda" -k triton tests/test_conformance.py`,
`TRITON_INTERPRET=1 pytest -m "not cuda" tests/test_triton.py`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# (what, pytest arguments): about equal shares of the work, so that two cores end together.
_FULL = "triton and not symmetric"
CHILDREN = (
    ("conformance, full sweep, tile boundaries",
     ["-k", f"{_FULL} and tile_boundaries", "test_conformance.py"]),
    ("conformance, full sweep, the other cases",
     ["-k", f"{_FULL} and not tile_boundaries", "test_conformance.py"]),
    ("conformance, symmetric sweep", ["-k", "triton-symmetric", "test_conformance.py"]),
    ("test_triton.py", ["test_triton.py"]),
)
TIMEOUT_S = 300  # a guard against a hung child: together they take about a minute and a half


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="this process is an interpreter run itself")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    start = time.monotonic()
    children = [subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not cuda",
         *(str(TESTS / a) if a.endswith(".py") else a for a in args)],
        cwd=TESTS.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _, args in CHILDREN]
    try:
        outputs = [child.communicate(timeout=TIMEOUT_S) for child in children]
    finally:
        for child in children:
            child.kill()
    elapsed = time.monotonic() - start
    for (what, _), child, (stdout, stderr) in zip(CHILDREN, children, outputs):
        report = stdout[-8000:] + stderr[-4000:]
        assert child.returncode == 0, \
            f"{what} under the interpreter failed ({elapsed:.0f} s):\n{report}"
        assert "passed" in stdout, report
        print(f"{what}, {elapsed:.0f} s: {stdout.strip().splitlines()[-1]}")
