"""Memory-bank (MoCo) negatives: the reference against the formula, the fused backends against
the reference, the modules' bank semantics, and the errors (docs/math.md §7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import icl_msr_kernels as icl
from icl_msr_kernels import ICLMSRLoss, ICLMSRRegularizer, icl_msr_loss, icl_msr_regularizer, ntxent_loss

from helpers import PAIRS, TOLERANCES, make_inputs, relative_errors

FUSED = [b for b in ("cpp",) if b in icl.available_backends()]


def _bank(q, d, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(q, d, generator=gen, dtype=dtype), dim=1)


def test_reference_is_moco_cross_entropy():
    """lightly's formula: cross-entropy over [positive, Q bank logits], positive first."""
    inputs = make_inputs(5, 6, 3, requires_grad=())
    z1, z2 = inputs["z1"], inputs["z2"]
    bank = _bank(11, 6)
    x, y = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    logits = torch.cat([(x * y).sum(1, keepdim=True), x @ bank.T], dim=1) / 0.2
    want = F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    got = ntxent_loss(z1, z2, temperature=0.2, bank=bank, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def _parts_and_grads(inputs, bank, backend, fn, **kwargs):
    leaves = {n: v for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    if fn == "loss":
        parts = icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"],
                             inputs["prior_logits"], temperature=inputs["temperature"],
                             bank=bank, backend=backend, return_parts=True, **kwargs)
        total = parts[0] + 0.3 * parts[1] + 0.7 * parts[2]
    elif fn == "regularizer":
        parts = (icl_msr_regularizer(inputs["z1"], inputs["z2"], inputs["prototypes"],
                                     inputs["prior_logits"], temperature=inputs["temperature"],
                                     bank=bank, backend=backend, **kwargs),)
        total = parts[0]
    else:
        parts = (ntxent_loss(inputs["z1"], inputs["z2"], temperature=inputs["temperature"],
                             bank=bank, backend=backend),)
        total = parts[0]
        leaves = {n: leaves[n] for n in ("z1", "z2", "temperature")}
    grads = torch.autograd.grad(total, list(leaves.values()))
    return [p.detach() for p in parts], dict(zip(leaves, grads))


def _cast(inputs, dtype):
    return {n: (v.detach().to(dtype).requires_grad_(v.requires_grad)
                if isinstance(v, torch.Tensor) else v) for n, v in inputs.items()}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("prior_mode,combine", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fn", ["loss", "regularizer", "ntxent"])
def test_fused_bank_mode_matches_reference(backend, prior_mode, combine, dtype, fn):
    # 700 anchors and Q = 1037 negatives: several row and column blocks, neither a multiple of
    # any tile.
    inputs = make_inputs(700, 19, 7, seed=1)
    bank = _bank(1037, 19, seed=2)
    kwargs = {} if fn == "ntxent" else dict(prior_mode=prior_mode, combine=combine, gamma=0.6)
    ref_parts, ref_grads = _parts_and_grads(inputs, bank, "reference", fn, **kwargs)
    parts, grads = _parts_and_grads(_cast(inputs, dtype), bank.to(dtype), backend, fn, **kwargs)
    loss_tol, grad_tol = TOLERANCES[dtype]
    loss_err, grad_err = relative_errors(parts, grads, ref_parts, ref_grads)
    assert loss_err <= loss_tol, loss_err
    for name, err in grad_err.items():
        assert grads[name].dtype == dtype
        assert err <= grad_tol, (name, err)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("n,q", [(1, 1), (1, 5), (3, 1)])
def test_small_banks_and_batches(backend, n, q):
    inputs = make_inputs(n, 4, 2, seed=n + q)
    bank = _bank(q, 4, seed=q)
    ref_parts, ref_grads = _parts_and_grads(inputs, bank, "reference", "loss")
    parts, grads = _parts_and_grads(inputs, bank, backend, "loss")
    loss_err, grad_err = relative_errors(parts, grads, ref_parts, ref_grads)
    assert loss_err <= 1e-10 and max(grad_err.values()) <= 1e-9
    assert all(p >= 0 for p in parts)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_one_sample_without_bank_is_exactly_zero(backend):
    inputs = make_inputs(1, 5, 3, seed=4)
    for dtype in (torch.float64, torch.float32):
        z1, z2, p = (inputs[k].detach().to(dtype) for k in ("z1", "z2", "prototypes"))
        assert ntxent_loss(z1, z2, backend=backend).item() == 0.0
        for combine in ("concat", "add"):
            parts = icl_msr_loss(z1, z2, p, combine=combine, backend=backend, return_parts=True)
            assert all(part.item() == 0.0 for part in parts), (dtype, combine, parts)


def test_icl_msr_loss_module_owns_a_bank_and_enqueues_keys():
    torch.manual_seed(0)
    criterion = ICLMSRLoss(6, num_prototypes=4, memory_bank_size=(9, 6), learnable_prior=True)
    bank = criterion.memory_bank.bank.clone()
    q, k = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    loss = criterion(q, k)
    want = icl_msr_loss(q, k, criterion.prototypes, criterion.prior_logits, temperature=0.07,
                        bank=bank)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    loss.backward()  # the bank was changed in place after the loss: the graph must not mind
    assert criterion.prototypes.grad.abs().sum() > 0 and criterion.prior_logits.grad.abs().sum() > 0
    torch.testing.assert_close(criterion.memory_bank.bank[:4], F.normalize(k, dim=1))
    assert int(criterion.memory_bank.bank_ptr) == 4
    # The regulariser alone is the interventional part of the same loss, bank included.
    reg = ICLMSRRegularizer(6, num_prototypes=4, memory_bank_size=(9, 6))
    reg.load_state_dict(criterion.state_dict(), strict=False)
    reg.memory_bank.bank.copy_(bank)
    _, _, inter = icl_msr_loss(q, k, reg.prototypes, reg.prior_logits, temperature=0.07, bank=bank,
                               return_parts=True)
    torch.testing.assert_close(reg(q, k), inter, rtol=1e-6, atol=0)


def test_regularizer_is_the_interventional_term():
    inputs = make_inputs(6, 5, 3, requires_grad=())
    for combine in ("concat", "add"):
        for bank in (None, _bank(7, 5)):
            args = (inputs["z1"], inputs["z2"], inputs["prototypes"], inputs["prior_logits"])
            _, _, inter = icl_msr_loss(*args, combine=combine, bank=bank, return_parts=True)
            for backend in ["reference", *FUSED]:
                got = icl_msr_regularizer(*args, combine=combine, bank=bank, backend=backend)
                torch.testing.assert_close(got, inter, rtol=1e-10, atol=0)


Z = torch.randn(4, 3)


@pytest.mark.parametrize("bank,kwargs,error,pattern", [
    ([[1.0, 0, 0]], {}, TypeError, "bank must be None or a torch.Tensor"),
    (torch.randn(5, 4), {}, ValueError, r"bank must have shape \(Q, 3\)"),
    (torch.randn(5), {}, ValueError, r"bank must have shape \(Q, 3\)"),
    (torch.randn(0, 3), {}, ValueError, "at least one row"),
    (torch.ones(5, 3, dtype=torch.long), {}, TypeError, "bank must have a floating dtype"),
    (torch.randn(5, 3, device="meta"), {}, ValueError, "bank must be on the embeddings' device"),
    (torch.randn(5, 3), dict(gather_distributed=True), ValueError, "gather_distributed"),
])
def test_bad_banks(bank, kwargs, error, pattern):
    for fn in (lambda: ntxent_loss(Z, Z, bank=bank, **kwargs),
               lambda: icl_msr_loss(Z, Z, torch.randn(2, 3), bank=bank, **kwargs),
               lambda: icl_msr_regularizer(Z, Z, torch.randn(2, 3), bank=bank, **kwargs)):
        with pytest.raises(error, match=pattern):
            fn()


@pytest.mark.parametrize("size,error", [((4, 0), ValueError), ((-1, 3), ValueError),
                                        ((1, 2, 3), ValueError), ("big", TypeError),
                                        (2.5, TypeError), (-3, ValueError)])
def test_bad_bank_sizes(size, error):
    with pytest.raises(error, match="memory_bank_size"):
        icl.NTXentLoss(memory_bank_size=size)
    with pytest.raises(error, match="memory_bank_size"):
        ICLMSRRegularizer(3, memory_bank_size=size)
