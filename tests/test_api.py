"""Public API: the modules, NTXentLoss against the textbook formula, backends, bad input."""

import re

import pytest
import torch
import torch.nn.functional as F

import icl_msr_kernels as icl
from icl_msr_kernels import ICLMSRLoss, NTXentLoss, icl_msr_loss, ntxent_loss

from helpers import make_inputs


def textbook_ntxent(out0, out1, temperature):
    """SimCLR NT-Xent as lightly writes it: cross-entropy over [positive, 2N-2 negatives]."""
    z = F.normalize(torch.cat([out0, out1]), dim=1)
    n = out0.shape[0]
    sim = z @ z.T / temperature
    losses = []
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        negatives = [sim[a, b] for b in range(2 * n) if b not in (a, pos)]
        logits = torch.stack([sim[a, pos], *negatives])
        losses.append(F.cross_entropy(logits[None], torch.zeros(1, dtype=torch.long)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("n,d", [(1, 3), (5, 4), (8, 16)])
def test_ntxent_matches_textbook(n, d):
    gen = torch.Generator().manual_seed(n)
    out0 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    out1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    want = textbook_ntxent(out0, out1, 0.3)
    torch.testing.assert_close(NTXentLoss(temperature=0.3)(out0, out1), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(ntxent_loss(out0, out1, temperature=0.3), want, rtol=1e-12, atol=0)


def test_ntxent_is_the_base_term():
    inputs = make_inputs(requires_grad=())
    _, base, _ = icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"], temperature=0.2,
                              return_parts=True)
    torch.testing.assert_close(ntxent_loss(inputs["z1"], inputs["z2"], temperature=0.2), base,
                               rtol=1e-13, atol=0)




def test_icl_msr_module_parameters_receive_gradients():
    torch.manual_seed(0)
    criterion = ICLMSRLoss(8, num_prototypes=5, learnable_prior=True, learnable_temperature=True)
    assert criterion.prototypes.shape == (5, 8)
    torch.testing.assert_close(criterion.prototypes.norm(dim=1), torch.ones(5))
    z1 = torch.randn(6, 8, requires_grad=True)
    z2 = torch.randn(6, 8)
    loss, base, inter = criterion(z1, z2, return_parts=True)
    loss.backward()
    for name, param in criterion.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert z1.grad.abs().sum() > 0
    want = icl_msr_loss(z1, z2, criterion.prototypes, criterion.prior_logits,
                        temperature=criterion.log_temperature.exp())
    torch.testing.assert_close(loss, want)


def test_icl_msr_module_fixed_prior_and_temperature_are_not_parameters():
    criterion = ICLMSRLoss(4, num_prototypes=3)
    assert [n for n, _ in criterion.named_parameters()] == ["prototypes"]
    assert "prior_logits" in dict(criterion.named_buffers())
    z1, z2 = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(criterion(z1, z2),
                               icl_msr_loss(z1, z2, criterion.prototypes, temperature=0.07))


def test_prototypes_in_another_dtype_get_their_own_gradient_dtype():
    z1 = torch.randn(3, 4, dtype=torch.float64)
    prototypes = torch.randn(2, 4, dtype=torch.float32, requires_grad=True)
    icl_msr_loss(z1, z1.flip(0), prototypes).backward()
    assert prototypes.grad.dtype == torch.float32


def test_backend_status_and_unavailable_backend_errors():
    status = icl.backend_status()
    assert set(status) == {"reference", "cpp", "triton", "cuda"}
    assert status["reference"] is None
    assert "reference" in icl.available_backends()
    inputs = make_inputs(requires_grad=())
    for name, reason in status.items():
        if reason is None:
            continue
        assert isinstance(reason, str) and reason
        with pytest.raises(icl.BackendUnavailable, match=re.escape(name)):
            icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"], backend=name)
    # "cuda" never runs on CPU tensors, whatever is built.
    with pytest.raises(icl.BackendUnavailable, match="cuda"):
        icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"], backend="cuda")


def test_auto_backend_agrees_with_reference():
    inputs = make_inputs(5, 6, 4, requires_grad=())
    auto = icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"], backend="auto")
    ref = icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"], backend="reference")
    torch.testing.assert_close(auto, ref, rtol=1e-10, atol=0)


# --- bad input: every failure names the argument -------------------------------------------

Z = torch.randn(4, 3)
P = torch.randn(5, 3)


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(z1=[[1.0]]), TypeError, "z1 must be a torch.Tensor"),
    (dict(z2=torch.randn(4)), ValueError, "z2 must be 2-D"),
    (dict(z1=torch.ones(4, 3, dtype=torch.long)), TypeError, "z1 must have a floating dtype"),
    (dict(z1=torch.randn(0, 3), z2=torch.randn(0, 3)), ValueError, "N >= 1"),
    (dict(z2=torch.randn(5, 3)), ValueError, "z1 and z2 must have the same shape"),
    (dict(z2=torch.randn(4, 3, dtype=torch.float64)), TypeError, "same dtype"),
    (dict(z2=torch.randn(4, 3, device="meta")), ValueError, "same device"),
    (dict(prototypes=None), TypeError, "prototypes must be a torch.Tensor"),
    (dict(prototypes=torch.randn(5, 4)), ValueError, r"prototypes must have shape \(K, 3\)"),
    (dict(prototypes=torch.randn(0, 3)), ValueError, "prototypes must have shape"),
    (dict(prototypes=torch.ones(5, 3, dtype=torch.int32)), TypeError, "prototypes must have a floating"),
    (dict(prior_logits=torch.randn(4)), ValueError, r"prior_logits must have shape \(5,\)"),
    (dict(prior_logits=[0.0] * 5), TypeError, "prior_logits must be None or a torch.Tensor"),
    (dict(prior_logits=torch.zeros(5, dtype=torch.long)), TypeError, "prior_logits must have a floating"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite float > 0"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="0.1"), TypeError, "temperature must be a float"),
    (dict(temperature=torch.tensor([0.1])), ValueError, "temperature must be a float or a 0-d"),
    (dict(temperature=torch.tensor(1)), TypeError, "temperature must have a floating dtype"),
    (dict(attn_temperature=0), ValueError, "attn_temperature must be a finite float > 0"),
    (dict(gamma=-0.1), ValueError, "gamma must be a finite float >= 0"),
    (dict(gamma=True), TypeError, "gamma must be a float"),
    (dict(lam=float("inf")), ValueError, "lam must be a finite float >= 0"),
    (dict(prior_mode="log"), ValueError, "prior_mode must be one of 'logit', 'mult'"),
    (dict(combine="cat"), ValueError, "combine must be one of 'concat', 'add'"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(gather_distributed=1), TypeError, "gather_distributed must be a bool"),
    (dict(return_parts="yes"), TypeError, "return_parts must be a bool"),
])
def test_icl_msr_loss_bad_input(kwargs, error, pattern):
    args = dict(z1=Z, z2=Z.flip(0), prototypes=P, prior_logits=None)
    args.update(kwargs)
    z1, z2, prototypes, prior = (args.pop(k) for k in ("z1", "z2", "prototypes", "prior_logits"))
    with pytest.raises(error, match=pattern):
        icl_msr_loss(z1, z2, prototypes, prior, **args)


def test_prior_on_another_device_is_rejected():
    with pytest.raises(ValueError, match="prior_logits must be on the prototypes' device"):
        icl_msr_loss(Z, Z, P, torch.zeros(5, device="meta"))


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(backend="tpu"), ValueError, "backend"),
    (dict(gather_distributed="no"), TypeError, "gather_distributed"),
])
def test_ntxent_bad_input(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ntxent_loss(Z, Z, **kwargs)
    with pytest.raises(error, match=pattern):
        NTXentLoss(**kwargs)


def test_ntxent_module_names_lightly_arguments():
    with pytest.raises(ValueError, match="out0 and out1 must have the same shape"):
        NTXentLoss()(torch.randn(3, 2), torch.randn(4, 2))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(dim=0), "dim must be an int >= 1"),
    (dict(dim=4, num_prototypes=0), "num_prototypes must be an int >= 1"),
    (dict(dim=4, temperature=0), "temperature"),
    (dict(dim=4, prior_mode="x"), "prior_mode"),
    (dict(dim=4, combine="x"), "combine"),
    (dict(dim=4, backend="x"), "backend"),
])
def test_icl_msr_module_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ICLMSRLoss(**kwargs)


def test_temperature_tensor_is_never_read_on_the_host(monkeypatch):
    """Reading a tensor's value (item, float, tolist) would synchronise with its device in every
    training step: a step with a learnable temperature, with and without gathering, reads none."""
    inputs = make_inputs(6, 5, 3, seed=2)

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    for backend in [b for b in ("reference", "cpp") if b in icl.available_backends()]:
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "__float__", "__bool__"):
                patch.setattr(torch.Tensor, name, refuse)
            loss = icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"],
                                inputs["prior_logits"], temperature=inputs["temperature"],
                                backend=backend, gather_distributed=True)
            loss.backward()
        assert inputs["temperature"].grad is not None
        inputs["temperature"].grad = None


def test_auto_warns_once_when_it_falls_back_to_the_reference(monkeypatch):
    from icl_msr_kernels import backends

    monkeypatch.setattr(backends, "_warned_fallback", set())
    monkeypatch.setitem(backends._cache, "cpp", icl.BackendUnavailable("not built (test)"))
    z = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="falls back to the pure-PyTorch reference"):
        ntxent_loss(z, z.flip(0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        ntxent_loss(z, z.flip(0))


def test_sweep_option_is_checked(monkeypatch):
    from icl_msr_kernels.kernels import ops as kernel_ops

    before = kernel_ops.get_sweep()
    with pytest.raises(ValueError, match="sweep must be one of 'full', 'symmetric'"):
        kernel_ops.set_sweep("pairs")
    assert kernel_ops.get_sweep() == before
    monkeypatch.setattr(kernel_ops, "_sweep", "half")  # as a bad ICL_MSR_SWEEP leaves it
    with pytest.raises(ValueError, match="ICL_MSR_SWEEP must be one of full, symmetric"):
        kernel_ops.get_sweep()
