"""The benchmark's FLOP model and provider names (benchmarks/problem.py, providers.py): what
each fused provider is credited with multiplying, since the reported GEMM-floor fractions divide
by it."""

from __future__ import annotations

import pytest

from benchmarks import problem, providers

N, D = 1000, 128
TILE_PRODUCT = 2.0 * (2 * N) ** 2 * D  # FLOPs of one (2N)² x D product


@pytest.mark.parametrize("provider,dtype,d,products", [
    ("cpp", "float32", D, 4),                  # each symmetric tile pair once
    ("triton", "bfloat16", D, 6),              # full sweep: both triangles
    ("cuda", "bfloat16", D, 6),
    ("triton-symmetric", "bfloat16", D, 4),    # where its kernels fit ...
    ("triton-symmetric", "float32", D, 6),     # ... and the full sweep elsewhere
    ("triton-symmetric", "bfloat16", 256, 6),
    ("cuda-symmetric", "float32", D, 4),
    ("cuda-symmetric", "float16", D, 4),
    ("cuda-symmetric", "bfloat16", 256, 6),
    ("cuda-symmetric", "float64", D, 6),
])
def test_in_batch_products(provider, dtype, d, products):
    flops = problem.fused_flops(N, d, "fwdbwd", provider=provider, dtype=dtype)
    assert flops == products * TILE_PRODUCT * d / D


def test_memory_bank_takes_the_full_sweep_model():
    bank = 4096
    for provider in ("cuda", "cuda-symmetric", "triton-symmetric"):
        flops = problem.fused_flops(N, D, "fwdbwd", loss="icl-msr", bank=bank, provider=provider,
                                    dtype="bfloat16")
        assert flops == problem.FULL_SWEEP_BANK_PRODUCTS["icl-msr"]["fwdbwd"] * 2.0 * N * bank * D


def test_symmetric_providers_run_their_backend_under_the_symmetric_sweep():
    for name, backend in problem.SYMMETRIC_PROVIDERS.items():
        provider = providers.by_name(name)
        assert (provider.name, provider.backend, provider.sweep) == (name, backend, "symmetric")
        assert name in providers.all_names()
    assert providers.by_name("cuda").sweep is None
    with pytest.raises(ValueError, match="unknown provider 'cuda-halves'"):
        providers.by_name("cuda-halves")
