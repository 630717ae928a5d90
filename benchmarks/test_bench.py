"""pytest-benchmark versions of the core cases, for those who prefer that tool.

    .venv/bin/python -m pytest benchmarks/test_bench.py [--benchmark-compare ...]

Not collected by `make test` (which runs `pytest tests`). One case per available provider
(as in `python -m benchmarks`) and per-view N in ICL_BENCH_SIZES (default "1024,4096"),
D=128, K=64, float32, on CUDA when available. Peak memory and the sweep over N are
`python -m benchmarks`' job; this file only times.
"""

from __future__ import annotations

import os
from typing import Callable

import pytest
import torch

from benchmarks.problem import Inputs, make_inputs
from benchmarks.providers import Provider, discover

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = [int(n) for n in os.environ.get("ICL_BENCH_SIZES", "1024,4096").split(",")]
PROVIDERS, _ = discover(DEVICE)


def _sync() -> None:
    # pytest-benchmark reads the host clock: wait for the device's queued work.
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, provider: Provider, n: int, body: Callable[[Inputs], None],
         group: str) -> None:
    inputs = make_inputs(n, 128, 64, torch.float32, DEVICE)
    step = provider.make_step()

    def once() -> None:
        inputs.clear_grads()
        body(step(inputs))
        _sync()

    benchmark.group = f"{group} N={n}"
    # Two warm-up rounds: compilation, then a compiled function's own first-run allocations.
    benchmark.pedantic(once, rounds=3, warmup_rounds=2, iterations=1)


@pytest.fixture(params=PROVIDERS, ids=lambda p: p.name)
def provider(request) -> Provider:
    return request.param


@pytest.mark.parametrize("n", SIZES)
def test_forward(benchmark, provider: Provider, n: int) -> None:
    _run(benchmark, provider, n, lambda loss: None, "forward")


@pytest.mark.parametrize("n", SIZES)
def test_forward_backward(benchmark, provider: Provider, n: int) -> None:
    _run(benchmark, provider, n, lambda loss: loss.backward(), "forward+backward")
