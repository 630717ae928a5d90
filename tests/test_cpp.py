"""Backend "cpp" (the fused C++ CPU kernels): what is specific to it — its tile schedule and
one-exponential fast paths, the rectangular ops, the extension's loading, opcheck,
torch.compile. What every backend must hold is tests/test_conformance.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import icl_msr_kernels as icl
from icl_msr_kernels import icl_msr_loss, ntxent_loss
from icl_msr_kernels.reference import contrastive_losses

from helpers import GRAD_NAMES, PAIRS, assert_matches_reference, make_inputs

_REASON = icl.backend_status()["cpp"]
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"backend 'cpp' unavailable: {_REASON}")


def _ops():
    return torch.ops.icl_msr


# --- agreement with the reference (docs/math.md §5) --------------------------------------------------

@pytest.mark.parametrize("prior_mode,combine", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("prior,temperature_tensor", [(True, True), (False, False)])
def test_matches_reference(prior_mode, combine, dtype, prior, temperature_tensor):
    # 2N = 600 rows: 4 row blocks of 150, so the round-robin tile schedule, the pair tiles and
    # their transposes all take part; D = 37 fits no vector width.
    inputs = make_inputs(300, 37, 7, seed=1, prior=prior, temperature_tensor=temperature_tensor)
    assert_matches_reference(inputs, "cpp", dtype, prior_mode=prior_mode, combine=combine,
                             gamma=0.7, lam=0.4)


@pytest.mark.parametrize("dtype,tau", [(torch.float64, 5e-4), (torch.float32, 2e-3)])
def test_extreme_logit_ranges_take_the_exact_paths(dtype, tau):
    # The kernels use one exponential per logit when a tile's logits (forward) or its rows' and
    # columns' log-sum-exps (backward) lie within a range the dtype's exp can hold (64 in float32,
    # 600 in float64), else two. Here half the samples have a near-duplicate second view and the
    # others do not, so the rows' largest logits and log-sum-exps differ by ~1/(2 tau): beyond that
    # range, and the exact paths must give the same results.
    inputs = make_inputs(300, 37, 7, seed=11)
    z1, z2 = inputs["z1"].detach(), inputs["z2"].detach().clone()
    z2[:150] = z1[:150] + 0.01 * z2[:150]
    inputs["z2"] = z2.requires_grad_()
    inputs["temperature"] = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    assert_matches_reference(inputs, "cpp", dtype)


@pytest.mark.parametrize("requires_grad", [("z1",), ("z2", "temperature"), ("prototypes",),
                                           ("prior_logits",), ("temperature",), ()])
def test_only_some_inputs_require_grad(requires_grad):
    inputs = make_inputs(40, 6, 5, seed=3, requires_grad=requires_grad)
    assert_matches_reference(inputs, "cpp", torch.float64)


def test_ntxent_matches_reference():
    inputs = make_inputs(200, 12, 1, seed=6)
    z1, z2 = inputs["z1"], inputs["z2"]
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        ours = ntxent_loss(z1.to(dtype), z2.to(dtype), temperature=0.3, backend="cpp")
        ref = ntxent_loss(z1, z2, temperature=0.3, backend="reference")
        torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=0)
        grads = torch.autograd.grad(ours, [z1, z2])
        ref_grads = torch.autograd.grad(ref, [z1, z2])
        for g, r in zip(grads, ref_grads):
            assert (g - r).abs().max() <= 10 * tol * r.abs().max()


@pytest.mark.parametrize("combine", ["none", "concat", "add"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_rectangular_columns_match_reference(combine, dtype, tol):
    """Distributed negatives: rows of one rank against the columns of three (row_offset > 0);
    2 row blocks x 3 column blocks."""
    gen = torch.Generator().manual_seed(7)
    rows, cols, offset = 600, 1800, 600

    def features(n, d):
        return torch.randn(n, d, generator=gen, dtype=torch.float64)

    a_cols, b_cols = features(cols, 11), features(cols, 5)
    a, b = a_cols[offset:offset + rows].clone(), b_cols[offset:offset + rows].clone()
    if combine == "none":
        b, b_cols = None, None
    masters = [None if t is None else t.requires_grad_() for t in (a, b, a_cols, b_cols)]
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in masters]
    ours = icl.backends.load_backend("cpp").contrastive(*leaves, offset, combine)
    ref = contrastive_losses(*masters, offset, combine)
    for o, r in zip(ours, ref):
        assert abs(o.item() - r.item()) <= tol * max(abs(r.item()), 1e-30)
    weights = (0.6, 1.3)
    grads = torch.autograd.grad(sum(w * o for w, o in zip(weights, ours)),
                                [t for t in leaves if t is not None])
    ref_grads = torch.autograd.grad(sum(w * r for w, r in zip(weights, ref)),
                                    [t for t in masters if t is not None])
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert (g.double() - r).abs().max() <= 10 * tol * r.abs().max()


# --- the constant memory bank: row gradients accumulated in the forward -------------------------

def _bank_operands(combine, *, rows=600, cols=1100, seed=13, outlier=None, column_grads=False):
    """Memory-bank operands (rows anchors, cols bank columns, explicit positive logits) in
    float64, the rows (and with column_grads the columns) requiring grad. With `outlier`, one
    bank row of that norm along feature 0 and the anchors of the second row block orthogonal to
    it: their logits lie far below the Cauchy-Schwarz bound that the row sweep takes as its
    reference."""
    gen = torch.Generator().manual_seed(seed)

    def features(n, d, scale=1.0):
        return scale * torch.randn(n, d, generator=gen, dtype=torch.float64)

    a, a_cols = features(rows, 11, 0.5), features(cols, 11, 0.5)
    b, b_cols = features(rows, 5, 0.5), features(cols, 5, 0.5)
    if outlier is not None:
        a_cols[7] = 0
        a_cols[7, 0] = outlier
        a[rows // 2:, 0] = 0
    positives = features(2, rows)
    if combine == "none":
        b = b_cols = None
    wanted = (0, 1, 2, 3, 4) if column_grads else (0, 1, 4)
    return [None if t is None else t.requires_grad_(i in wanted)
            for i, t in enumerate((a, b, a_cols, b_cols, positives))]


def _check_bank_rows(masters, combine, dtype, tol):
    a, b, a_cols, b_cols, positives = masters
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)
              for t in masters]
    ours = icl.backends.load_backend("cpp").contrastive(*leaves[:4], 0, combine, leaves[4])
    assert "contrastive_rows_forward" in type(ours[0].grad_fn.next_functions[0][0]).__name__
    ref = contrastive_losses(a, b, a_cols, b_cols, 0, combine, positives)
    for o, r in zip(ours, ref):
        assert abs(o.item() - r.item()) <= tol * max(abs(r.item()), 1e-30), (o, r)
    weights = (0.6, 1.3)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(sum(w * o for w, o in zip(weights, ours)), wanted)
    ref_grads = torch.autograd.grad(sum(w * r for w, r in zip(weights, ref)),
                                    [t for t in masters if t is not None and t.requires_grad])
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert (g.double() - r).abs().max() <= 10 * tol * r.abs().max()


@pytest.mark.parametrize("column_grads", [False, True], ids=["constant", "column-grads"])
@pytest.mark.parametrize("combine", ["none", "concat", "add"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_bank_rows_forward_matches_reference(combine, dtype, tol, column_grads):
    """2 row blocks x 3 column blocks, Q not a block multiple; the columns' gradients from the
    backward's column sweep."""
    _check_bank_rows(_bank_operands(combine, column_grads=column_grads), combine, dtype, tol)


@pytest.mark.parametrize("combine", ["none", "concat"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_constant_bank_row_blocks_far_below_the_bound_are_redone_exactly(combine, dtype, tol):
    # The second row block's logits lie ~outlier/2 below their reference: beyond the float64
    # exponent range at 3000 (its sums would be 0), so only the exact redo gives its statistics;
    # the first block stays on the bounded sweep.
    masters = _bank_operands(combine, outlier=3000.0 if dtype == torch.float64 else 300.0)
    _check_bank_rows(masters, combine, dtype, tol)


def test_bank_takes_the_rows_forward_only_when_it_pays():
    z1, z2 = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    bank = torch.nn.functional.normalize(torch.randn(9, 4), dim=1)

    def op_of(loss):
        return type(loss.grad_fn.next_functions[0][0]).__name__

    assert "contrastive_rows_forward" in op_of(ntxent_loss(z1, z2, bank=bank, backend="cpp"))
    learnable = torch.tensor(0.5, requires_grad=True)  # the bank columns then need gradients
    loss = ntxent_loss(z1, z2, bank=bank, temperature=learnable, backend="cpp")
    assert "contrastive_rows_forward" in op_of(loss)
    constant = ntxent_loss(z1.detach(), z2.detach(), bank=bank, backend="cpp")
    assert constant.grad_fn is None  # nothing to differentiate: the plain forward
    with torch.no_grad():
        plain = ntxent_loss(z1, z2, bank=bank, backend="cpp")
    with_rows = ntxent_loss(z1, z2, bank=bank, backend="cpp")
    torch.testing.assert_close(plain, with_rows.detach(), rtol=1e-6, atol=0)


def test_rows_forward_refuses_double_backward():
    a, b, a_cols, b_cols, positives = _bank_operands("add", rows=8, cols=5, column_grads=True)
    losses, *_ = _ops().contrastive_rows_forward(a, b, a_cols, b_cols, positives, "add")
    (grad,) = torch.autograd.grad(losses.sum(), [a], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(grad.square().sum(), [b_cols])


def test_auto_picks_cpp_for_cpu_tensors():
    assert icl.backends.resolve_backend("auto", torch.device("cpu")).name == "cpp"


def test_double_backward_raises_a_clear_error():
    inputs = make_inputs(8, 4, 3)
    loss = icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"],
                        inputs["prior_logits"], backend="cpp")
    (grad,) = torch.autograd.grad(loss, [inputs["z1"]], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(grad.square().sum(), [inputs["prototypes"]])


def test_op_argument_checks():
    a = torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="even number of rows"):
        _ops().contrastive_forward(a, None, None, None, None, 0, "none")
    with pytest.raises(RuntimeError, match="b must be given"):
        _ops().contrastive_forward(a[:4], None, None, None, None, 0, "concat")
    with pytest.raises(RuntimeError, match="row_offset must place"):
        _ops().contrastive_forward(a[:4], None, a, None, None, 2, "none")
    with pytest.raises(RuntimeError, match="combine must be"):
        _ops().contrastive_forward(a[:4], None, None, None, None, 0, "cat")
    with pytest.raises(RuntimeError, match="a_cols must be given with positive_logits"):
        _ops().contrastive_forward(a, None, None, None, torch.zeros(2, 5), 0, "none")
    with pytest.raises(RuntimeError, match="positive_logits must have 5"):
        _ops().contrastive_forward(a, None, a, None, torch.zeros(2, 4), 0, "none")
    rows, lse, bank = torch.zeros(2, 5, 3), torch.zeros(2, 5), torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="a_rows must have 1 terms"):
        _ops().contrastive_rows_backward(torch.ones(2), rows, torch.zeros(0), a, None, bank,
                                         None, lse, lse, "none", False)
    with pytest.raises(RuntimeError, match="b_rows must have 5 rows"):
        _ops().contrastive_rows_backward(torch.ones(2), rows, torch.zeros(4, 3), a, a, bank,
                                         bank, lse, lse, "concat", True)
    with pytest.raises(RuntimeError, match="a_cols must have 3 features"):
        _ops().contrastive_rows_forward(a, None, torch.zeros(4, 2), None, torch.zeros(2, 5),
                                        "none")
    with pytest.raises(RuntimeError, match="prior_mode must be"):
        _ops().attention_forward(a, a, torch.zeros(5), 1.0, "log")


# --- the torch.library contract: opcheck, torch.compile --------------------------------------

def _op_samples():
    """(op, args) for every op: square and rectangular, each int mode and prior mode, float64,
    float32 and bfloat16 (whose outputs and row statistics are float32)."""
    gen = torch.Generator().manual_seed(9)

    def t(*shape, dtype):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    ops = _ops()
    samples = []
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x, prototypes, log_prior = t(10, 6, dtype=dtype), t(4, 6, dtype=dtype), t(4, dtype=dtype)
        for prior_mode in ("logit", "mult"):
            args = (x.detach().requires_grad_(), prototypes.detach().requires_grad_(),
                    log_prior.detach().requires_grad_(), 2.5, prior_mode)
            samples.append((ops.attention_forward.default, args))
            c, lse = ops.attention_forward(x, prototypes, log_prior, 2.5, prior_mode)
            samples.append((ops.attention_backward.default,
                            (t(10, 6, dtype=dtype), x, prototypes, log_prior, c, lse, 2.5,
                             prior_mode)))
        for combine in ("none", "concat", "add"):
            with_b = combine != "none"
            a, b = t(8, 5, dtype=dtype), t(8, 3, dtype=dtype) if with_b else None
            a_cols = torch.cat([t(4, 5, dtype=dtype), a, t(6, 5, dtype=dtype)])
            b_cols = (torch.cat([t(4, 3, dtype=dtype), b, t(6, 3, dtype=dtype)]) if with_b
                      else None)
            positives = t(2, 8, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            # in-batch square, distributed columns, memory bank (explicit positives)
            for cols, pos, offset in (((None, None), None, 0), ((a_cols, b_cols), None, 4),
                                      ((a_cols, b_cols), positives, 0)):
                leaves = [None if v is None else v.detach().requires_grad_()
                          for v in (a, b, *cols, pos)]
                samples.append((ops.contrastive_forward.default, (*leaves, offset, combine)))
                _, lse = ops.contrastive_forward(a, b, *cols, pos, offset, combine)
                samples.append((ops.contrastive_backward.default,
                                (t(2, dtype=dtype), a, b, *cols, pos, lse, offset, combine,
                                 cols[0] is not None)))
            # the memory bank with the row gradients from the forward: a constant bank, and
            # one whose columns need gradients
            for columns_too in (False, True):
                leaves = [None if v is None else
                          v.detach().requires_grad_(columns_too or i not in (2, 3))
                          for i, v in enumerate((a, b, a_cols, b_cols, positives))]
                samples.append((ops.contrastive_rows_forward.default, (*leaves, combine)))
            _, lse, a_rows, b_rows = ops.contrastive_rows_forward(a, b, a_cols, b_cols,
                                                                  positives, combine)
            for column_grads in (False, True):
                samples.append((ops.contrastive_rows_backward.default,
                                (t(2, dtype=a_rows.dtype), a_rows, b_rows, a, b, a_cols, b_cols,
                                 positives, lse, combine, column_grads)))
    return samples


def test_opcheck_every_op():
    samples = _op_samples()
    assert {op.name() for op, _ in samples} == {f"icl_msr::{n}" for n in (
        "attention_forward", "attention_backward", "contrastive_forward", "contrastive_backward",
        "contrastive_rows_forward", "contrastive_rows_backward")}
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    inputs = make_inputs(20, 8, 5, seed=10)

    def step(z1, z2, prototypes, prior_logits, temperature):
        return icl_msr_loss(z1, z2, prototypes, prior_logits, temperature=temperature,
                            backend="cpp", return_parts=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [inputs[n] for n in GRAD_NAMES]
    ours = compiled(*leaves)
    eager = step(*leaves)
    for o, e in zip(ours, eager):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(ours[0], leaves)
    eager_grads = torch.autograd.grad(eager[0], leaves)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_torch_compile_fullgraph_constant_bank():
    """The constant-bank path (row gradients from the forward) traced whole, against eager."""
    inputs = make_inputs(20, 8, 5, seed=12)
    bank = torch.nn.functional.normalize(torch.randn(37, 8, dtype=torch.float64), dim=1)

    def step(z1, z2):
        return (ntxent_loss(z1, z2, temperature=0.3, backend="cpp", bank=bank),
                icl_msr_loss(z1, z2, inputs["prototypes"].detach(), temperature=0.3,
                             backend="cpp", bank=bank))

    leaves = [inputs["z1"], inputs["z2"]]
    eager = step(*leaves)
    assert "contrastive_rows_forward" in type(eager[0].grad_fn.next_functions[0][0]).__name__
    ours = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves)
    for o, e in zip(ours, eager):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=0)
        grads = torch.autograd.grad(o, leaves, retain_graph=True)
        for g, want in zip(grads, torch.autograd.grad(e, leaves, retain_graph=True)):
            torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


def _run_fresh(script: str) -> None:
    """Runs `script` in a new interpreter (nothing loaded yet); it prints "ok" when it passes."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_first_call_inside_torch_compile():
    # The backend is loaded by the first loss call, which torch.compile then traces.
    _run_fresh("""
        import torch
        from icl_msr_kernels import icl_msr_loss
        z1, z2 = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4)
        prototypes = torch.randn(3, 4, requires_grad=True)
        step = torch.compile(lambda *t: icl_msr_loss(*t, backend="cpp"), fullgraph=True,
                             backend="aot_eager")
        step(z1, z2, prototypes).backward()
        print("ok")
    """)


def test_status_says_why_when_the_extension_is_not_built():
    # A fresh interpreter in which the built extension cannot be found.
    _run_fresh("""
        import importlib.util
        find_spec = importlib.util.find_spec
        importlib.util.find_spec = (
            lambda name, *a: None if name == "icl_msr_kernels._C" else find_spec(name, *a))
        import torch
        import icl_msr_kernels as icl
        reason = icl.backend_status()["cpp"]
        assert reason is not None and "not built" in reason, reason
        z = torch.randn(4, 3)
        icl.icl_msr_loss(z, z.flip(0), torch.randn(2, 3))  # auto falls back to the reference
        assert icl.backends.resolve_backend("auto", z.device).name == "reference"
        print("ok")
    """)


def test_library_alone_names_the_module_with_the_fake_implementations():
    # Only the shared library is loaded: csrc/ops.cpp names the Python module that holds the
    # fake implementations, so torch's error says what to import (torch does not import it
    # itself), and once it is imported the ops run on fake tensors.
    _run_fresh("""
        import importlib, importlib.util
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        torch.ops.load_library(importlib.util.find_spec("icl_msr_kernels._C").origin)

        def call():
            with FakeTensorMode():
                return torch.ops.icl_msr.contrastive_forward(torch.empty(8, 4), None, None, None,
                                                             None, 0, "none")

        try:
            call()
            raise SystemExit("the fake implementation ran without its module")
        except Exception as err:
            chain = []
            while err is not None:  # torch wraps the message in another exception
                chain.append(str(err))
                err = err.__cause__ or err.__context__
            assert any("icl_msr_kernels.kernels.extension" in m for m in chain), chain
        importlib.import_module("icl_msr_kernels.kernels.extension")
        losses, row_lse = call()
        assert losses.shape == (2,) and row_lse.shape == (2, 8)
        print("ok")
    """)
