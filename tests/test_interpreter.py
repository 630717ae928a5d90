"""The Triton interpreter runs: the tests that execute the Triton kernels on CPU tensors.

TRITON_INTERPRET=1 must be set before triton is first imported, which this process has already
done, so they run in child pytest processes: the conformance suite's "triton" CPU entries (the
full sweep's and the symmetric sweep's) and test_triton.py's interpreter tests. The children
interpret on one core each, so they run in two lanes side by side. Each file can also be run
directly:
`TRITON_INTERPRET=1 pytest -m "not cuda" -k triton tests/test_conformance.py`,
`TRITON_INTERPRET=1 pytest -m "not cuda" tests/test_triton.py`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# (what, pytest arguments) in two lanes of about equal work, one a core: a lane runs its
# children one after the other (the four side by side on two cores took ~90 s, two lanes ~75).
_FULL = "triton and not symmetric"
LANES = (
    (("conformance, full sweep, tile boundaries",
      ["-k", f"{_FULL} and tile_boundaries", "test_conformance.py"]),
     ("conformance, symmetric sweep", ["-k", "triton-symmetric", "test_conformance.py"])),
    (("conformance, full sweep, the other cases",
      ["-k", f"{_FULL} and not tile_boundaries", "test_conformance.py"]),
     ("test_triton.py", ["test_triton.py"])),
)
TIMEOUT_S = 300  # a guard against a hung child: both lanes together take about 75 s


def _run_lane(lane, deadline: float, results: list) -> None:
    """Runs the lane's children in turn, appending (what, exit status or None on timeout,
    output) to results; stops at the deadline."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    for what, args in lane:
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                   "not cuda", *(str(TESTS / a) if a.endswith(".py") else a for a in args)]
        try:
            done = subprocess.run(command, cwd=TESTS.parent, env=env, capture_output=True,
                                  text=True, timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as err:
            output = [o.decode() if isinstance(o, bytes) else (o or "")
                      for o in (err.stdout, err.stderr)]
            results.append((what, None, *output))
            return
        results.append((what, done.returncode, done.stdout, done.stderr))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="this process is an interpreter run itself")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_under_the_interpreter():
    start = time.monotonic()
    results: list = []
    lanes = [threading.Thread(target=_run_lane, args=(lane, start + TIMEOUT_S, results))
             for lane in LANES]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join()
    elapsed = time.monotonic() - start
    assert len(results) == sum(len(lane) for lane in LANES), \
        f"children timed out after {TIMEOUT_S} s: {[r[0] for r in results if r[1] is None]}"
    for what, status, stdout, stderr in results:
        report = stdout[-8000:] + stderr[-4000:]
        assert status == 0, f"{what} under the interpreter failed ({elapsed:.0f} s):\n{report}"
        assert "passed" in stdout, report
        print(f"{what}, {elapsed:.0f} s: {stdout.strip().splitlines()[-1]}")
