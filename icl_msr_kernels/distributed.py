"""Distributed negatives (docs/math.md §6): every rank's rows become columns of every other rank.

Only the (B, D) features are gathered, never a similarity matrix. The gather is differentiable:
its backward sums, over all ranks, the gradients that each rank's loss sends to a column and
hands each rank the rows it owns, so that after DDP averages parameter gradients, training
equals single-process training on the global batch.

Without an initialised process group, or with a group of one rank, nothing is gathered and the
loss is the local one (lightly's and OpenCLIP's convention: one script runs on one device and on
many).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# dtypes by a small code, so that the shape check tells float16 from bfloat16 ranks.
_DTYPE_CODES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def world_size() -> int:
    """Ranks of the default process group; 1 when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


# (world size, rows, columns, dtype) this rank has already checked against all others.
_checked: set[tuple[int, int, int, torch.dtype]] = set()


def _check_same_batch_shape(features: Tensor) -> None:
    """Raise on every rank, rather than hang in all_gather, when the ranks' batches differ.

    The check costs a collective and a host read, so each rank runs it once per (shape, dtype)
    it has not seen before, not every step. Ranks whose batches differ from the start meet it
    together on their first call; ranks that switch to a new shape at the same step (a data
    loader's shorter last batch comes at the same step everywhere) meet it together again.
    """
    key = (dist.get_world_size(), features.shape[0], features.shape[1], features.dtype)
    if key in _checked:
        return
    mine = torch.tensor([features.shape[0], features.shape[1],
                         _DTYPE_CODES.get(features.dtype, -1)],
                        dtype=torch.int64, device=features.device)
    shapes = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, mine)
    shapes = [tuple(s.tolist()) for s in shapes]
    if len(set(shapes)) != 1:
        names = {code: str(dtype).removeprefix("torch.") for dtype, code in _DTYPE_CODES.items()}
        described = ", ".join(f"rank {r}: {s[0]} rows x {s[1]} {names.get(s[2], 'other dtype')}"
                              for r, s in enumerate(shapes))
        raise ValueError(
            "gather_distributed=True needs the same batch shape and dtype on every rank "
            f"(2N stacked rows x D), got {described}")
    _checked.add(key)


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


def gather_columns(a: Tensor, b: Tensor | None) -> tuple[Tensor | None, Tensor | None, int]:
    """All ranks' features as columns, and this rank's first global column (its row offset);
    (None, None, 0) when there is no process group of several ranks (the columns are the rows)."""
    if world_size() == 1:
        return None, None, 0
    _check_same_batch_shape(a)
    a_cols = _AllGatherRows.apply(a)
    b_cols = _AllGatherRows.apply(b) if b is not None else None
    return a_cols, b_cols, dist.get_rank() * a.shape[0]


@torch.no_grad()
def gather_rows(rows: Tensor) -> Tensor:
    """All ranks' rows in rank order (not differentiable): the rows a memory bank enqueues."""
    if world_size() == 1:
        return rows
    _check_same_batch_shape(rows)
    gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, rows.contiguous())
    return torch.cat(gathered)
