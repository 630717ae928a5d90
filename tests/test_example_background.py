"""Smoke test of examples/background_confounder.py: the --quick run, its outputs, its losses."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import icl_msr_kernels

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "background_confounder.py"
# The quick run takes seconds; the margin is for a machine busy with other work.
TIMEOUT_S = 300


def test_quick_run(tmp_path):
    # A missing scikit-learn is a broken development install (requirements-dev.txt), not a
    # reason to skip.
    assert importlib.util.find_spec("sklearn") is not None, (
        "scikit-learn is not installed: the background-confounder example needs it "
        "(pip install -r requirements-dev.txt)")
    out = tmp_path / "out"
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"--quick run did not finish in {TIMEOUT_S} s; output so far:\n{exc.stdout}")
    assert proc.returncode == 0, (
        f"--quick run exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")

    for name in ("results.md", "accuracy.png", "samples.png", "summary.json"):
        assert (out / name).is_file(), f"{name} missing from {out}; stdout:\n{proc.stdout}"
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    table = (out / "results.md").read_text()

    methods = summary["methods"]
    assert {"simclr", "simclr+icl-msr"} <= set(methods)
    if hasattr(icl_msr_kernels, "ICLMSRRegularizer"):  # the memory-bank API is there: use it
        assert summary["moco_skipped"] is None, f"MoCo methods skipped: {summary['moco_skipped']}"
        assert {"moco", "moco+icl-msr"} <= set(methods)
    assert summary["losses"]["simclr+icl-msr"][0].keys() == {"total", "base", "interventional"}

    for method in methods:
        assert f"| {method} |" in table
        for test_set in ("full", "foreground"):
            accs = summary["accuracy"][method][test_set]
            assert accs and all(0.0 <= a <= 1.0 for a in accs), (method, test_set, accs)
        for seed, terms in enumerate(summary["losses"][method]):
            for name, value in terms.items():
                assert value["end"] < value["start"], (
                    f"{method} seed {seed}: loss term {name!r} did not decrease "
                    f"({value['start']:.4f} at the start, {value['end']:.4f} at the end)")
    assert summary["backend_timing"], "no backend was timed"
