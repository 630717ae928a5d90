"""Backend "triton" against the reference, on the GPU and under the Triton interpreter.

Four groups:

- interpreter tests (`interp`): the kernels run on CPU tensors under TRITON_INTERPRET=1. That
  variable must be set before triton is first imported, and torch (or another test) may import
  triton early, so plain `pytest tests` runs them in a child pytest process
  (`tests/test_interpreter.py`). `TRITON_INTERPRET=1 pytest tests/test_triton.py` runs them
  directly, one by one. The interpreter has no bfloat16, so they cover float32, float16 (and
  float64, which checks the kernels' math to 1e-10).
- error tests that need no GPU (run in the parent process, where triton is compiled, not
  interpreted);
- without a GPU, an ahead-of-time compile of every kernel for sm_80 and sm_90: the compiled
  Triton frontend and backend, which the interpreter skips, accept them and they fit;
- CUDA tests (`cuda`): skipped, with the reason, where no GPU is present.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (GRAD_NAMES, PAIRS, TOLERANCES, relative_errors, assert_matches_reference, cast,
                     loss_and_grads, make_inputs)
from icl_msr_kernels import BackendUnavailable, icl_msr_loss, ntxent_loss
from icl_msr_kernels.backends import load_backend, resolve_backend
from icl_msr_kernels.reference import contrastive_losses as reference_contrastive
from icl_msr_kernels.reference import rownorm

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

interp = pytest.mark.skipif(
    not INTERPRETED, reason="interpreter test: run by tests/test_interpreter.py in a child process "
                            "with TRITON_INTERPRET=1")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def cuda(test):
    """Mark a CUDA test; without a GPU it is skipped and says why."""
    skip = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRETED),
                              reason="needs a CUDA GPU and compiled (not interpreted) Triton")
    return pytest.mark.cuda(skip(test))


def _contrastive_case(dtype, combine, device="cpu", rows=6, dim=7, ranks=3, rank=1, seed=0):
    """Features of `rows` local rows on rank `rank` of `ranks` (float64 masters, requiring grad):
    (a, b, a_cols, b_cols, row_offset), b and b_cols None for "none"."""
    gen = torch.Generator().manual_seed(seed)

    def feats(n):  # unit rows scaled by 1/sqrt(tau), as loss.py hands them to the kernels
        return rownorm(torch.randn(n, dim, generator=gen, dtype=torch.float64)) / 0.2 ** 0.5

    def leaf(t):
        return t.to(device).requires_grad_(True)

    a_all, b_all = feats(rows * ranks), feats(rows * ranks)
    offset = rank * rows
    a, a_cols = leaf(a_all[offset:offset + rows].clone()), leaf(a_all)
    if combine == "none":
        return a, None, a_cols, None, offset
    return a, leaf(b_all[offset:offset + rows].clone()), a_cols, leaf(b_all), offset


def _contrastive_parts_and_grads(fn, case, combine):
    """(L_base, L_int) of fn on `case` and the gradients of L_base + 0.7 L_int."""
    a, b, a_cols, b_cols, offset = case
    base, inter = fn(a, b, a_cols, b_cols, offset, combine)
    leaves = {n: t for n, t in zip(("a", "b", "a_cols", "b_cols"), (a, b, a_cols, b_cols))
              if t is not None}
    grads = torch.autograd.grad(base + 0.7 * inter, list(leaves.values()))
    return [base.detach(), inter.detach()], dict(zip(leaves, grads))


def assert_contrastive_matches_reference(dtype, combine, device="cpu", **shape):
    """Distributed-style columns (rows of every rank, this rank's at row_offset): the kernels in
    `dtype` against the float64 reference, with docs/math.md §5's float32/float64 tolerances."""
    master = _contrastive_case(torch.float64, combine, device, **shape)
    ours_case = tuple(t.detach().to(dtype).requires_grad_(True) if isinstance(t, torch.Tensor)
                      else t for t in master)
    kernels = load_backend("triton")
    parts, grads = _contrastive_parts_and_grads(kernels.contrastive, ours_case, combine)
    ref_parts, ref_grads = _contrastive_parts_and_grads(reference_contrastive, master, combine)
    for name, g in grads.items():
        assert g.dtype == dtype, f"grad of {name} is {g.dtype}"
    if combine == "none":  # L_int is an exact zero: compare L_base only
        parts, ref_parts = parts[:1], ref_parts[:1]
    loss_tol, grad_tol = TOLERANCES[dtype]
    loss_err, grad_err = relative_errors(parts, grads, ref_parts, ref_grads)
    assert loss_err <= loss_tol, f"loss rel. error {loss_err:.3g}"
    for name, err in grad_err.items():
        assert err <= grad_tol, f"grad {name} error {err:.3g}"


# ---------------------------------------------------------------------------------------------
# Interpreter tests (child process)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
def test_one_prototype_uniform_prior_float_temperature(dtype):
    inputs = make_inputs(n=3, d=3, k=1, prior=False, temperature_tensor=False,
                         requires_grad=("z1", "z2", "prototypes"))
    # K = 1: W = 1 and C = P for every row. With "concat" the C·C' term would be a constant
    # (zero gradient, where relative errors mean nothing); "add" keeps every gradient alive.
    assert_matches_reference(inputs, "triton", dtype, combine="add", gamma=0.5, lam=2.0,
                             attn_temperature=0.3)


@interp
def test_ntxent_loss():
    inputs = make_inputs(n=7, d=19, seed=3)
    leaves = [[inputs[n].detach().to(dtype).requires_grad_(True) for n in ("z1", "z2")]
              for dtype in (torch.float32, torch.float64)]
    parts, grads = [], []
    for (z1, z2), backend in zip(leaves, ("triton", "reference")):
        loss = ntxent_loss(z1, z2, temperature=0.3, backend=backend)
        parts.append([loss.detach()])
        grads.append(dict(zip(("z1", "z2"), torch.autograd.grad(loss, (z1, z2)))))
    loss_tol, grad_tol = TOLERANCES[torch.float32]
    loss_err, grad_err = relative_errors(parts[0], grads[0], parts[1], grads[1])
    assert loss_err <= loss_tol
    assert max(grad_err.values()) <= grad_tol


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("combine", ["concat", "add", "none"])
def test_distributed_columns(dtype, combine):
    # Rows of rank 1 of 3 against every rank's rows: the row- and column-owned sweeps.
    assert_contrastive_matches_reference(dtype, combine)
    assert_contrastive_matches_reference(dtype, combine, rows=10, dim=37, ranks=2, rank=0)


@interp
def test_half_losses_are_float32():
    inputs = cast(make_inputs(), torch.float16)
    parts, grads = loss_and_grads(inputs, "triton")
    assert all(p.dtype == torch.float32 for p in parts)
    assert grads["z1"].dtype == torch.float16 and grads["prototypes"].dtype == torch.float16


@interp
def test_double_backward_raises():
    inputs = cast(make_inputs(), torch.float32)
    loss = icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"], inputs["prior_logits"],
                        temperature=inputs["temperature"], backend="triton")
    (g,) = torch.autograd.grad(loss, inputs["z1"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), inputs["prototypes"])


@interp
@pytest.mark.parametrize("sweep", ["full", "symmetric"])
def test_compile_fullgraph(sweep, monkeypatch, request):
    # Under the interpreter the ops are opaque custom ops with fake implementations (triton_op
    # would trace into kernels that need real data); "aot_eager" traces forward and backward
    # without generating code. On a GPU, test_cuda_compile_fullgraph uses inductor.
    from icl_msr_kernels.kernels import ops as kernel_ops

    monkeypatch.setattr(kernel_ops, "_sweep", "full")
    calls = request.getfixturevalue("symmetric_sweep") if sweep == "symmetric" else None
    inputs = cast(make_inputs(n=20, d=6, k=3, seed=5), torch.float32)

    def fn(z1, z2, prototypes, prior_logits, temperature):
        return icl_msr_loss(z1, z2, prototypes, prior_logits, temperature=temperature,
                            backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    args = [inputs[n] for n in GRAD_NAMES]
    eager = fn(*args)
    eager_grads = torch.autograd.grad(eager, args)
    got = compiled(*args)
    got_grads = torch.autograd.grad(got, args)
    torch.testing.assert_close(got, eager)
    for g, e in zip(got_grads, eager_grads):
        torch.testing.assert_close(g, e)
    if calls is not None:  # the compiled call really took the symmetric sweep
        assert calls.count("forward") == 2 and calls.count("backward") == 2, calls


@interp
def test_fp32_precision_option():
    from icl_msr_kernels.kernels import triton_common

    with pytest.raises(ValueError, match="ieee"):
        triton_common.set_fp32_precision("fast")
    inputs = make_inputs()
    try:
        triton_common.set_fp32_precision("tf32")
        assert triton_common.dot_precision(torch.float32) == "tf32"
        assert triton_common.dot_precision(torch.float16) == "ieee"
        parts, _ = loss_and_grads(cast(inputs, torch.float32), "triton")
    finally:
        triton_common.set_fp32_precision("ieee")
    ref_parts, _ = loss_and_grads(inputs, "reference")
    assert abs(parts[0].item() - ref_parts[0].item()) <= 1e-2 * abs(ref_parts[0].item())


@pytest.fixture
def symmetric_sweep():
    """Run with the symmetric single-process sweep, and count its forward and backward calls."""
    from icl_msr_kernels.kernels import ops as kernel_ops, triton_symmetric

    calls = []
    forward, backward = triton_symmetric.forward, triton_symmetric.backward

    def counted(name, fn):
        def call(*args):
            calls.append(name)
            return fn(*args)
        return call

    previous = kernel_ops.get_sweep()
    kernel_ops.set_sweep("symmetric")
    triton_symmetric.forward = counted("forward", forward)
    triton_symmetric.backward = counted("backward", backward)
    try:
        yield calls
    finally:
        triton_symmetric.forward, triton_symmetric.backward = forward, backward
        kernel_ops.set_sweep(previous)


def _far_rows(n=24, d=16, dtype=torch.float64):
    """Views aligned with one axis, but for two rows orthogonal to every other row and to their
    positives: at tau = 0.005 their logits lie ~200 below the tiles' maxima."""
    gen = torch.Generator().manual_seed(0)
    axis = torch.eye(d, dtype=dtype)
    z1 = axis[0] + 0.05 * torch.randn(n, d, generator=gen, dtype=dtype)
    z2 = axis[0] + 0.05 * torch.randn(n, d, generator=gen, dtype=dtype)
    for r in (3, 20):
        z1[r], z2[r] = axis[1 + r % 3], axis[4 + r % 5]
    return z1, z2


@interp
def test_symmetric_sweep_rows_far_below_the_tile_maximum(symmetric_sweep):
    """One exponential a tile entry serves its row and column, shifted by the tile's maximum;
    rows and columns far below it (their sums would underflow in float32) take their own
    shifts. Without that their negatives vanish (the loss is off by ~20%)."""
    z1, z2 = _far_rows()
    masters = [t.requires_grad_(True) for t in (z1, z2)]
    ours = [t.detach().float().requires_grad_(True) for t in (z1, z2)]
    parts, grads = [], []
    for (a, b), backend in ((ours, "triton"), (masters, "reference")):
        loss = ntxent_loss(a, b, temperature=0.005, backend=backend)
        parts.append([loss.detach()])
        grads.append(dict(zip(("z1", "z2"), torch.autograd.grad(loss, (a, b)))))
    assert symmetric_sweep == ["forward", "backward"]
    loss_tol, grad_tol = TOLERANCES[torch.float32]
    loss_err, grad_err = relative_errors(parts[0], grads[0], parts[1], grads[1])
    assert loss_err <= loss_tol, loss_err
    assert max(grad_err.values()) <= grad_tol, grad_err


@interp
def test_symmetric_sweep_takes_only_single_process_whole_rows(symmetric_sweep):
    """Columns (distributed), memory banks and D past the whole-row width take the full sweep."""
    kernels = load_backend("triton")
    a = torch.randn(40, 8)
    kernels.contrastive(a, None, None, None, 0, "none")
    assert symmetric_sweep == ["forward"]
    symmetric_sweep.clear()
    kernels.contrastive(a, None, torch.randn(60, 8), None, 20, "none")
    kernels.contrastive(a, None, torch.randn(60, 8), None, 0, "none",
                        torch.randn(2, 40))
    kernels.contrastive(torch.randn(6, 300), None, None, None, 0, "none")
    assert symmetric_sweep == []


@interp
def test_symmetric_sweep_segments_add_in_a_fixed_order(symmetric_sweep):
    """2N = 200: seven row blocks, four segments of distances; each column block's buffer
    takes up to six programs' additions, each row block's up to four. The same inputs give
    bit-identical results, and they match the full sweep to rounding."""
    from icl_msr_kernels.kernels import ops as kernel_ops

    gen = torch.Generator().manual_seed(4)
    a, b = (rownorm(torch.randn(200, 8, generator=gen)) * 3 for _ in range(2))
    kernels = load_backend("triton")

    def run():
        a_in, b_in = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        base, inter = kernels.contrastive(a_in, b_in, None, None, 0, "concat")
        grads = torch.autograd.grad(base + 0.7 * inter, (a_in, b_in))
        return [base.detach(), inter.detach(), *grads]

    first, second = run(), run()
    assert symmetric_sweep.count("backward") == 2
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    kernel_ops.set_sweep("full")
    for x, y in zip(first, run()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@interp
def test_odd_row_count_rejected():
    kernels = load_backend("triton")
    a = torch.randn(5, 4)
    with pytest.raises(ValueError, match="even"):
        kernels.contrastive(a, None, None, None, 0, "none")


# ---------------------------------------------------------------------------------------------
# Errors without a GPU (parent process: triton compiled, not interpreted)


@pytest.mark.skipif(INTERPRETED, reason="needs a process without the interpreter")
def test_cpu_without_interpreter_is_refused():
    inputs = make_inputs()
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET|triton"):
        icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"], backend="triton")


@pytest.mark.skipif(INTERPRETED, reason="needs a process without the interpreter")
@needs_triton
def test_kernels_refuse_cpu_tensors_without_interpreter():
    kernels = load_backend("triton")
    x, p = rownorm(torch.randn(4, 3)), rownorm(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.attention(x, p, torch.zeros(2), 0.1, "logit")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.contrastive(x, None, None, None, 0, "none")


def test_missing_triton_is_reported(monkeypatch):
    from icl_msr_kernels.kernels import triton_backend

    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    with pytest.raises(BackendUnavailable, match="triton is not importable"):
        triton_backend.load()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_unsupported_dtype_is_refused():
    kernels = load_backend("triton")
    with pytest.raises(TypeError, match="float32, float16"):
        kernels.attention(torch.zeros(2, 2, dtype=torch.complex64), None, None, 0.1, "logit")


# ---------------------------------------------------------------------------------------------
# The compiled (GPU) path without a GPU: compile every kernel for Hopper and Ampere


def _compile_for(kernel, arch: int, dtype: str, consts: dict, config):
    """triton.compile `kernel.fn` for sm_`arch` with `dtype` features and one tile config."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn
    consts = {**consts, **config.kwargs}
    accum = "fp64" if dtype == "fp64" else "fp32"
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name == "lp_ptr":
            signature[name] = "*" + (accum if dtype in ("fp32", "fp64") else "fp32")
        elif name in ("lse_ptr", "pos_ptr", "delta_ptr", "grad_ptr", "dp_ptr", "dlp_ptr",
                      "inv_tau_ptr", "cmax_ptr", "csum_ptr", "cpos_ptr", "col_a_ptr",
                      "col_b_ptr", "row_a_ptr", "row_b_ptr"):
            signature[name] = "*" + accum
        elif name == "counters_ptr":
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*" + dtype
        else:
            signature[name] = "fp32" if name == "inv_tau" else "i32"
    import triton

    return triton.compile(ASTSource(fn, signature, constexprs=consts),
                          target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


# (arch, feature dtype, dot precision, shared memory per block available)
_TARGETS = [(90, "fp16", "ieee", 227 * 1024), (80, "bf16", "ieee", 163 * 1024),
            (90, "fp32", "ieee", 227 * 1024)]


@pytest.mark.skipif(INTERPRETED or HAS_CUDA or not HAS_TRITON,
                    reason="only where there is no GPU (the CUDA tests compile for real) and "
                           "triton is compiled, not interpreted")
@pytest.mark.parametrize("arch,dtype,precision,smem", _TARGETS,
                         ids=[f"sm{a}-{d}-{p}" for a, d, p, _ in _TARGETS])
def test_kernels_compile_for_gpu(arch, dtype, precision, smem):
    """The compiled-Triton frontend and backend accept every kernel (default tile config, the
    widest D tile, the most involved mode), and it fits the target's shared memory."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this Triton has no ahead-of-time compile API ({err})")
    from icl_msr_kernels.kernels import triton_attention as attention
    from icl_msr_kernels.kernels import triton_contrastive as contrastive
    from icl_msr_kernels.kernels.triton_common import d_blocking, uses_fma, whole_d_blocking

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    fma = uses_fma(torch_dtype, precision)
    # The widest D tile each kind of kernel takes for these operands: the contrastive kernels
    # hold the whole of D up to 256, below and above the wide spaces' threshold.
    fwd_d, bwd_d = (d_blocking(1 << 20, backward, torch_dtype, precision)[0]
                    for backward in (False, True))
    fwd_whole, bwd_whole = ([whole_d_blocking(d, backward, torch_dtype, precision)[0]
                             for d in (128, 256)] for backward in (False, True))
    common = dict(FP64=False, PREC=precision, ONE_D=True)
    cases = [*[(contrastive._fwd, dict(INT_MODE=1, EXPLICIT_POS=False, BLOCK_D=d))
               for d in fwd_whole],
             (contrastive._fwd, dict(INT_MODE=1, EXPLICIT_POS=True, BLOCK_D=fwd_whole[-1])),
             *[(contrastive._bwd, dict(INT_MODE=1, OWNER_ROWS=True, SWEPT_ROWS=True,
                                       EXPLICIT_POS=False, BLOCK_D=d)) for d in bwd_whole],
             (contrastive._bwd, dict(INT_MODE=1, OWNER_ROWS=True, SWEPT_ROWS=False,
                                     EXPLICIT_POS=True, BLOCK_D=bwd_whole[-1])),
             (attention._fwd, dict(MULT=True, BLOCK_D=fwd_d)),
             (attention._bwd_rows, dict(MULT=True, BLOCK_D=bwd_d)),
             (attention._bwd_protos, dict(MULT=True, BLOCK_D=bwd_d))]
    for kernel, consts in cases:
        config = kernel.default_config(fma, consts["BLOCK_D"])
        compiled = _compile_for(kernel, arch, dtype, {**common, **consts}, config)
        assert compiled.metadata.shared <= smem, (kernel.fn.__name__, compiled.metadata.shared)
    if dtype != "fp32":  # the symmetric sweep takes 2-byte operands only
        for kernel, config in _symmetric_configs():
            compiled = _compile_for(kernel, arch, dtype, dict(FP64=False, PREC=precision,
                                                              INT_MODE=1, BLOCK_D=128), config)
            assert compiled.metadata.shared <= smem, (kernel.fn.__name__,
                                                      compiled.metadata.shared)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) of a kernel's PTX by the CUDA toolkit's ptxas."""
    import re
    import shutil
    import tempfile

    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    ptxas = shutil.which("ptxas") or os.path.join(cuda_home, "bin", "ptxas")
    if not os.path.isfile(ptxas):
        pytest.skip(f"no ptxas (set CUDA_HOME; looked in {ptxas})")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # Triton targets sm_90a
        proc = subprocess.run([ptxas, f"-arch={target}", "-v", path, "-o",
                               os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = proc.stdout + proc.stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return registers, int(spills.group(1)) + int(spills.group(2))


# (feature dtype, every shipped configuration or only the default)
_SPILL_CASES = [("bf16", True), ("fp16", False), ("fp32", True)]


@pytest.mark.skipif(INTERPRETED or not HAS_TRITON,
                    reason="needs triton compiled, not interpreted")
@pytest.mark.parametrize("dtype,every_config", _SPILL_CASES,
                         ids=[f"{d}-{'all' if a else 'default'}" for d, a in _SPILL_CASES])
def test_shipped_configs_do_not_spill(dtype, every_config):
    """No Triton configuration we ship spills registers on sm_90 at D = 128 (and D = 256 in the
    contrastive kernels' wide spaces), in the heaviest mode of each kernel (ptxas -v on the
    ahead-of-time PTX)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this Triton has no ahead-of-time compile API ({err})")
    from icl_msr_kernels.kernels import triton_attention as attention
    from icl_msr_kernels.kernels import triton_contrastive as contrastive
    from icl_msr_kernels.kernels import triton_symmetric as symmetric
    from icl_msr_kernels.kernels.triton_common import d_blocking, uses_fma, whole_d_blocking

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    fma = uses_fma(torch_dtype, "ieee")
    fwd_d, bwd_d = (d_blocking(128, backward, torch_dtype, "ieee")[0]
                    for backward in (False, True))
    common = dict(FP64=False, PREC="ieee", ONE_D=True)
    # The contrastive kernels at D = 128 and, in their wide spaces, D = 256 (whole rows).
    cases = [*[(kernel, dict(INT_MODE=1, EXPLICIT_POS=False, **extra,
                             BLOCK_D=whole_d_blocking(d, backward, torch_dtype, "ieee")[0]))
               for kernel, backward, extra in (
                   (contrastive._fwd, False, {}),
                   (contrastive._bwd, True, dict(OWNER_ROWS=True, SWEPT_ROWS=True)))
               for d in (128, 256)],
             (attention._fwd, dict(MULT=True, BLOCK_D=fwd_d)),
             (attention._bwd_rows, dict(MULT=True, BLOCK_D=bwd_d)),
             (attention._bwd_protos, dict(MULT=True, BLOCK_D=bwd_d))]
    spilling = []
    for kernel, consts in cases:
        block_d = consts["BLOCK_D"]
        configs = (kernel.configs(fma, block_d) if every_config
                   else [kernel.default_config(fma, block_d)])
        for config in configs:
            compiled = _compile_for(kernel, 90, dtype, {**common, **consts}, config)
            registers, spilled = _ptxas_usage(compiled.asm["ptx"], 90)
            if spilled:
                spilling.append(f"{kernel.fn.__name__} {config}: {registers} registers, "
                                f"{spilled} spill bytes")
    if symmetric.supports(torch_dtype, "ieee", 128):
        # The symmetric sweep's one configuration, in both modes with two terms ("add" holds
        # other tiles live than "concat").
        for kernel, config in _symmetric_configs():
            for mode in (1, 2) if every_config else (1,):
                consts = dict(FP64=False, PREC="ieee", INT_MODE=mode, BLOCK_D=128)
                compiled = _compile_for(kernel, 90, dtype, consts, config)
                registers, spilled = _ptxas_usage(compiled.asm["ptx"], 90)
                if spilled:
                    spilling.append(f"{kernel.fn.__name__} mode {mode} {config}: {registers} "
                                    f"registers, {spilled} spill bytes")
    assert not spilling, "\n".join(spilling)


def _symmetric_configs():
    """(kernel, triton.Config) of the symmetric sweep's two kernels, as `_compile_for` takes
    them (a TunedKernel-like object with `fn`)."""
    import types

    import triton

    from icl_msr_kernels.kernels import triton_symmetric as symmetric

    block, block_n, fwd_warps, bwd_warps, stages = symmetric.config()
    return [(types.SimpleNamespace(fn=symmetric._symmetric_fwd_kernel),
             triton.Config({"BLOCK": block}, num_warps=fwd_warps, num_stages=stages)),
            (types.SimpleNamespace(fn=symmetric._symmetric_bwd_kernel),
             triton.Config({"BLOCK": block, "BLOCK_N": block_n}, num_warps=bwd_warps,
                           num_stages=stages))]


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.fixture
def default_tiles():
    """Run the kernels with their default tiles: autotuning compiles and times every
    configuration of every kernel variant, minutes that correctness tests need not spend."""
    from icl_msr_kernels.kernels import triton_common

    triton_common.set_autotune(False)
    yield
    triton_common.set_autotune(True)


@cuda
@pytest.mark.usefixtures("default_tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("prior_mode,combine", PAIRS)
def test_cuda_matches_reference(dtype, prior_mode, combine):
    assert_matches_reference(make_inputs(n=37, d=37, k=13, device="cuda"), "triton", dtype,
                             prior_mode=prior_mode, combine=combine)


@cuda
@pytest.mark.usefixtures("default_tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [(1, 5, 2), (200, 128, 64), (96, 300, 24)],
                         ids=lambda s: "n{}-d{}-k{}".format(*s))
def test_cuda_shapes(shape, dtype):
    # N = 1; the widest single D tile; D = 300 in several chunks (both D-loop paths).
    n, d, k = shape
    assert_matches_reference(make_inputs(n=n, d=d, k=k, seed=8, device="cuda"), "triton", dtype,
                             prior_mode="mult", combine="concat")


@cuda
@pytest.mark.slow  # compiles and times every configuration
def test_cuda_autotuned():
    from icl_msr_kernels.kernels import triton_common

    triton_common.set_autotune(True)  # whatever ICL_MSR_TRITON_AUTOTUNE says
    try:
        assert_matches_reference(make_inputs(n=256, d=128, k=32, seed=9, device="cuda"),
                                 "triton", torch.float16)
    finally:
        triton_common.set_autotune(os.environ.get("ICL_MSR_TRITON_AUTOTUNE", "1") != "0")


@cuda
@pytest.mark.usefixtures("default_tiles")
@pytest.mark.parametrize("combine", ["concat", "add", "none"])
def test_cuda_distributed_columns(combine):
    assert_contrastive_matches_reference(torch.float32, combine, "cuda", rows=130, dim=70,
                                         ranks=3, rank=2)


@cuda
@pytest.mark.usefixtures("default_tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_cuda_deterministic(dtype):
    inputs = cast(make_inputs(n=300, d=128, k=50, seed=6, device="cuda"), dtype)
    first = loss_and_grads(inputs, "triton")
    second = loss_and_grads(inputs, "triton")
    for x, y in zip(first[0], second[0]):
        assert torch.equal(x, y)
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


@cuda
@pytest.mark.usefixtures("default_tiles")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("prior_mode,combine", PAIRS)
def test_cuda_symmetric_sweep_matches_reference(symmetric_sweep, dtype, prior_mode, combine):
    # 2N = 600: 19 row blocks, the last partial; D = 64. (The symmetric sweep takes 2-byte
    # features on the GPU; the interpreter suite runs it in float64 and float32.)
    assert_matches_reference(make_inputs(n=300, d=64, k=9, seed=9, device="cuda"), "triton",
                             dtype, prior_mode=prior_mode, combine=combine)
    assert symmetric_sweep.count("backward") == 1


@cuda
@pytest.mark.usefixtures("default_tiles")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_cuda_symmetric_sweep_many_programs(symmetric_sweep, dtype):
    """2N = 16384: 512 row blocks, thousands of programs in flight, each column block's buffer
    added to by up to 511 of them under its turn counter. Bit-identical run to run, and as close
    to the float64 reference as the full sweep."""
    from icl_msr_kernels.kernels import ops as kernel_ops

    gen = torch.Generator().manual_seed(8)
    a64, b64 = (rownorm(torch.randn(16384, 128, generator=gen, dtype=torch.float64)) / 0.3
                for _ in range(2))
    kernels = load_backend("triton")

    def run(a_master, b_master, backend_kernels, dt):
        a_in = a_master.to("cuda", dt).requires_grad_(True)
        b_in = b_master.to("cuda", dt).requires_grad_(True)
        base, inter = backend_kernels.contrastive(a_in, b_in, None, None, 0, "concat")
        grads = torch.autograd.grad(base + 0.7 * inter, (a_in, b_in))
        return [t.detach().double().cpu() for t in (base, inter, *grads)]

    first, second = run(a64, b64, kernels, dtype), run(a64, b64, kernels, dtype)
    assert symmetric_sweep.count("backward") == 2
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    truth = run(a64, b64, load_backend("reference"), torch.float64)
    kernel_ops.set_sweep("full")
    full = run(a64, b64, kernels, dtype)
    for got, other, want in zip(first, full, truth):
        scale = want.abs().max().clamp_min(1.0)
        assert (got - want).abs().max() / scale <= 2 * (other - want).abs().max() / scale + 1e-3


@cuda
@pytest.mark.slow  # inductor compilation
@pytest.mark.usefixtures("default_tiles")
def test_cuda_compile_fullgraph():
    inputs = cast(make_inputs(n=64, d=96, k=16, seed=7, device="cuda"), torch.float32)

    def fn(z1, z2, prototypes, prior_logits, temperature):
        return icl_msr_loss(z1, z2, prototypes, prior_logits, temperature=temperature,
                            backend="triton")

    compiled = torch.compile(fn, fullgraph=True)
    args = [inputs[n] for n in GRAD_NAMES]
    eager = fn(*args)
    eager_grads = torch.autograd.grad(eager, args)
    got = compiled(*args)
    got_grads = torch.autograd.grad(got, args)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    for g, e in zip(got_grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@cuda
def test_cuda_auto_prefers_a_fused_backend():
    assert resolve_backend("auto", torch.device("cuda")).name in ("cuda", "triton")


@cuda
@pytest.mark.usefixtures("default_tiles")
@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_cuda_tensor_core_fp32(precision):
    from icl_msr_kernels.kernels import triton_common

    inputs = make_inputs(n=128, d=64, k=16, device="cuda")
    try:
        triton_common.set_fp32_precision(precision)
        parts, grads = loss_and_grads(cast(inputs, torch.float32), "triton")
    finally:
        triton_common.set_fp32_precision("ieee")
    ref_parts, ref_grads = loss_and_grads(inputs, "reference")
    loss_err, grad_err = relative_errors(parts, grads, ref_parts, ref_grads)
    assert loss_err <= 1e-2 and max(grad_err.values()) <= 5e-2


_DETERMINISM_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from helpers import cast, loss_and_grads, make_inputs
parts, grads = loss_and_grads(cast(make_inputs(n=9, d=37, k=19, seed=4), torch.float32), "triton")
torch.save((parts, grads), sys.argv[1])
"""


@pytest.mark.skipif(INTERPRETED or not HAS_TRITON,
                    reason="spawns its own interpreter processes (needs triton)")
def test_fixed_tiles_bit_identical_across_processes(tmp_path):
    """Two processes, the same inputs: the same bits (fixed tiles; no atomics anywhere)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "ICL_MSR_TRITON_AUTOTUNE": "0"}
    tests = str(Path(__file__).resolve().parent)
    results = []
    for k in range(2):
        out = tmp_path / f"run{k}.pt"
        proc = subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT, str(out), tests],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(torch.load(out))
    (parts0, grads0), (parts1, grads1) = results
    assert all(torch.equal(p, q) for p, q in zip(parts0, parts1))
    assert all(torch.equal(grads0[n], grads1[n]) for n in grads0)


@cuda
@pytest.mark.usefixtures("default_tiles")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_no_host_sync_in_a_training_step(backend):
    """Forward and backward with a learnable temperature never synchronise with the host."""
    inputs = make_inputs(n=64, d=32, k=8, seed=12, device="cuda")
    inputs = cast(inputs, torch.float32)
    icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"], inputs["prior_logits"],
                 temperature=inputs["temperature"], backend=backend).backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"],
                            inputs["prior_logits"], temperature=inputs["temperature"],
                            backend=backend, gather_distributed=True)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRETED
                         and torch.cuda.device_count() >= 2), reason="needs two CUDA GPUs")
@pytest.mark.usefixtures("default_tiles")
def test_cuda_runs_on_the_tensors_device_not_the_current_one():
    inputs = make_inputs(n=20, d=16, k=5, seed=13, device="cuda:1")
    with torch.cuda.device(0):
        assert_matches_reference(inputs, "triton", torch.float32)
