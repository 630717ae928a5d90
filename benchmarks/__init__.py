"""Benchmark harness of icl_msr_kernels: `python -m benchmarks --help` (see __main__.py).

Modules: problem (inputs, FLOP model), providers (what is benchmarked), measure (one point),
worker (one point in a fresh process), sweep (which points, skipping), gemm (the GEMM rate),
report (csv, markdown, plots). test_bench.py holds pytest-benchmark versions of the core cases.
"""
