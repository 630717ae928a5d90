"""Backend "triton": the SPEC kernels written in Triton (issue 4).

The two heavy pieces live one per module, kernels and torch op together:
`triton_attention` (prototype attention, SPEC steps 4-6) and `triton_contrastive` (both NT-Xent
terms in one sweep, SPEC steps 7-8); `triton_common` holds what they share. Each piece is a torch
op with an autograd formula (`torch.library.triton_op`, so `torch.compile(fullgraph=True)` traces
through it), deterministic, for float32/float16/bfloat16 (and float64) inputs with float32
(float64) accumulation. They run on CUDA tensors, and on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1 set before triton is imported), which is how the tests run them without a GPU.

Options: float32 dot products are true float32 by default;
`triton_common.set_fp32_precision("tf32")` (or ICL_MSR_TRITON_FP32_PRECISION=tf32 in the
environment) trades accuracy for tensor-core speed. Double backward is not supported and says so.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import BackendUnavailable

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_dtype(t: Tensor) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"backend 'triton' supports float32, float16, bfloat16 and float64 "
                        f"inputs, got {t.dtype}")


class TritonKernels:
    """The SPEC pieces as Triton kernels (the interface is described in `backends`)."""

    name = "triton"
    # The glue runs in float32 around half-precision kernels; the kernels read features as
    # stored and accumulate in float32.
    upcast_half = True

    @staticmethod
    def attention(x: Tensor, prototypes: Tensor, log_prior: Tensor, attn_temperature: float,
                  prior_mode: str) -> Tensor:
        """C = W P (SPEC steps 4-6); see `triton_attention.prototype_attention`."""
        from .triton_attention import prototype_attention

        _check_dtype(x)
        return prototype_attention(x, prototypes, log_prior, attn_temperature, prior_mode)

    @staticmethod
    def contrastive(a: Tensor, b: Tensor | None, a_cols: Tensor | None, b_cols: Tensor | None,
                    row_offset: int, int_mode: str) -> tuple[Tensor, Tensor]:
        """(L_base, L_int) (SPEC steps 7-8); see `triton_contrastive.contrastive_losses`."""
        from .triton_contrastive import contrastive_losses

        _check_dtype(a)
        return contrastive_losses(a, b, a_cols, b_cols, row_offset, int_mode)


def load() -> type[TritonKernels]:
    """The "triton" kernels, or BackendUnavailable saying why Triton cannot run here."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise BackendUnavailable(f"triton is not importable ({err})") from None
    try:  # registers the ops
        from . import triton_attention, triton_contrastive  # noqa: F401
    except Exception as err:  # e.g. a Triton or torch too old for these kernels
        raise BackendUnavailable(f"the Triton kernels failed to load: {type(err).__name__}: "
                                 f"{err}") from None
    return TritonKernels
