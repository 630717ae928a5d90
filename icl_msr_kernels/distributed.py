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


# ---------------------------------------------------------------------------------------------
# Split negatives: the job's symmetric sweep divided among the ranks (docs/math.md §6).
#
# The W ranks' rows stack into M = W·B global rows, rank r's at [r·B, (r+1)·B), each rank's two
# views side by side, so a row's positive is always on its own rank. The M × M logits are
# symmetric, so every unordered pair of row blocks is computed once in the whole job: by one
# rank, which folds it into the statistics of both blocks' rows. The ranks then combine
# per-row statistics (max and sum of the negatives' exponentials, O(M) floats) and, in the
# backward, the gradient rows they produced for every block (O(M·D)), each owner keeping its
# own. Positive logits are rank-local and handled by their owners.


def tile_schedule(total_rows: int, block_rows: int, world: int, rank: int
                  ) -> tuple[Tensor, Tensor]:
    """(block_starts (nb + 1,), pairs (P, 3)): the row blocks of the M global rows and this
    rank's unordered block pairs as (round, i, j), i <= j.

    The pairs of the whole job are the circle-method rounds over nb blocks (no block twice in a
    round, so a round's tiles can run in parallel without two writing the same rows); each
    round's pairs are cut into `world` contiguous shares, one per rank. Every pair is computed
    by exactly one rank, the shares differ by at most one pair per round, and the schedule
    depends only on (M, block size, W): the same on every rank and every run.
    """
    count = max(1, min(total_rows, -(-total_rows // block_rows)))
    if count > 1:  # even, and enough pairs per round for every rank
        count = max(count + count % 2, min(total_rows - total_rows % 2, 2 * world))
    base, extra = divmod(total_rows, count)
    starts = [i * base + min(i, extra) for i in range(count + 1)]
    odd = count if count % 2 else count - 1  # the circle method's m
    mine = []
    rounds = []
    for r in range(odd):
        pairs = [(r, count - 1 if count != odd else r)]
        pairs += [(min((r + k) % odd, (r - k) % odd), max((r + k) % odd, (r - k) % odd))
                  for k in range(1, (odd - 1) // 2 + 1)]
        rounds.append(sorted((min(i, j), max(i, j)) for i, j in pairs))
    if count != odd:
        rounds.append([(i, i) for i in range(count)])
    for index, pairs in enumerate(rounds):
        share, rest = divmod(len(pairs), world)
        begin = rank * share + min(rank, rest)
        end = begin + share + (1 if rank < rest else 0)
        mine += [(index, i, j) for i, j in pairs[begin:end]]
    return (torch.tensor(starts, dtype=torch.int64),
            torch.tensor(mine, dtype=torch.int64).reshape(-1, 3))


def _gather_all(t: Tensor) -> Tensor:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return torch.cat(gathered)


def _sum_to_owners(partial: Tensor, rank: int, rows: int) -> Tensor:
    """Every rank's partial gradient rows (M, D) summed, this rank's B rows kept."""
    partial = partial.contiguous()
    if dist.get_backend() == "nccl":  # reduce_scatter sends half of what all_reduce does
        mine = partial.new_empty(rows, *partial.shape[1:])
        dist.reduce_scatter_tensor(mine, partial)
        return mine
    dist.all_reduce(partial)  # gloo has no reduce_scatter
    return partial[rank * rows:(rank + 1) * rows]


def _positive_logits(a_all: Tensor, b_all: Tensor | None, rows: int, combine: str) -> Tensor:
    """(2, M) positive logits of every global row (its positive: the other view, same rank)."""
    total = a_all.shape[0]
    index = torch.arange(total, device=a_all.device)
    positive = index // rows * rows + (index % rows + rows // 2) % rows
    acc = torch.float64 if a_all.dtype == torch.float64 else torch.float32
    base = (a_all.to(acc) * a_all[positive].to(acc)).sum(1)
    if combine == "none":
        return torch.stack([base, torch.zeros_like(base)])
    inter = (b_all.to(acc) * b_all[positive].to(acc)).sum(1)
    return torch.stack([base, inter + base if combine == "concat" else inter])


class SplitContrastive(torch.autograd.Function):
    """(L_base, L_int) of this rank's rows against all ranks' rows, each rank computing its share
    of the job's tile pairs with `kernels.pairs_forward` / `pairs_backward`."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor | None, kernels, combine: str):
        world, rank, rows = dist.get_world_size(), dist.get_rank(), a.shape[0]
        a_all = _gather_all(a.detach())
        b_all = _gather_all(b.detach()) if b is not None else None
        starts, pairs = tile_schedule(a_all.shape[0], kernels.pair_block_rows, world, rank)
        neg_max, neg_sum = kernels.pairs_forward(a_all, b_all, starts, pairs, rows, combine)
        # Merge the ranks' (max, sum of exp(logit - max)) of every row's negatives.
        job_max = neg_max.clone()
        dist.all_reduce(job_max, op=dist.ReduceOp.MAX)
        shift = torch.where(neg_max == float("-inf"), torch.zeros_like(neg_max),
                            torch.exp(neg_max - job_max))
        job_sum = neg_sum * shift
        dist.all_reduce(job_sum)
        negatives_lse = job_max + torch.log(job_sum)
        positive = _positive_logits(a_all, b_all, rows, combine)
        row_terms = torch.logaddexp(torch.zeros_like(positive), negatives_lse - positive)
        row_lse = positive + row_terms
        mine = row_terms[:, rank * rows:(rank + 1) * rows]
        losses = mine.sum(1) / rows
        if combine == "none":
            losses = torch.cat([losses[:1], torch.zeros_like(losses[1:])])
        ctx.save_for_backward(a_all, b_all, starts, pairs, row_lse, positive)
        ctx.kernels, ctx.combine, ctx.rank, ctx.rows = kernels, combine, rank, rows
        ctx.dtypes = (a.dtype, None if b is None else b.dtype)
        return losses[0], losses[1]

    @staticmethod
    def backward(ctx, grad_base: Tensor, grad_int: Tensor):
        a_all, b_all, starts, pairs, row_lse, positive = ctx.saved_tensors
        rank, rows, combine = ctx.rank, ctx.rows, ctx.combine
        # Each rank's loss has its own upstream gradient: row g's coefficients carry its owner's.
        mine = torch.stack([grad_base, grad_int]).to(row_lse.dtype).reshape(1, 2)
        upstream = _gather_all(mine)  # (W, 2)
        if combine == "none":
            upstream[:, 1] = 0
        row_scale = (upstream.t() / rows).repeat_interleave(rows, dim=1).contiguous()  # (2, M)
        grad_a, grad_b = ctx.kernels.pairs_backward(a_all, b_all, starts, pairs, row_lse,
                                                    row_scale, rows, combine)
        grad_a = _sum_to_owners(grad_a, rank, rows)
        grad_b = _sum_to_owners(grad_b, rank, rows) if b_all is not None else None
        # The positive pairs are rank-local: their coefficient g (softmax weight - 1) per row,
        # for the row and its positive (an entry the tiles left at 0).
        own = slice(rank * rows, (rank + 1) * rows)
        coef = row_scale[:, own] * (torch.exp(positive[:, own] - row_lse[:, own]) - 1)
        other = (torch.arange(rows, device=coef.device) + rows // 2) % rows
        coef = coef + coef[:, other]  # entry (r, pos(r)) is also row pos(r)'s positive
        a_own, b_own = a_all[own].to(coef.dtype), None if b_all is None else b_all[own]
        a_coef = coef[0] + (coef[1] if combine == "concat" else 0)
        grad_a = grad_a.to(coef.dtype) + a_coef[:, None] * a_own[other]
        if grad_b is not None:
            grad_b = grad_b.to(coef.dtype) + coef[1][:, None] * b_own.to(coef.dtype)[other]
        dtype_a, dtype_b = ctx.dtypes
        return (grad_a.to(dtype_a), None if grad_b is None else grad_b.to(dtype_b), None, None)


def split_contrastive(kernels, a: Tensor, b: Tensor | None, combine: str
                      ) -> tuple[Tensor, Tensor]:
    """(L_base, L_int) of this rank's rows (B = 2N, views stacked) with negatives from every
    rank, the job's tile pairs split among the ranks. `kernels` must provide pairs_forward,
    pairs_backward and pair_block_rows."""
    _check_same_batch_shape(a)
    return SplitContrastive.apply(a, b, kernels, combine)
