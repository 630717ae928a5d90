"""Distributed negatives (SPEC §6): every rank's rows become columns of every other rank.

Only the (B, D) features are gathered, never a similarity matrix. The gather is differentiable:
its backward sums, over all ranks, the gradients that each rank's loss sends to a column and
hands each rank the rows it owns, so that after DDP averages parameter gradients, training
equals single-process training on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "gather_distributed=True needs an initialised torch.distributed process group "
            "(call torch.distributed.init_process_group first, e.g. under torchrun)")


def _check_same_batch_shape(features: Tensor) -> None:
    """Raise on every rank, rather than hang in all_gather, when the ranks' batches differ."""
    # dtype is compared through its itemsize and floating kind, enough to tell ranks apart.
    mine = torch.tensor([features.shape[0], features.shape[1], features.element_size()],
                        dtype=torch.int64, device=features.device)
    shapes = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, mine)
    shapes = [tuple(s.tolist()) for s in shapes]
    if len(set(shapes)) != 1:
        described = ", ".join(f"rank {r}: {s[0]} rows x {s[1]} ({s[2]}-byte)"
                              for r, s in enumerate(shapes))
        raise ValueError(
            "gather_distributed=True needs the same batch shape and dtype on every rank "
            f"(2N stacked rows x D), got {described}")


class _AllGatherRows(torch.autograd.Function):
    """(B, D) on each rank -> (W*B, D) rank-major on every rank; backward sums over ranks."""

    @staticmethod
    def forward(ctx, rows: Tensor) -> Tensor:
        rows = rows.contiguous()
        gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, rows)
        ctx.rank, ctx.rows = dist.get_rank(), rows.shape[0]
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # all_reduce rather than reduce_scatter: gloo has no reduce_scatter, and the gathered
        # tensor is only O(W*N*D).
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_columns(a: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None, int]:
    """All ranks' features as columns, and this rank's first global column (its row offset)."""
    _require_process_group()
    _check_same_batch_shape(a)
    a_cols = _AllGatherRows.apply(a)
    b_cols = _AllGatherRows.apply(b) if b is not None else None
    return a_cols, b_cols, dist.get_rank() * a.shape[0]
