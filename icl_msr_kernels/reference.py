"""Pure-PyTorch reference of the loss (docs/math.md): the truth every fused backend is tested
against.

Plain torch ops only, so autograd (and double backward) come for free and every step of
docs/math.md §2 is visible. The two heavy pieces, the prototype attention (steps 2-6) and the contrastive NT-Xent
(step 8), are the functions a fused backend replaces; `icl_msr_kernels.loss` composes them
with the cheap glue (steps 1, 7, 9). NaN or Inf in the inputs propagate to the outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Smallest norm rownorm divides by (step 1).
NORM_EPS = 1e-12


def rownorm(v: Tensor) -> Tensor:
    """v / max(||v||, 1e-12) row by row (step 1)."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def prototype_attention(
    x: Tensor, prototypes: Tensor, log_prior: Tensor, attn_temperature: float, prior_mode: str
) -> Tensor:
    """Backdoor adjustment C = W P of steps 4-6.

    x: (B, D) row-normalised embeddings; prototypes: (K, D) row-normalised P;
    log_prior: (K,) log pi. Returns C: (B, D).
    """
    scores = x @ prototypes.T / attn_temperature  # E, (B, K)
    if prior_mode == "logit":
        weights = torch.softmax(scores + log_prior, dim=1)  # posterior over meta semantics
    else:  # "mult": literal sum_s P(s) * attention; rows sum to <= 1
        weights = torch.softmax(scores, dim=1) * log_prior.exp()
    return weights @ prototypes


def contrastive_logits(
    a: Tensor, b: Tensor | None, a_cols: Tensor, b_cols: Tensor | None, combine: str
) -> tuple[Tensor, Tensor | None]:
    """Similarity logits of the base and interventional terms, rows x columns.

    Features arrive pre-scaled by 1/sqrt(temperature), so these are already R/tau:
    base = a a_colsᵀ; "concat": int = a a_colsᵀ + b b_colsᵀ; "add": int = b b_colsᵀ; "none": no int.
    """
    base = a @ a_cols.T
    if combine == "none":
        return base, None
    inter = b @ b_cols.T
    return base, (base + inter if combine == "concat" else inter)


def ntxent_from_logits(logits: Tensor, row_offset: int, positive_logits: Tensor | None = None
                       ) -> Tensor:
    """Step 8 on (B, M) logits; returns the mean over the B rows of lse - positive logit.

    Without positive_logits, row a is global column row_offset + a and its positive is column
    row_offset + (a + B/2) mod B (the rank's two views sit side by side in the columns); its own
    column is excluded. With positive_logits (B,), every column is a negative and row a's
    positive is the extra candidate positive_logits[a] (memory-bank mode, docs/math.md §7).
    """
    if positive_logits is not None:
        candidates = torch.cat([positive_logits[:, None], logits], dim=1)
        return (torch.logsumexp(candidates, dim=1) - positive_logits).mean()
    rows = logits.shape[0]
    local = torch.arange(rows, device=logits.device)
    self_cols = row_offset + local
    pos_cols = row_offset + (local + rows // 2) % rows
    masked = logits.clone()
    masked[local, self_cols] = float("-inf")
    return (torch.logsumexp(masked, dim=1) - logits[local, pos_cols]).mean()


def contrastive_losses(
    a: Tensor,
    b: Tensor | None,
    a_cols: Tensor | None,
    b_cols: Tensor | None,
    row_offset: int,
    combine: str,
    positive_logits: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(L_base, L_int) of steps 7-8 for B local rows against M columns.

    a, b: (B, D) features of this process's rows (pre-scaled by 1/sqrt(tau));
    a_cols, b_cols: (M, D) features of all columns, or None when the columns are the rows;
    positive_logits: None (the rows are the two views stacked and hold each other's positives)
    or (2, B), the base and interventional positive logit of each row, the columns then being
    negatives only. L_int is a zero when combine is "none".
    """
    if a_cols is None:
        a_cols, b_cols = a, b
    base_logits, int_logits = contrastive_logits(a, b, a_cols, b_cols, combine)
    pos_base, pos_int = (None, None) if positive_logits is None else positive_logits
    base = ntxent_from_logits(base_logits, row_offset, pos_base)
    if int_logits is None:
        return base, torch.zeros_like(base)
    return base, ntxent_from_logits(int_logits, row_offset, pos_int)


class ReferenceKernels:
    """The reference pieces behind `kernels.interface.Kernels`."""

    name = "reference"
    # The reference runs the glue in the inputs' own dtype: it *is* the eager baseline that the
    # half-precision tolerance rule compares against (docs/math.md §5).
    upcast_half = False

    @staticmethod
    def attention(x, prototypes, log_prior, attn_temperature, prior_mode):
        return prototype_attention(x, prototypes, log_prior, attn_temperature, prior_mode)

    @staticmethod
    def contrastive(a, b, a_cols, b_cols, row_offset, combine, positive_logits=None):
        return contrastive_losses(a, b, a_cols, b_cols, row_offset, combine, positive_logits)


def log_prior_from_logits(prior_logits: Tensor | None, num_prototypes: int, like: Tensor) -> Tensor:
    """log pi = log_softmax(rho), or the uniform log prior when rho is None (step 3)."""
    if prior_logits is None:
        return torch.full((num_prototypes,), -math.log(num_prototypes), dtype=like.dtype,
                          device=like.device)
    return F.log_softmax(prior_logits.to(like.dtype), dim=0)
