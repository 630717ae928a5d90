"""The reference against docs/math.md: a deliberately naive loop computation, properties, gradcheck."""

import math

import pytest
import torch

from icl_msr_kernels import icl_msr_loss
from icl_msr_kernels.reference import prototype_attention, rownorm

from helpers import PAIRS, make_inputs


def naive_icl_msr(z1, z2, prototypes, prior_logits, tau, tau_a, gamma, lam, prior_mode, combine):
    """docs/math.md §2 in plain Python floats, one row at a time (independent of torch's ops)."""
    def norm(v):
        length = max(math.sqrt(sum(t * t for t in v)), 1e-12)
        return [t / length for t in v]

    def dot(u, v):
        return sum(s * t for s, t in zip(u, v))

    def logsumexp(vals):
        top = max(vals)
        return top + math.log(sum(math.exp(v - top) for v in vals))

    x = [norm(r) for r in z1.tolist()] + [norm(r) for r in z2.tolist()]
    p = [norm(r) for r in prototypes.tolist()]
    k = len(p)
    rho = prior_logits.tolist() if prior_logits is not None else [0.0] * k
    log_pi = [r - logsumexp(rho) for r in rho]
    c = []
    for xa in x:
        e = [dot(xa, pk) / tau_a for pk in p]
        if prior_mode == "logit":
            s = [ek + lk for ek, lk in zip(e, log_pi)]
            w = [math.exp(v - logsumexp(s)) for v in s]
        else:
            w = [math.exp(ek - logsumexp(e)) * math.exp(lk) for ek, lk in zip(e, log_pi)]
        c.append([sum(w[j] * p[j][i] for j in range(k)) for i in range(len(xa))])

    n2 = len(x)

    def ntxent(sim):
        rows = n2
        total = 0.0
        for a in range(rows):
            others = [sim(a, b) / tau for b in range(rows) if b != a]
            total += logsumexp(others) - sim(a, (a + rows // 2) % rows) / tau
        return total / rows

    base = ntxent(lambda a, b: dot(x[a], x[b]))
    if combine == "concat":
        inter = ntxent(lambda a, b: dot(x[a], x[b]) + gamma * dot(c[a], c[b]))
    else:
        h = [norm([xi + gamma * ci for xi, ci in zip(x[a], c[a])]) for a in range(n2)]
        inter = ntxent(lambda a, b: dot(h[a], h[b]))
    return base + lam * inter, base, inter


def _parts(inputs, **kwargs):
    return icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"], inputs["prior_logits"],
                        temperature=inputs["temperature"], backend="reference", return_parts=True,
                        **kwargs)


@pytest.mark.parametrize("prior_mode,combine", PAIRS)
@pytest.mark.parametrize("n,d,k,prior", [(1, 1, 1, True), (3, 4, 2, False), (5, 7, 3, True)])
def test_reference_matches_naive_loops(prior_mode, combine, n, d, k, prior):
    inputs = make_inputs(n, d, k, seed=n + d + k, prior=prior, temperature_tensor=False,
                         requires_grad=())
    kwargs = dict(attn_temperature=0.3, gamma=0.7, lam=0.4, prior_mode=prior_mode,
                  combine=combine)
    got = _parts(inputs, **kwargs)
    want = naive_icl_msr(inputs["z1"], inputs["z2"], inputs["prototypes"], inputs["prior_logits"],
                         inputs["temperature"], 0.3, 0.7, 0.4, prior_mode, combine)
    for g, w in zip(got, want):
        assert abs(g.item() - w) <= 1e-12 * max(1.0, abs(w))


@pytest.mark.parametrize("prior_mode,combine", PAIRS)
def test_invariant_to_positive_row_rescaling(prior_mode, combine):
    inputs = make_inputs(4, 6, 3, requires_grad=())
    scaled = dict(inputs)
    scaled["z1"] = inputs["z1"] * torch.rand(4, 1, dtype=torch.float64).add(0.1) * 5
    scaled["z2"] = inputs["z2"] * 3.0
    scaled["prototypes"] = inputs["prototypes"] * torch.rand(3, 1, dtype=torch.float64).add(0.2)
    kwargs = dict(prior_mode=prior_mode, combine=combine)
    for a, b in zip(_parts(inputs, **kwargs), _parts(scaled, **kwargs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("prior_mode,combine", PAIRS)
def test_symmetric_under_view_swap(prior_mode, combine):
    inputs = make_inputs(5, 4, 3, requires_grad=())
    swapped = dict(inputs, z1=inputs["z2"], z2=inputs["z1"])
    kwargs = dict(prior_mode=prior_mode, combine=combine)
    for a, b in zip(_parts(inputs, **kwargs), _parts(swapped, **kwargs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("prior_mode", ["logit", "mult"])
def test_gamma_zero_concat_makes_terms_equal(prior_mode):
    loss, base, inter = _parts(make_inputs(requires_grad=()), gamma=0.0, lam=0.5,
                               prior_mode=prior_mode, combine="concat")
    torch.testing.assert_close(inter, base, rtol=1e-14, atol=0)
    torch.testing.assert_close(loss, 1.5 * base, rtol=1e-14, atol=0)


@pytest.mark.parametrize("prior_mode,combine", PAIRS)
def test_lam_zero_gives_base(prior_mode, combine):
    loss, base, inter = _parts(make_inputs(requires_grad=()), lam=0.0, prior_mode=prior_mode,
                               combine=combine)
    assert loss.item() == base.item()
    assert inter.item() != base.item()  # the interventional term is still computed


def test_uniform_prior_mult_is_logit_weights_over_k():
    gen = torch.Generator().manual_seed(3)
    x = rownorm(torch.randn(7, 5, generator=gen, dtype=torch.float64))
    p = rownorm(torch.randn(4, 5, generator=gen, dtype=torch.float64))
    uniform = torch.full((4,), -math.log(4), dtype=torch.float64)
    c_mult = prototype_attention(x, p, uniform, 0.1, "mult")
    c_logit = prototype_attention(x, p, uniform, 0.1, "logit")
    torch.testing.assert_close(c_mult, c_logit / 4, rtol=1e-13, atol=1e-15)
    # Through the whole loss: C/K scales gamma C Cᵀ by 1/K² ("concat") and gamma C by 1/K ("add").
    inputs = make_inputs(4, 5, 4, prior=False, requires_grad=())
    mult = _parts(inputs, gamma=0.8, prior_mode="mult", combine="concat")
    logit = _parts(inputs, gamma=0.8 / 16, prior_mode="logit", combine="concat")
    torch.testing.assert_close(mult[2], logit[2], rtol=1e-13, atol=0)
    mult = _parts(inputs, gamma=0.8, prior_mode="mult", combine="add")
    logit = _parts(inputs, gamma=0.8 / 4, prior_mode="logit", combine="add")
    torch.testing.assert_close(mult[2], logit[2], rtol=1e-13, atol=0)


@pytest.mark.parametrize("prior_mode,combine", PAIRS)
def test_gradcheck_and_gradgradcheck(prior_mode, combine):
    inputs = make_inputs(3, 4, 3, seed=7)
    names = ["z1", "z2", "prototypes", "prior_logits", "temperature"]

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        return icl_msr_loss(kw["z1"], kw["z2"], kw["prototypes"], kw["prior_logits"],
                            temperature=kw["temperature"], attn_temperature=0.5, gamma=0.8,
                            lam=0.6, prior_mode=prior_mode, combine=combine, backend="reference",
                            return_parts=True)

    args = [inputs[n] for n in names]
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_half_precision_runs_in_its_dtype():
    inputs = make_inputs(4, 8, 3, requires_grad=())
    for dtype in (torch.float16, torch.bfloat16):
        z1, z2 = inputs["z1"].to(dtype), inputs["z2"].to(dtype)
        loss = icl_msr_loss(z1, z2, inputs["prototypes"].to(dtype), backend="reference")
        truth = icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"],
                             backend="reference")
        assert loss.dtype == dtype
        assert abs(loss.double().item() - truth.item()) < 0.1


def test_nan_propagates():
    inputs = make_inputs(requires_grad=())
    z1 = inputs["z1"].clone()
    z1[0, 0] = float("nan")
    loss = icl_msr_loss(z1, inputs["z2"], inputs["prototypes"], backend="reference")
    assert torch.isnan(loss)


def test_non_contiguous_inputs():
    inputs = make_inputs(4, 6, 3, requires_grad=())
    z1 = torch.empty(6, 4, dtype=torch.float64).copy_(inputs["z1"].T).T  # column-major
    prototypes = torch.cat([inputs["prototypes"], inputs["prototypes"]], 1)[:, :6]
    assert not z1.is_contiguous() and not prototypes.is_contiguous()
    got = icl_msr_loss(z1, inputs["z2"], prototypes, inputs["prior_logits"], backend="reference")
    want = icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"], inputs["prior_logits"],
                        backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
