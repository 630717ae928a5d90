"""The symmetric tile-pair sweep of NT-Xent (docs/math.md §3-4, §6) as Triton kernels: the ops
icl_msr_triton::contrastive_pairs_forward / contrastive_pairs_backward of `kernels.ops`.

The M rows (every rank's rows, each rank's two views side by side in groups of `group_rows`)
are cut into blocks; a schedule (`distributed.tile_schedule`) lists unordered block pairs (i, j)
in rounds in which no block appears twice. One launch runs one round, one program per pair, so
a program may read-modify-write the statistics and gradient rows of both its blocks without
atomics, and every row's contributions arrive in the order of the schedule: deterministic.

A program walks its pair in BLOCK × BLOCK sub-tiles (only the upper triangle of a diagonal
pair), computing each logit tile once:

- forward: the tile folds into the running (max, sum of exp) of its rows' negatives and, off the
  diagonal, of its columns' (the tile also stands for its transpose);
- backward: its gradient coefficients T = s_r exp(l - lse_r) + s_c exp(l - lse_c) (self and
  positive entries 0: the positives are handled by their owners) give dA_rows += T A_cols and,
  off the diagonal, dA_cols += Tᵀ A_rows.

The whole of D sits in one tile (BLOCK_D = next power of two of D).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import (LN2, LOG2E, acc_dtype, check_inputs, define_op, dot_precision,
                            interpreting, load_tile, on_device_of, traceable)

_COMBINE_CODES = {"none": 0, "concat": 1, "add": 2}


@triton.jit
def _merge(m_old, l_old, m_new_part, l_new_part):
    """(max, sum) merged with another (max, sum), maxima in base-2 units; -inf maxima (nothing
    seen) stay harmless."""
    m = tl.maximum(m_old, m_new_part)
    shift = tl.where(m == float("-inf"), 0.0, m)
    return m, l_old * tl.exp2(m_old - shift) + l_new_part * tl.exp2(m_new_part - shift)


@triton.jit
def _negatives(rows, cols, row_mask, col_mask, group_rows):
    """Entries of a tile that are negatives: neither a row's own column nor its positive."""
    half = group_rows // 2
    positive = rows // group_rows * group_rows + (rows % group_rows + half) % group_rows
    return (row_mask[:, None] & col_mask[None, :] & (cols[None, :] != rows[:, None])
            & (cols[None, :] != positive[:, None]))


@triton.jit
def _logits(a_r, a_c, b_r, b_c, INT_MODE: tl.constexpr, PREC: tl.constexpr):
    s_base = tl.dot(a_r, tl.trans(a_c), input_precision=PREC)
    s_int = s_base
    if INT_MODE != 0:
        s_b = tl.dot(b_r, tl.trans(b_c), input_precision=PREC)
        s_int = s_b + s_base if INT_MODE == 1 else s_b
    return s_base, s_int


@triton.jit
def _fold_columns(max_ptr, sum_ptr, cols, col_mask, s, valid):
    """Merge a tile's column statistics into the running ones of its columns (global)."""
    s = tl.where(valid, s, float("-inf"))
    m_tile = tl.max(s, 0) * LOG2E
    shift = tl.where(m_tile == float("-inf"), 0.0, m_tile)
    l_tile = tl.sum(tl.exp2(s * LOG2E - shift[None, :]), 0)
    m_old = tl.load(max_ptr + cols, mask=col_mask, other=float("-inf"))
    l_old = tl.load(sum_ptr + cols, mask=col_mask, other=0.0)
    m, l = _merge(m_old, l_old, m_tile, l_tile)
    tl.store(max_ptr + cols, m, mask=col_mask)
    tl.store(sum_ptr + cols, l, mask=col_mask)


@triton.jit
def _fold_rows(s, valid, m, l):
    s = tl.where(valid, s, float("-inf"))
    m_tile = tl.max(s, 1) * LOG2E
    shift = tl.where(m_tile == float("-inf"), 0.0, m_tile)
    return _merge(m, l, m_tile, tl.sum(tl.exp2(s * LOG2E - shift[:, None]), 1))


@triton.jit
def _pairs_fwd_kernel(
    a_ptr, b_ptr, starts_ptr, pairs_ptr, max_ptr, sum_ptr,
    M, D, Db, group_rows,
    INT_MODE: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DB: tl.constexpr,
):
    """One block pair of the round: the negatives' (max, sum) of both blocks' rows, read,
    merged and written back in max_ptr / sum_ptr (terms, M)."""
    pair = tl.program_id(0)
    i = tl.load(pairs_ptr + 2 * pair)
    j = tl.load(pairs_ptr + 2 * pair + 1)
    i0, i1 = tl.load(starts_ptr + i), tl.load(starts_ptr + i + 1)
    j0, j1 = tl.load(starts_ptr + j), tl.load(starts_ptr + j + 1)
    acc_ty = tl.float64 if FP64 else tl.float32
    for r0 in range(i0, i1, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        row_mask = rows < i1
        a_r = load_tile(a_ptr, rows, row_mask, 0, D, BLOCK_D)
        b_r = a_r
        if INT_MODE != 0:
            b_r = load_tile(b_ptr, rows, row_mask, 0, Db, BLOCK_DB)
        m_base = tl.full((BLOCK,), float("-inf"), acc_ty)
        l_base = tl.zeros((BLOCK,), acc_ty)
        m_int = tl.full((BLOCK,), float("-inf"), acc_ty)
        l_int = tl.zeros((BLOCK,), acc_ty)
        # A diagonal pair holds each unordered sub-tile pair once: the upper triangle.
        c_begin = tl.where(i == j, r0, j0)
        for c0 in range(c_begin, j1, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            col_mask = cols < j1
            a_c = load_tile(a_ptr, cols, col_mask, 0, D, BLOCK_D)
            b_c = a_c
            if INT_MODE != 0:
                b_c = load_tile(b_ptr, cols, col_mask, 0, Db, BLOCK_DB)
            s_base, s_int = _logits(a_r, a_c, b_r, b_c, INT_MODE, PREC)
            valid = _negatives(rows, cols, row_mask, col_mask, group_rows)
            m_base, l_base = _fold_rows(s_base, valid, m_base, l_base)
            if INT_MODE != 0:
                m_int, l_int = _fold_rows(s_int, valid, m_int, l_int)
            if c0 != r0:  # the tile's transpose: its columns' statistics
                _fold_columns(max_ptr, sum_ptr, cols, col_mask, s_base, valid)
                if INT_MODE != 0:
                    _fold_columns(max_ptr + M, sum_ptr + M, cols, col_mask, s_int, valid)
        m_old = tl.load(max_ptr + rows, mask=row_mask, other=float("-inf"))
        l_old = tl.load(sum_ptr + rows, mask=row_mask, other=0.0)
        m_new, l_new = _merge(m_old, l_old, m_base, l_base)
        tl.store(max_ptr + rows, m_new, mask=row_mask)
        tl.store(sum_ptr + rows, l_new, mask=row_mask)
        if INT_MODE != 0:
            m_old = tl.load(max_ptr + M + rows, mask=row_mask, other=float("-inf"))
            l_old = tl.load(sum_ptr + M + rows, mask=row_mask, other=0.0)
            m_new, l_new = _merge(m_old, l_old, m_int, l_int)
            tl.store(max_ptr + M + rows, m_new, mask=row_mask)
            tl.store(sum_ptr + M + rows, l_new, mask=row_mask)


@triton.jit
def _coefficients(s, valid, lse_r, lse_c, scale_r, scale_c):
    """s_r exp(l - lse_r) + s_c exp(l - lse_c) on the negatives, 0 elsewhere."""
    t = (scale_r[:, None] * tl.exp2(s * LOG2E - (lse_r * LOG2E)[:, None])
         + scale_c[None, :] * tl.exp2(s * LOG2E - (lse_c * LOG2E)[None, :]))
    return tl.where(valid, t, 0.0)


@triton.jit
def _add_rows(ptr, rows, row_mask, D, value, BLOCK_D: tl.constexpr):
    """ptr[rows] += value over a row-major (n, D) float buffer. Read past L1 (".cg"): other
    programs write the buffer too (triton_symmetric's, within one launch)."""
    d = tl.arange(0, BLOCK_D)
    offsets = rows.to(tl.int64)[:, None] * D + d[None, :]
    mask = row_mask[:, None] & (d[None, :] < D)
    old = tl.load(ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    tl.store(ptr + offsets, old + value, mask=mask)


@triton.jit
def _pairs_bwd_kernel(
    a_ptr, b_ptr, starts_ptr, pairs_ptr, lse_ptr, scale_ptr, ga_ptr, gb_ptr,
    M, D, Db, group_rows,
    INT_MODE: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DB: tl.constexpr,
):
    """One block pair of the round: its negatives' contributions to the gradient rows of both
    blocks, added to ga_ptr / gb_ptr (M, D) in the accumulation dtype."""
    pair = tl.program_id(0)
    i = tl.load(pairs_ptr + 2 * pair)
    j = tl.load(pairs_ptr + 2 * pair + 1)
    i0, i1 = tl.load(starts_ptr + i), tl.load(starts_ptr + i + 1)
    j0, j1 = tl.load(starts_ptr + j), tl.load(starts_ptr + j + 1)
    acc_ty = tl.float64 if FP64 else tl.float32
    for r0 in range(i0, i1, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        row_mask = rows < i1
        a_r = load_tile(a_ptr, rows, row_mask, 0, D, BLOCK_D)
        b_r = a_r
        if INT_MODE != 0:
            b_r = load_tile(b_ptr, rows, row_mask, 0, Db, BLOCK_DB)
        lse_r_base = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        lse_r_int = tl.load(lse_ptr + M + rows, mask=row_mask, other=0.0)
        scale_r_base = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
        scale_r_int = tl.load(scale_ptr + M + rows, mask=row_mask, other=0.0)
        acc_a = tl.zeros((BLOCK, BLOCK_D), acc_ty)
        acc_b = tl.zeros((BLOCK, BLOCK_DB), acc_ty)
        c_begin = tl.where(i == j, r0, j0)
        for c0 in range(c_begin, j1, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            col_mask = cols < j1
            a_c = load_tile(a_ptr, cols, col_mask, 0, D, BLOCK_D)
            b_c = a_c
            if INT_MODE != 0:
                b_c = load_tile(b_ptr, cols, col_mask, 0, Db, BLOCK_DB)
            s_base, s_int = _logits(a_r, a_c, b_r, b_c, INT_MODE, PREC)
            valid = _negatives(rows, cols, row_mask, col_mask, group_rows)
            lse_c_base = tl.load(lse_ptr + cols, mask=col_mask, other=0.0)
            scale_c_base = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
            # Scales are at most 1 in magnitude (normalised on the host): the coefficients fit
            # a half-precision operand whatever the loss scale.
            t_a = _coefficients(s_base, valid, lse_r_base, lse_c_base, scale_r_base,
                                scale_c_base)
            if INT_MODE != 0:
                lse_c_int = tl.load(lse_ptr + M + cols, mask=col_mask, other=0.0)
                scale_c_int = tl.load(scale_ptr + M + cols, mask=col_mask, other=0.0)
                t_b = _coefficients(s_int, valid, lse_r_int, lse_c_int, scale_r_int,
                                    scale_c_int)
                acc_b = tl.dot(t_b.to(b_c.dtype), b_c, acc_b, input_precision=PREC,
                               out_dtype=acc_ty)
                if INT_MODE == 1:  # "concat": a enters the interventional logits too
                    t_a = t_a + t_b
                if c0 != r0:
                    _add_rows(gb_ptr, cols, col_mask, Db,
                              tl.dot(tl.trans(t_b).to(b_r.dtype), b_r, input_precision=PREC,
                                     out_dtype=acc_ty), BLOCK_DB)
            acc_a = tl.dot(t_a.to(a_c.dtype), a_c, acc_a, input_precision=PREC, out_dtype=acc_ty)
            if c0 != r0:
                _add_rows(ga_ptr, cols, col_mask, D,
                          tl.dot(tl.trans(t_a).to(a_r.dtype), a_r, input_precision=PREC,
                                 out_dtype=acc_ty), BLOCK_D)
        _add_rows(ga_ptr, rows, row_mask, D, acc_a, BLOCK_D)
        if INT_MODE != 0:
            _add_rows(gb_ptr, rows, row_mask, Db, acc_b, BLOCK_DB)


def _shape(a: Tensor, b: Optional[Tensor]) -> tuple[int, int, int, int]:
    """(BLOCK, BLOCK_D, BLOCK_DB, Db): sub-tile rows and the whole feature widths."""
    d, db = a.shape[1], (b.shape[1] if b is not None else 1)
    block_d = max(16, triton.next_power_of_2(d))
    block_db = max(16, triton.next_power_of_2(db))
    widest = max(block_d, block_db)
    block = 16 if interpreting() else (64 if widest <= 128 else 32 if widest <= 256 else 16)
    return block, block_d, block_db, db


def _rounds(pairs: Tensor) -> list[tuple[int, int]]:
    """[begin, end) of each round's rows in the (P, 3) schedule (sorted by round)."""
    rounds = pairs[:, 0].tolist() if pairs.numel() else []  # a CPU tensor: no device sync
    bounds, begin = [], 0
    for k in range(1, len(rounds) + 1):
        if k == len(rounds) or rounds[k] != rounds[begin]:
            bounds.append((begin, k))
            begin = k
    return bounds


@define_op("contrastive_pairs_forward")
def contrastive_pairs_forward(a: Tensor, b: Optional[Tensor], block_starts: Tensor,
                              pairs: Tensor, group_rows: int, combine: str
                              ) -> Tuple[Tensor, Tensor]:
    """(max, sum) (2, M) of every row's negatives over the listed block pairs."""
    check_inputs(a, b)
    mode = _COMBINE_CODES[combine]
    precision = dot_precision(a.dtype)
    a = a.contiguous()
    b = b.contiguous() if mode else a
    M, D = a.shape
    block, block_d, block_db, db = _shape(a, b if mode else None)
    acc = acc_dtype(a.dtype)
    neg_max = torch.full((2, M), float("-inf"), dtype=acc, device=a.device)
    neg_sum = torch.zeros((2, M), dtype=acc, device=a.device)
    starts = block_starts.to(device=a.device, dtype=torch.int64)
    pair_list = pairs[:, 1:].contiguous().to(a.device)
    with on_device_of(a):
        for begin, end in _rounds(pairs):
            traceable(_pairs_fwd_kernel)[(end - begin,)](
                a, b, starts, pair_list[begin:], neg_max, neg_sum, M, D, db, group_rows,
                INT_MODE=mode, FP64=a.dtype == torch.float64, PREC=precision, BLOCK=block,
                BLOCK_D=block_d, BLOCK_DB=block_db)
    # The kernels keep the maxima in base-2 units; the op's are natural, like the sums' shift.
    return neg_max.mul_(LN2.value), neg_sum


@define_op("contrastive_pairs_backward")
def contrastive_pairs_backward(a: Tensor, b: Optional[Tensor], block_starts: Tensor,
                               pairs: Tensor, row_lse: Tensor, row_scale: Tensor,
                               group_rows: int, combine: str) -> Tuple[Tensor, Tensor]:
    """(grad_a (M, D), grad_b (M, Db)) in the accumulation dtype: the listed pairs' negatives'
    share of the gradient rows (grad_b empty for "none")."""
    check_inputs(a, b)
    mode = _COMBINE_CODES[combine]
    precision = dot_precision(a.dtype)
    a = a.contiguous()
    b = b.contiguous() if mode else a
    M, D = a.shape
    block, block_d, block_db, db = _shape(a, b if mode else None)
    acc = acc_dtype(a.dtype)
    # Scale before casting down: coefficients in [-2, 2] whatever the upstream gradients.
    largest = row_scale.abs().amax().clamp_min(torch.finfo(acc).tiny)
    unit_scale = (row_scale.to(acc) / largest).contiguous()
    grad_a = torch.zeros((M, D), dtype=acc, device=a.device)
    grad_b = torch.zeros((M, db), dtype=acc, device=a.device) if mode else a.new_empty(0)
    starts = block_starts.to(device=a.device, dtype=torch.int64)
    pair_list = pairs[:, 1:].contiguous().to(a.device)
    row_lse = row_lse.to(acc).contiguous()
    with on_device_of(a):
        for begin, end in _rounds(pairs):
            traceable(_pairs_bwd_kernel)[(end - begin,)](
                a, b, starts, pair_list[begin:], row_lse, unit_scale,
                grad_a, grad_b if mode else grad_a, M, D, db, group_rows,
                INT_MODE=mode, FP64=a.dtype == torch.float64, PREC=precision, BLOCK=block,
                BLOCK_D=block_d, BLOCK_DB=block_db)
    grad_a = grad_a * largest
    if mode:
        grad_b = grad_b * largest
    return grad_a, grad_b
