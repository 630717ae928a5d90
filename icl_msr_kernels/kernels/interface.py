"""What every backend provides, and the error a backend raises when it cannot run.

Kept free of imports from the rest of the package, so that kernel modules and the dispatcher
(`icl_msr_kernels.backends`) can both import it without a cycle.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class BackendUnavailable(RuntimeError):
    """Raised when a named backend cannot run in this process; the message says why."""


class Kernels(Protocol):
    """The two heavy pieces of the loss (docs/math.md §2), each differentiable.

    The cheap glue around them (row normalisation, prior, temperature scaling, how the
    interventional features are formed, the weighted sum) is shared by every backend in
    `icl_msr_kernels.loss`.
    """

    name: str
    # Whether the glue runs in float32 for float16/bfloat16 inputs (the kernels still read the
    # features as stored and accumulate in float32).
    upcast_half: bool

    def attention(self, x: Tensor, prototypes: Tensor, log_prior: Tensor,
                  attn_temperature: float, prior_mode: str) -> Tensor:
        """C = W P (steps 4-6): x (B, D) and prototypes (K, D) row-normalised, log_prior (K,)
        log π. Returns C (B, D)."""
        ...

    def contrastive(self, a: Tensor, b: Tensor | None, a_cols: Tensor | None,
                    b_cols: Tensor | None, row_offset: int, combine: str,
                    positive_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(L_base, L_int) of steps 7-8 on features pre-scaled by 1/sqrt(τ), never building the
        B × M logits.

        a, b (B, D), (B, Db): the local rows. a_cols, b_cols (M, ·): the columns, or None when
        the columns are the rows. combine: "none" (no interventional term, L_int = 0), "concat"
        (L_int over a·a' + b·b') or "add" (over b·b').

        Without positive_logits, the rows are the two views stacked (B even): row r's positive
        is column row_offset + (r + B/2) mod B and its own column row_offset + r is excluded.
        With positive_logits (2, B) (base, interventional), every column is a negative and row
        r's positive is the extra logit positive_logits[:, r] (memory-bank mode, §7); gradients
        flow into positive_logits too. See `reference.contrastive_losses`.
        """
        ...
