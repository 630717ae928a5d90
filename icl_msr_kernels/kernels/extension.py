"""Backends "cpp" and "cuda": the ops of the icl_msr torch extension (csrc/).

The extension ``icl_msr_kernels._C`` registers four ops in the ``icl_msr`` namespace
(csrc/ops.cpp): attention_forward/backward and contrastive_forward/backward, with CPU kernels
(csrc/cpu) and, when built with CUDA, CUDA kernels (csrc/cuda). This module loads it and
registers, once and for every device, the Python halves of the ops: autograd (the backward ops
implement the first derivative; asking for a second one raises) and fake tensors (shapes only),
so that ``torch.compile(fullgraph=True)`` traces through them. The dispatcher picks the device
kernel, so the "cpp" and "cuda" backends are one class under two names.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from ..backends import BackendUnavailable
from . import INT_MODE_CODES, PRIOR_MODE_CODES

_OPS = ("attention_forward", "attention_backward", "contrastive_forward", "contrastive_backward")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """SPEC §4: float64 inputs accumulate in float64, the others in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: output shapes and dtypes as documented in csrc/ops.cpp.

def _attention_forward_fake(x, prototypes, log_prior, inv_attn_temperature, prior_mode):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=_accum_dtype(x.dtype))


def _attention_backward_fake(grad_c, x, prototypes, log_prior, c, row_lse, inv_attn_temperature,
                             prior_mode):
    return torch.empty_like(x), torch.empty_like(prototypes), torch.empty_like(log_prior)


def _contrastive_forward_fake(a, b, a_cols, b_cols, row_offset, int_mode):
    acc = _accum_dtype(a.dtype)
    return a.new_empty(2, dtype=acc), a.new_empty(2, a.shape[0], dtype=acc)


def _contrastive_backward_fake(grad_losses, a, b, a_cols, b_cols, row_lse, row_offset, int_mode):
    def like(t):
        return a.new_empty(0) if t is None else torch.empty_like(t)

    return torch.empty_like(a), like(b), like(a_cols), like(b_cols)


# ---------------------------------------------------------------------------------------------
# Autograd.

def _attention_setup(ctx, inputs, output):
    x, prototypes, log_prior, inv_attn_temperature, prior_mode = inputs
    c, row_lse = output
    ctx.save_for_backward(x, prototypes, log_prior, c, row_lse)
    ctx.inv_attn_temperature = inv_attn_temperature
    ctx.prior_mode = prior_mode
    ctx.mark_non_differentiable(row_lse)


def _attention_backward(ctx, grad_c, _grad_row_lse):
    x, prototypes, log_prior, c, row_lse = ctx.saved_tensors
    grad_x, grad_prototypes, grad_log_prior = torch.ops.icl_msr.attention_backward(
        grad_c, x, prototypes, log_prior, c, row_lse, ctx.inv_attn_temperature, ctx.prior_mode)
    return grad_x, grad_prototypes, grad_log_prior, None, None


def _contrastive_setup(ctx, inputs, output):
    a, b, a_cols, b_cols, row_offset, int_mode = inputs
    _losses, row_lse = output
    ctx.save_for_backward(a, b, a_cols, b_cols, row_lse)
    ctx.row_offset = row_offset
    ctx.int_mode = int_mode
    ctx.mark_non_differentiable(row_lse)


def _contrastive_backward(ctx, grad_losses, _grad_row_lse):
    a, b, a_cols, b_cols, row_lse = ctx.saved_tensors
    grads = torch.ops.icl_msr.contrastive_backward(grad_losses, a, b, a_cols, b_cols, row_lse,
                                                   ctx.row_offset, ctx.int_mode)
    # Inputs that were None got empty gradients from the op.
    grads = tuple(g if t is not None else None for g, t in zip(grads, (a, b, a_cols, b_cols)))
    return (*grads, None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "icl_msr_kernels: the 'cpp' and 'cuda' backends compute first-order gradients only; "
        "double backward (a gradient of a gradient, e.g. torch.autograd.grad(..., "
        "create_graph=True) followed by another backward) is not supported. Use "
        "backend='reference' for higher-order gradients.")


def _register() -> None:
    """Loads the extension library and registers the ops' fake and autograd halves.

    Raises BackendUnavailable when the library is not built or does not load.
    """
    spec = importlib.util.find_spec("icl_msr_kernels._C")
    if spec is None or spec.origin is None:
        raise BackendUnavailable(
            "the C++ extension icl_msr_kernels._C is not built (run `pip install "
            "--no-build-isolation -e .` in the repository, with a C++ compiler and ninja)")
    try:
        torch.ops.load_library(spec.origin)
    except OSError as err:
        raise BackendUnavailable(f"the C++ extension {spec.origin} does not load: {err}") from None
    missing = [op for op in _OPS if not hasattr(torch.ops.icl_msr, op)]
    if missing:
        raise BackendUnavailable(f"the C++ extension {spec.origin} does not define the ops "
                                 f"{missing}; rebuild it")

    torch.library.register_fake("icl_msr::attention_forward", _attention_forward_fake)
    torch.library.register_fake("icl_msr::attention_backward", _attention_backward_fake)
    torch.library.register_fake("icl_msr::contrastive_forward", _contrastive_forward_fake)
    torch.library.register_fake("icl_msr::contrastive_backward", _contrastive_backward_fake)
    torch.library.register_autograd("icl_msr::attention_forward", _attention_backward,
                                    setup_context=_attention_setup)
    torch.library.register_autograd("icl_msr::contrastive_forward", _contrastive_backward,
                                    setup_context=_contrastive_setup)
    for op in ("attention_backward", "contrastive_backward"):
        torch.library.register_autograd(f"icl_msr::{op}", _no_double_backward)


def _kernels_missing(device_type: str) -> str | None:
    """Why the ops cannot run on `device_type` tensors in this process, or None if they can."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False in this process"
    key = _DISPATCH_KEYS[device_type]
    missing = [op for op in _OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"icl_msr::{op}", key)]
    if not missing:
        return None
    how = ("with nvcc found (CUDA_HOME) and ICL_MSR_NO_CUDA unset" if device_type == "cuda"
           else "from a checkout with csrc/cpu")
    return f"the C++ extension was built without {key} kernels for {missing}; rebuild it {how}"


# ---------------------------------------------------------------------------------------------
# The backend object.

class ExtensionKernels:
    """The two differentiable pieces of `icl_msr_kernels.backends` on the extension's ops."""

    # float16/bfloat16 inputs: the glue runs in float32; the ops read the inputs as stored and
    # accumulate in float32 (SPEC §4).
    upcast_half = True

    def __init__(self, name: str) -> None:
        self.name = name

    @staticmethod
    def attention(x: Tensor, prototypes: Tensor, log_prior: Tensor, attn_temperature: float,
                  prior_mode: str) -> Tensor:
        """C = W P of SPEC steps 4-6 for row-normalised x (B, D), prototypes (K, D); C: (B, D)."""
        c, _row_lse = torch.ops.icl_msr.attention_forward(
            x, prototypes, log_prior, 1.0 / attn_temperature, PRIOR_MODE_CODES[prior_mode])
        return c

    @staticmethod
    def contrastive(a: Tensor, b: Tensor | None, a_cols: Tensor | None, b_cols: Tensor | None,
                    row_offset: int, int_mode: str) -> tuple[Tensor, Tensor]:
        """(L_base, L_int) of SPEC steps 7-8, as `reference.contrastive_losses`."""
        losses, _row_lse = torch.ops.icl_msr.contrastive_forward(
            a, b, a_cols, b_cols, row_offset, INT_MODE_CODES[int_mode])
        return losses[0], losses[1]


def _availability() -> dict[str, str | None]:
    """Device type -> None when the ops run on it in this process, else why not."""
    try:
        _register()
    except BackendUnavailable as err:
        return {device_type: str(err) for device_type in _DISPATCH_KEYS}
    return {device_type: _kernels_missing(device_type) for device_type in _DISPATCH_KEYS}


# Loaded and registered once, when this module is first imported: `load` may then be called from
# code that torch.compile traces (the first loss call can be inside a compiled function), and
# only reads these.
_UNAVAILABLE = _availability()
_KERNELS = {"cpu": ExtensionKernels("cpp"), "cuda": ExtensionKernels("cuda")}


def load(device_type: str) -> ExtensionKernels:
    """The kernels for `device_type` ("cpu": backend "cpp", "cuda": backend "cuda").

    Raises BackendUnavailable saying why they cannot run in this process.
    """
    reason = _UNAVAILABLE[device_type]
    if reason is not None:
        raise BackendUnavailable(reason)
    return _KERNELS[device_type]
