"""Shared test machinery: random inputs and the docs/math.md §5 comparison of a backend with the reference."""

from __future__ import annotations

import torch

from icl_msr_kernels import icl_msr_loss

PAIRS = [(p, c) for p in ("logit", "mult") for c in ("concat", "add")]

# docs/math.md §5: (loss relative error, gradient error / max|grad|) per dtype.
TOLERANCES = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-4)}
# For float16/bfloat16 the budget is the eager reference's own error in that dtype plus this.
HALF_SLACK = 1e-2

GRAD_NAMES = ("z1", "z2", "prototypes", "prior_logits", "temperature")


def make_inputs(n=6, d=5, k=3, *, seed=0, prior=True, temperature_tensor=True,
                requires_grad=GRAD_NAMES, device="cpu"):
    """float64 master inputs; `requires_grad` names those that need a gradient."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "z1": torch.randn(n, d, generator=gen, dtype=torch.float64),
        "z2": torch.randn(n, d, generator=gen, dtype=torch.float64),
        "prototypes": torch.randn(k, d, generator=gen, dtype=torch.float64),
        "prior_logits": torch.randn(k, generator=gen, dtype=torch.float64) if prior else None,
        "temperature": torch.tensor(0.2, dtype=torch.float64) if temperature_tensor else 0.2,
    }
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if name in requires_grad:
                value.requires_grad_(True)
        out[name] = value
    return out


def cast(inputs, dtype):
    """Leaf copies of the inputs in `dtype` (the temperature stays as it is typed)."""
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().to(dtype).requires_grad_(value.requires_grad)
        out[name] = value
    return out


def loss_and_grads(inputs, backend, **kwargs):
    """(loss, base, interventional) and the gradients of loss + 0.3 base + 0.7 interventional,
    so that every part's backward is exercised with its own weight."""
    parts = icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"], inputs["prior_logits"],
                         temperature=inputs["temperature"], backend=backend, return_parts=True,
                         **kwargs)
    total = parts[0] + 0.3 * parts[1] + 0.7 * parts[2]
    leaves = {n: v for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    grads = torch.autograd.grad(total, list(leaves.values())) if leaves else ()
    return [p.detach() for p in parts], dict(zip(leaves, grads))


def relative_errors(parts, grads, ref_parts, ref_grads):
    """(max relative error of the loss parts, {name: max grad error / max|reference grad|})."""
    loss_err = max(((p.double() - r.double()).abs() / r.double().abs().clamp_min(1e-30)).item()
                   for p, r in zip(parts, ref_parts))
    grad_err = {}
    for name, ref in ref_grads.items():
        scale = ref.double().abs().max().clamp_min(1e-30)
        grad_err[name] = ((grads[name].double() - ref.double()).abs().max() / scale).item()
    return loss_err, grad_err


def assert_matches_reference(inputs, backend, dtype, **kwargs):
    """docs/math.md §5: `backend` run in `dtype` against the reference (float64 master `inputs`)."""
    ours = cast(inputs, dtype)
    parts, grads = loss_and_grads(ours, backend, **kwargs)
    for name, value in ours.items():
        if isinstance(value, torch.Tensor) and value.requires_grad:
            assert grads[name].dtype == value.dtype, f"grad of {name} is {grads[name].dtype}"
            assert grads[name].shape == value.shape
    if dtype in TOLERANCES:
        ref_parts, ref_grads = loss_and_grads(cast(inputs, torch.float64), "reference", **kwargs)
        loss_tol, grad_tol = TOLERANCES[dtype]
        loss_err, grad_err = relative_errors(parts, grads, ref_parts, ref_grads)
        assert loss_err <= loss_tol, f"{backend} {dtype} loss rel. error {loss_err:.3g}"
        for name, err in grad_err.items():
            assert err <= grad_tol, f"{backend} {dtype} grad {name} error {err:.3g}"
        return
    truth_parts, truth_grads = loss_and_grads(cast(inputs, torch.float64), "reference", **kwargs)
    eager_parts, eager_grads = loss_and_grads(cast(inputs, dtype), "reference", **kwargs)
    loss_err, grad_err = relative_errors(parts, grads, truth_parts, truth_grads)
    eager_loss_err, eager_grad_err = relative_errors(eager_parts, eager_grads, truth_parts, truth_grads)
    assert loss_err <= eager_loss_err + HALF_SLACK, \
        f"{backend} {dtype} loss error {loss_err:.3g} vs eager {eager_loss_err:.3g}"
    for name, err in grad_err.items():
        assert err <= eager_grad_err[name] + HALF_SLACK, \
            f"{backend} {dtype} grad {name} error {err:.3g} vs eager {eager_grad_err[name]:.3g}"
