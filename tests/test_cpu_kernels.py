"""Backend "cpp" across CPU configurations: results bit-identical for 1, 2 and 4 intra-op threads,
and the baseline tile passes (csrc/cpu/tile_passes.h, forced with ICL_MSR_CPU_ISA=baseline)
agreeing with the ones the CPU's dispatch picks.

Each configuration runs in a fresh interpreter: the thread count has to be set before the first
op, and the tile passes are chosen once per process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

import icl_msr_kernels as icl

_REASON = icl.backend_status()["cpp"]
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"backend 'cpp' unavailable: {_REASON}")

# Sizes with several tiles everywhere: 2N = 1400 rows are 4 square row blocks; with the bank,
# 700 anchor rows against Q = 700 bank columns are 2 x 2 rectangular blocks; the attention's row
# blocks are 256 rows. "sharp" (a small temperature) sends tiles down the exact paths of the tile
# passes, whose references would otherwise leave the float32 range. "constant bank": only the
# views require grad, so the forward also accumulates the row gradients (and, sharp, redoes its
# row blocks exactly).
_WORKER = textwrap.dedent("""
    import ctypes, importlib.util, sys
    import torch
    threads, out = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(threads)
    import torch.nn.functional as F
    from icl_msr_kernels import icl_msr_loss

    isa = ctypes.CDLL(importlib.util.find_spec("icl_msr_kernels._C").origin).icl_msr_cpu_isa
    isa.restype = ctypes.c_char_p
    gen = torch.Generator().manual_seed(0)
    n, d, k, q = 700, 24, 9, 700
    base = {"z1": torch.randn(n, d, generator=gen, dtype=torch.float64),
            "z2": torch.randn(n, d, generator=gen, dtype=torch.float64),
            "prototypes": torch.randn(k, d, generator=gen, dtype=torch.float64),
            "prior_logits": torch.randn(k, generator=gen, dtype=torch.float64)}
    bank64 = F.normalize(torch.randn(q, d, generator=gen, dtype=torch.float64), dim=1)
    arrangements = ("square", "bank", "constant bank")
    cases = [(dtype, combine, arrangement, 0.2) for dtype in (torch.float32, torch.float64)
             for combine in ("concat", "add") for arrangement in arrangements]
    cases += [(dtype, "concat", arrangement, 0.005) for dtype in (torch.float32, torch.float64)
              for arrangement in ("square", "constant bank")]
    results = {}
    for dtype, combine, arrangement, tau in cases:
        constant = arrangement == "constant bank"
        x = {name: v.to(dtype).requires_grad_(not constant or name in ("z1", "z2"))
             for name, v in base.items()}
        x["temperature"] = torch.tensor(tau, dtype=dtype, requires_grad=not constant)
        parts = icl_msr_loss(x["z1"], x["z2"], x["prototypes"], x["prior_logits"],
                             temperature=x["temperature"], combine=combine,
                             bank=None if arrangement == "square" else bank64.to(dtype),
                             backend="cpp", return_parts=True)
        total = parts[0] + 0.3 * parts[1] + 0.7 * parts[2]
        wanted = [v for v in x.values() if v.requires_grad]
        found = dict(zip([n for n, v in x.items() if v.requires_grad],
                         torch.autograd.grad(total, wanted)))
        grads = [found.get(n, torch.zeros_like(v)) for n, v in x.items()]
        key = (str(dtype).removeprefix("torch."), combine, arrangement,
               "sharp" if tau < 0.1 else "tau=0.2")
        results["/".join(key)] = {"parts": torch.stack([p.detach() for p in parts]),
                                  **dict(zip(x, grads))}
    torch.save({"isa": isa().decode(), "threads": torch.get_num_threads(),
                "results": results}, out)
""")

_GRADS = ("z1", "z2", "prototypes", "prior_logits")


def _start(tmp_path_factory, threads: int, isa: str | None):
    """The worker at `threads` threads (and ISA `isa`, None for the CPU's own), started."""
    out = tmp_path_factory.mktemp("cpu_kernels") / f"threads{threads}-{isa}.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("ICL_MSR_CPU_ISA", "OMP_NUM_THREADS")}
    if isa is not None:
        env["ICL_MSR_CPU_ISA"] = isa
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(threads), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out, threads


def _result(started):
    proc, out, threads = started
    try:
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    saved = torch.load(out)
    assert saved["threads"] == threads
    return saved


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """threads (or "baseline", 2 threads with the baseline passes) -> the worker's results.
    The workers run side by side (their results do not depend on timing; most of each run is
    importing torch)."""
    started = {t: _start(tmp_path_factory, t, None) for t in (1, 2, 4)}
    started["baseline"] = _start(tmp_path_factory, 2, "baseline")
    return {key: _result(s) for key, s in started.items()}


def _expected_isa() -> str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "baseline"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
        has_avx2 = "avx2" in flags and "fma" in flags
    except (OSError, StopIteration):  # torch's detection (AVX2 implies FMA there), unless forced
        has_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return "avx2" if has_avx2 else "baseline"


def test_dispatch_picks_the_cpus_passes(runs):
    assert runs[1]["isa"] == _expected_isa()
    assert runs["baseline"]["isa"] == "baseline"


@pytest.mark.parametrize("name", ("parts",) + _GRADS)
def test_bit_identical_across_thread_counts(runs, name):
    for key, entry in runs[1]["results"].items():
        want = entry[name]
        assert torch.isfinite(want).all(), key
        for threads in (2, 4):
            got = runs[threads]["results"][key][name]
            assert torch.equal(got, want), f"{key}: {name} differs with {threads} threads"


def test_temperature_gradient_across_thread_counts(runs):
    # The glue's scaling by temperature ** -0.5 sums its gradient in a fixed order (loss.py).
    for key, entry in runs[1]["results"].items():
        want = entry["temperature"]
        for threads in (2, 4):
            got = runs[threads]["results"][key]["temperature"]
            assert torch.equal(got, want), f"{key}: temperature differs with {threads} threads"


@pytest.mark.parametrize("name", ("parts",) + _GRADS + ("temperature",))
def test_baseline_passes_match(runs, name):
    """The baseline passes (no FMA, other vector widths) round differently, within the dtype's
    tolerance: relative to each part, and to the largest entry of each gradient."""
    for key, entry in runs[2]["results"].items():
        want, got = entry[name], runs["baseline"]["results"][key][name]
        rtol = 1e-5 if key.startswith("float32") else 1e-12
        scale = want.abs() if name == "parts" else want.abs().max()
        assert ((got - want).abs() <= rtol * scale).all(), f"{key}: {name}"


def test_invalid_isa_is_an_error():
    script = textwrap.dedent("""
        import torch
        from icl_msr_kernels import ntxent_loss
        z = torch.randn(8, 4)
        try:
            ntxent_loss(z, z, backend="cpp")
        except RuntimeError as err:
            print(err)
    """)
    env = dict(os.environ, ICL_MSR_CPU_ISA="sse9")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ICL_MSR_CPU_ISA" in proc.stdout
