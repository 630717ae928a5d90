"""Backend "triton": the fused kernels written in Triton.

The two heavy pieces live one per module, kernels and torch ops together: `triton_attention`
(prototype attention, docs/math.md §2 steps 4-6) and `triton_contrastive` (both NT-Xent terms in
one sweep, steps 7-8; its optional single-process sweep over unordered block pairs is
`triton_symmetric`, the distributed job's pair kernels `triton_pairs`); `triton_common` holds
what they share. They register the op surface of
`kernels.ops` in the icl_msr_triton namespace (`torch.library.triton_op`, so
`torch.compile(fullgraph=True)` traces through them), deterministic, for float32/float16/bfloat16
(and float64) inputs with float32 (float64) accumulation. They run on CUDA tensors, and on CPU
tensors under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported), which
is how the tests run them without a GPU.

Options: float32 dot products are true float32 by default;
`triton_common.set_fp32_precision("tf32")` (or ICL_MSR_TRITON_FP32_PRECISION=tf32 in the
environment) trades accuracy for tensor-core speed. Double backward is not supported and says so.
"""

from __future__ import annotations

from . import ops
from .interface import BackendUnavailable

NAMESPACE = "icl_msr_triton"
# Pair blocks of 512 rows: each program walks its pair in sub-tiles, and fewer blocks mean fewer
# rounds (one launch each). Under the interpreter, small blocks make several rounds in tests.
_KERNELS = ops.OpKernels("triton", NAMESPACE, pair_block_rows=512)
_registered = False


def load() -> ops.OpKernels:
    """The "triton" kernels, or BackendUnavailable saying why Triton cannot run here."""
    global _registered
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError as err:
        raise BackendUnavailable(f"triton is not importable ({err})") from None
    except Exception as err:  # noqa: BLE001 - installed but broken: say how
        raise BackendUnavailable(f"triton is installed but failed to import: "
                                 f"{type(err).__name__}: {err}") from None
    if not _registered:
        try:  # registers the ops
            from . import triton_attention, triton_contrastive, triton_pairs  # noqa: F401
            from . import triton_common
        except Exception as err:  # e.g. a Triton or torch too old for these kernels
            raise BackendUnavailable(f"the Triton kernels failed to load: {type(err).__name__}: "
                                     f"{err}") from None
        ops.register_autograd(NAMESPACE, "triton")
        if triton_common.interpreting():
            _KERNELS.pair_block_rows = 16
        _registered = True
    return _KERNELS
