"""Our NTXentLoss against lightly's own (the library it replaces): values, gradients, bank."""

from __future__ import annotations

import os

import pytest
import torch

import icl_msr_kernels as icl

lightly_loss = pytest.importorskip("lightly.loss", reason="lightly is not importable (it is in "
                                   "requirements-dev.txt; install the development requirements)")

BACKENDS = [b for b in ("reference", "cpp") if b in icl.available_backends()]


def _views(n, d, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=gen, dtype=dtype).requires_grad_() for _ in range(2)]


def _loss_and_grads(loss_fn, out0, out1):
    out0, out1 = (t.detach().clone().requires_grad_() for t in (out0, out1))
    loss = loss_fn(out0, out1)
    return loss.detach(), torch.autograd.grad(loss, (out0, out1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,temperature", [(1, 3, 0.5), (7, 16, 0.1), (64, 32, 0.5)])
def test_without_bank_equals_lightly(backend, n, d, temperature):
    out0, out1 = _views(n, d, seed=n)
    want, want_grads = _loss_and_grads(lightly_loss.NTXentLoss(temperature), out0, out1)
    got, grads = _loss_and_grads(icl.NTXentLoss(temperature, backend=backend), out0, out1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_distributed_without_process_group_equals_lightly(backend):
    out0, out1 = _views(5, 8, seed=1)
    want, _ = _loss_and_grads(lightly_loss.NTXentLoss(0.3, gather_distributed=True), out0, out1)
    got, _ = _loss_and_grads(icl.NTXentLoss(0.3, gather_distributed=True, backend=backend),
                             out0, out1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_bank_over_several_steps_equals_lightly(backend):
    # float32: lightly's float32 bank fails in einsum against float64 embeddings (ours casts it).
    dtype = torch.float32
    # Q = 10 rows and batches of 4: the third step overflows (lightly's rule: fill to the end,
    # drop the rest, back to 0), the fourth starts again at the top.
    q, d = 10, 6
    theirs = lightly_loss.NTXentLoss(0.2, memory_bank_size=(q, d))
    ours = icl.NTXentLoss(0.2, memory_bank_size=(q, d), backend=backend)
    ours.memory_bank.bank.copy_(theirs.memory_bank.bank)  # the same initial bank
    tol = dict(rtol=1e-5, atol=1e-6)
    for step in range(5):
        out0, out1 = (t.to(dtype) for t in _views(4, d, seed=10 + step))
        want, want_grads = _loss_and_grads(theirs, out0, out1)
        got, grads = _loss_and_grads(ours, out0, out1)
        torch.testing.assert_close(got.to(want.dtype), want, **tol, msg=f"step {step}")
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, **tol, msg=f"step {step}")
        torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank, rtol=0,
                                   atol=1e-6)
        assert int(ours.memory_bank.bank_ptr) == int(theirs.memory_bank.bank_ptr), step


def test_bank_works_with_float64_embeddings():
    loss = icl.NTXentLoss(memory_bank_size=(8, 3))
    out0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    value = loss(out0, torch.randn(4, 3, dtype=torch.float64))
    assert value.dtype == torch.float64 and loss.memory_bank.bank.dtype == torch.float32


def test_bank_is_not_updated_without_grad_and_not_saved():
    loss = icl.NTXentLoss(memory_bank_size=(8, 3))
    before = loss.memory_bank.bank.clone()
    out0, out1 = torch.randn(4, 3), torch.randn(4, 3)  # out0 does not require grad: evaluation
    loss(out0, out1)
    assert torch.equal(loss.memory_bank.bank, before) and int(loss.memory_bank.bank_ptr) == 0
    loss(out0.requires_grad_(), out1)
    assert torch.equal(loss.memory_bank.bank[:4], torch.nn.functional.normalize(out1, dim=1))
    assert int(loss.memory_bank.bank_ptr) == 4
    assert "memory_bank.bank" not in loss.state_dict()  # as lightly's, a non-persistent buffer
    torch.testing.assert_close(before.norm(dim=1), torch.ones(8))  # unit rows to start with


def test_int_bank_size_takes_its_width_from_the_first_batch():
    # lightly rejects a bare int; ours takes D from the first batch.
    with pytest.raises(ValueError):
        lightly_loss.NTXentLoss(memory_bank_size=16)
    loss = icl.NTXentLoss(memory_bank_size=16)
    loss(torch.randn(4, 5, requires_grad=True), torch.randn(4, 5))
    assert loss.memory_bank.bank.shape == (16, 5)
    with pytest.raises(ValueError, match="D=3"):
        loss(torch.randn(4, 3, requires_grad=True), torch.randn(4, 3))


def test_gather_distributed_needs_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    for make in (lambda: icl.NTXentLoss(gather_distributed=True),
                 lambda: icl.ICLMSRLoss(4, gather_distributed=True),
                 lambda: lightly_loss.NTXentLoss(gather_distributed=True)):
        with pytest.raises(ValueError, match="torch.distributed is not available"):
            make()


def test_negative_temperature_is_rejected_with_the_reason():
    lightly_loss.NTXentLoss(temperature=-0.5)  # lightly accepts it
    with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
        icl.NTXentLoss(temperature=-0.5)


def test_under_two_gloo_ranks_equals_lightly(tmp_path):
    from test_distributed import run_ranks

    ranks = run_ranks(2, "lightly", tmp_path, backends=BACKENDS)
    for rank, results in enumerate(ranks):
        for (backend, with_bank), (got, want) in results.items():
            where = f"rank {rank} {backend} bank={with_bank}"
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6, msg=where)
            for g, w in zip(got[1], want[1]):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=where)
            if with_bank:  # the enqueued rows of both ranks, in rank order
                torch.testing.assert_close(got[2], want[2], rtol=0, atol=0, msg=where)


if os.environ.get("ICL_MSR_LIGHTLY_VERBOSE"):  # pragma: no cover - a debugging aid
    print(lightly_loss.__file__)
