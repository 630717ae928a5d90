"""The single-process NT-Xent sweep over unordered pairs of row blocks (docs/math.md §3-4), as
Triton kernels: the "symmetric" sweep of `triton_contrastive` (`set_sweep`).

With the columns being the rows themselves, the logits are symmetric, so a tile (i, j) of row
blocks i < j also stands for its transpose (j, i): computed once, it serves block i's rows as
they are and block j's rows through the columns, half the products of a full sweep:

- forward: a tile's negatives fold into the running (max, sum of exp) of its rows (registers)
  and of its columns (a float32 buffer, one entry a row). One exponential per entry serves both
  sides (shifted by the tile's maximum) unless some row or column of the tile lies more than
  SPAN below it, where the tile is redone with per-row and per-column shifts;
- backward: the coefficient tile T = (p_row + p_col - 2Y)/B gives d(rows_i) += T A_j
  (registers) and d(rows_j) += Tᵀ A_i (a float32 buffer).

A program takes row block i and one segment of its distances k = j - i (so that every program
has at most `segment_tiles` tiles). The column side of a tile is added to its block's buffer in
a fixed order, by distance, so that results are bit-identical run to run without atomics on the
data: a turn counter per block (per BLOCK_N-column piece in the backward) says how many
distances have been added, and the tile at distance k waits for k - 1, taking the turn only for
its additions. A program's work follows from a ticket it takes when it starts
(segment by segment, row blocks from the last), and it only ever waits for tiles of programs
with smaller tickets: those started earlier, so they are running or done and the wait ends.
(This is the ordering argument of decoupled look-back scans.) Within a segment, the tile
(i + 1, j) a program waits for is the one its predecessor computed one step earlier, so
programs that start together do not wait on each other. The row side of the backward goes to a
second buffer, in segment order under a second counter.

The kernels hold whole feature rows. On a GPU they take 2-byte features up to D = 128 (the
tiles that compile without register spills, `supports`); under the interpreter every dtype up to
the whole-row width. The caller falls back to the full sweep otherwise.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import (LN2, LOG2E, acc_dtype, dot_nt, interpreting, load_tile,
                            natural_lse, on_device_of, traceable, whole_d_blocking)
from .triton_contrastive import (_mask_weights, _needs_masks, _online_lse, _softmax_weights,
                                 _take_positives, _term_weights, _tile_masks)
from .triton_pairs import _add_rows, _merge


@triton.jit
def _take_turn(turn_ptr, turn):
    """Wait until the counter at turn_ptr reads `turn`; the writes released before it was set
    are visible to every thread after this."""
    while tl.atomic_add(turn_ptr, 0, sem="acquire") != turn:
        pass
    tl.debug_barrier()


@triton.jit
def _pass_turn(turn_ptr, next_turn):
    """Set the counter once every thread's writes are done (release)."""
    tl.debug_barrier()
    tl.atomic_xchg(turn_ptr, next_turn, sem="release")


@triton.jit
def _my_work(counters_ptr, n_blocks, segment_tiles):
    """(row block i, segment, first distance, last distance + 1) of the ticket this program
    takes: segment-major, row blocks from the last, as the ordering argument needs."""
    ticket = tl.atomic_add(counters_ptr, 1, sem="relaxed")
    segment = ticket // n_blocks
    i = n_blocks - 1 - ticket % n_blocks
    k0 = segment * segment_tiles
    return i, segment, k0, tl.minimum(k0 + segment_tiles, n_blocks - i)


@triton.jit
def _fold_both(s, m, l, SPAN: tl.constexpr):
    """Fold a tile of negatives (-inf elsewhere) into its rows' running (m, l) and return them
    with the column side's (shift, sum), shifts in base-2 units: one exponential per entry,
    shifted by the tile's maximum, unless a row or column with entries lies more than SPAN
    (natural units) below it (its sum would lose its precision), then with a shift per row and
    per column."""
    row_max = tl.max(s, 1)
    col_max = tl.max(s, 0)
    top = tl.max(row_max, 0)
    far = (tl.sum(((row_max > float("-inf")) & (row_max < top - SPAN)).to(tl.int32), 0)
           + tl.sum(((col_max > float("-inf")) & (col_max < top - SPAN)).to(tl.int32), 0))
    if far == 0:
        ref = tl.where(top == float("-inf"), 0.0, top * LOG2E)
        e = tl.exp2(s * LOG2E - ref)
        row_shift = tl.where(row_max == float("-inf"), float("-inf"), ref)
        col_shift = tl.where(col_max == float("-inf"), float("-inf"), ref)
        row_sum = tl.sum(e, 1)
        col_sum = tl.sum(e, 0)
    else:
        row_shift = row_max * LOG2E
        col_shift = col_max * LOG2E
        row_ref = tl.where(row_max == float("-inf"), 0.0, row_shift)
        col_ref = tl.where(col_max == float("-inf"), 0.0, col_shift)
        row_sum = tl.sum(tl.exp2(s * LOG2E - row_ref[:, None]), 1)
        col_sum = tl.sum(tl.exp2(s * LOG2E - col_ref[None, :]), 0)
    m, l = _merge(m, l, row_shift, row_sum)
    return m, l, col_shift, col_sum


@triton.jit
def _add_column_stats(max_ptr, sum_ptr, pos_ptr, cols, col_mask, shift, total, pos):
    """Merge a tile's column statistics into the buffers (read past the cache: other programs
    wrote them)."""
    m_old = tl.load(max_ptr + cols, mask=col_mask, other=float("-inf"), cache_modifier=".cg")
    l_old = tl.load(sum_ptr + cols, mask=col_mask, other=0.0, cache_modifier=".cg")
    p_old = tl.load(pos_ptr + cols, mask=col_mask, other=0.0, cache_modifier=".cg")
    m, l = _merge(m_old, l_old, shift, total)
    tl.store(max_ptr + cols, m, mask=col_mask)
    tl.store(sum_ptr + cols, l, mask=col_mask)
    tl.store(pos_ptr + cols, p_old + pos, mask=col_mask)


@triton.jit
def _symmetric_fwd_kernel(
    a_ptr, b_ptr, counters_ptr, lse_ptr, pos_ptr, cmax_ptr, csum_ptr, cpos_ptr,
    B, D, n_blocks, segment_tiles,
    INT_MODE: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Rows' lse of negatives and positive logits over their segment, per term, to
    (terms, segments, B); the column side merged into cmax/csum/cpos (terms, B)."""
    i, segment, k0, k1 = _my_work(counters_ptr, n_blocks, segment_tiles)
    SPAN: tl.constexpr = 560.0 if FP64 else 48.0
    acc_ty = tl.float64 if FP64 else tl.float32
    rows = i * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < B
    a_r = load_tile(a_ptr, rows, row_mask, 0, D, BLOCK_D)
    m_base = tl.full((BLOCK,), float("-inf"), acc_ty)
    l_base = tl.zeros((BLOCK,), acc_ty)
    pos_base = tl.zeros((BLOCK,), acc_ty)
    m_int = tl.full((BLOCK,), float("-inf"), acc_ty)
    l_int = tl.zeros((BLOCK,), acc_ty)
    pos_int = tl.zeros((BLOCK,), acc_ty)
    if INT_MODE != 0:
        b_r = load_tile(b_ptr, rows, row_mask, 0, D, BLOCK_D)
    for k in range(k0, k1):
        j = i + k
        cols = j * BLOCK + tl.arange(0, BLOCK)
        col_mask = cols < B
        a_c = load_tile(a_ptr, cols, col_mask, 0, D, BLOCK_D)
        s_aa = dot_nt(a_r, a_c, a_ptr, rows, row_mask, a_ptr, cols, col_mask, D,
                      BLOCK, BLOCK, BLOCK_D, True, FP64, PREC)
        s_int = s_aa
        if INT_MODE != 0:
            b_c = load_tile(b_ptr, cols, col_mask, 0, D, BLOCK_D)
            s_int = dot_nt(b_r, b_c, b_ptr, rows, row_mask, b_ptr, cols, col_mask, D,
                           BLOCK, BLOCK, BLOCK_D, True, FP64, PREC)
            if INT_MODE == 1:
                s_int += s_aa
        # Positives found here, for the rows and (the relation is symmetric) the columns.
        cpos_base = tl.zeros((BLOCK,), acc_ty)
        cpos_int = tl.zeros((BLOCK,), acc_ty)
        # A tile past B (in the last block column) or one holding a row's own or positive
        # column is masked; the others fold every entry.
        if (j * BLOCK + BLOCK > B) | _needs_masks(rows, row_mask, j * BLOCK, j * BLOCK + BLOCK - 1,
                                                  B, 0, False):
            # The positive relation is symmetric: the rows' masks serve the columns too.
            valid, is_pos = _tile_masks(rows, row_mask, cols, col_mask, B, 0, True, False)
            cpos_base = tl.sum(tl.where(is_pos, s_aa, 0.0), 0)
            s_aa, pos_base = _take_positives(s_aa, pos_base, valid, is_pos)
            if INT_MODE != 0:
                cpos_int = tl.sum(tl.where(is_pos, s_int, 0.0), 0)
                s_int, pos_int = _take_positives(s_int, pos_int, valid, is_pos)
        if k == 0:  # the diagonal tile holds both orientations of its pairs: rows only
            m_base, l_base = _online_lse(m_base, l_base, s_aa)
            if INT_MODE != 0:
                m_int, l_int = _online_lse(m_int, l_int, s_int)
        else:
            m_base, l_base, c_shift_base, c_sum_base = _fold_both(s_aa, m_base, l_base, SPAN)
            if INT_MODE != 0:
                m_int, l_int, c_shift_int, c_sum_int = _fold_both(s_int, m_int, l_int, SPAN)
            _take_turn(counters_ptr + 1 + j, k - 1)
            _add_column_stats(cmax_ptr, csum_ptr, cpos_ptr, cols, col_mask, c_shift_base,
                              c_sum_base, cpos_base)
            if INT_MODE != 0:
                _add_column_stats(cmax_ptr + B, csum_ptr + B, cpos_ptr + B, cols, col_mask,
                                  c_shift_int, c_sum_int, cpos_int)
            _pass_turn(counters_ptr + 1 + j, k)

    out = segment * B + rows
    tl.store(lse_ptr + out, natural_lse(m_base, l_base), mask=row_mask)
    tl.store(pos_ptr + out, pos_base, mask=row_mask)
    if INT_MODE != 0:
        out += tl.num_programs(0) // n_blocks * B
        tl.store(lse_ptr + out, natural_lse(m_int, l_int), mask=row_mask)
        tl.store(pos_ptr + out, pos_int, mask=row_mask)


@triton.jit
def _symmetric_bwd_kernel(
    a_ptr, b_ptr, counters_ptr, lse_ptr, grad_ptr, col_a_ptr, col_b_ptr, row_a_ptr, row_b_ptr,
    B, D, n_blocks, segment_tiles,
    INT_MODE: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The rows' gradients (a, and b unless "none") in two float32 (B, D) buffers each: the
    column sides of the tiles (col_*) and the row sides (row_*), their sum the gradient."""
    i, segment, k0, k1 = _my_work(counters_ptr, n_blocks, segment_tiles)
    acc_ty = tl.float64 if FP64 else tl.float32
    rows = i * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < B
    a_r = load_tile(a_ptr, rows, row_mask, 0, D, BLOCK_D)
    lse_r_base = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    lse_r_int = tl.load(lse_ptr + B + rows, mask=row_mask, other=0.0)
    scale_a, w_base, w_int, g_int = _term_weights(grad_ptr, INT_MODE, FP64)
    scale_a = scale_a / B
    scale_b = g_int / B
    acc_a = tl.zeros((BLOCK, BLOCK_D), acc_ty)
    acc_b = tl.zeros((BLOCK, BLOCK_D), acc_ty)
    if INT_MODE != 0:
        b_r = load_tile(b_ptr, rows, row_mask, 0, D, BLOCK_D)
    # Block j in BLOCK_N-column pieces, one loop over all of them: (BLOCK, BLOCK_N) coefficient
    # tiles and one (BLOCK_N, BLOCK_D) column product at a time keep the row accumulators in
    # registers.
    PIECES: tl.constexpr = BLOCK // BLOCK_N
    for piece in range(k0 * PIECES, k1 * PIECES):
        k = piece // PIECES
        j = i + k
        c0 = j * BLOCK + piece % PIECES * BLOCK_N
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < B
        a_c = load_tile(a_ptr, cols, col_mask, 0, D, BLOCK_D)
        lse_c_base = tl.load(lse_ptr + cols, mask=col_mask, other=0.0)
        s_aa = dot_nt(a_r, a_c, a_ptr, rows, row_mask, a_ptr, cols, col_mask, D,
                      BLOCK, BLOCK_N, BLOCK_D, True, FP64, PREC)
        t_a = _softmax_weights(s_aa, lse_r_base, lse_c_base, True, True)
        if INT_MODE != 0:
            b_c = load_tile(b_ptr, cols, col_mask, 0, D, BLOCK_D)
            lse_c_int = tl.load(lse_ptr + B + cols, mask=col_mask, other=0.0)
            s_int = dot_nt(b_r, b_c, b_ptr, rows, row_mask, b_ptr, cols, col_mask, D,
                           BLOCK, BLOCK_N, BLOCK_D, True, FP64, PREC)
            if INT_MODE == 1:
                s_int += s_aa
            t_b = _softmax_weights(s_int, lse_r_int, lse_c_int, True, True)
        if (c0 + BLOCK_N > B) | _needs_masks(rows, row_mask, c0, c0 + BLOCK_N - 1, B, 0,
                                             False):
            valid, is_pos = _tile_masks(rows, row_mask, cols, col_mask, B, 0, True, False)
            t_a = _mask_weights(t_a, valid, is_pos, True, True)
            if INT_MODE != 0:
                t_b = _mask_weights(t_b, valid, is_pos, True, True)
        # Coefficients become dot operands in the features' dtype once they are mixed.
        if INT_MODE != 0:
            t_b_op = t_b.to(b_c.dtype)
            acc_b = tl.dot(t_b_op, b_c, acc_b, input_precision=PREC, out_dtype=acc_ty)
            if INT_MODE == 1:  # "concat": a also enters the interventional logits
                t_a = t_a * w_base + t_b * w_int
        t_a_op = t_a.to(a_c.dtype)
        acc_a = tl.dot(t_a_op, a_c, acc_a, input_precision=PREC, out_dtype=acc_ty)
        if k > 0:  # the transposed tile: the columns' rows get Tᵀ times this block's rows
            # Each piece of columns has its own counter, held only for its additions.
            col_turn = counters_ptr + 1 + c0 // BLOCK_N
            col_a = tl.dot(tl.trans(t_a_op), a_r, input_precision=PREC, out_dtype=acc_ty)
            if INT_MODE != 0:
                col_b = tl.dot(tl.trans(t_b_op), b_r, input_precision=PREC,
                               out_dtype=acc_ty)
            _take_turn(col_turn, k - 1)
            _add_rows(col_a_ptr, cols, col_mask, D, col_a * scale_a, BLOCK_D)
            if INT_MODE != 0:
                _add_rows(col_b_ptr, cols, col_mask, D, col_b * scale_b, BLOCK_D)
            _pass_turn(col_turn, k)
    if k1 > k0:  # (an empty segment is followed by empty ones only: nobody waits for it)
        row_turn = counters_ptr + 1 + n_blocks * PIECES + i
        _take_turn(row_turn, segment)
        _add_rows(row_a_ptr, rows, row_mask, D, acc_a * scale_a, BLOCK_D)
        if INT_MODE != 0:
            _add_rows(row_b_ptr, rows, row_mask, D, acc_b * scale_b, BLOCK_D)
        _pass_turn(row_turn, segment + 1)


# Tiles: BLOCK rows a block, the backward's pieces BLOCK_N columns wide, forward and backward
# warps, pipeline stages. Fixed, not autotuned (the kernels add into their buffers, and both
# kernels must cut the rows alike). On a GPU only 2-byte tensor-core operands up to D = 128 have
# a configuration that compiles for sm_90 without register spills in "concat" (the backward holds
# two (BLOCK, D) float32 row accumulators next to a (BLOCK_N, D) column product; FMA dots and
# D = 256 spilled at every tile tried), checked by
# tests/test_triton.py::test_shipped_configs_do_not_spill; the other problems take the full sweep.
_GPU_CONFIG = (32, 16, 4, 8, 2)
_GPU_MAX_D = 128
_INTERPRET_CONFIG = (32, 16, 1, 1, 1)
# Tiles per program: about an eighth of what each of ~264 concurrent programs does in all, so
# that the last programs to start end close together.
_TARGET_PROGRAMS = 264
_INTERPRET_SEGMENT_TILES = 2


def supports(dtype: torch.dtype, precision: str, dim: int) -> bool:
    """Whether features of `dtype` and width `dim` can take the symmetric sweep."""
    if interpreting():
        return whole_d_blocking(dim, True, dtype, precision)[1] == 1
    return dtype in (torch.float16, torch.bfloat16) and dim <= _GPU_MAX_D


def config() -> tuple[int, int, int, int, int]:
    """(BLOCK, BLOCK_N, forward warps, backward warps, stages)."""
    return _INTERPRET_CONFIG if interpreting() else _GPU_CONFIG


def _layout(B: int) -> tuple[int, int]:
    """(row blocks, tiles per segment) for B rows."""
    n_blocks = triton.cdiv(B, config()[0])
    if interpreting():
        return n_blocks, _INTERPRET_SEGMENT_TILES
    pairs = n_blocks * (n_blocks + 1) // 2
    return n_blocks, max(1, min(n_blocks, triton.cdiv(pairs, 8 * _TARGET_PROGRAMS)))


def forward(a: Tensor, b: Optional[Tensor], mode: int, precision: str,
            block_d: int) -> Tuple[Tensor, Tensor]:
    """(lse of every row's negatives, its positive logit), (terms, B) each."""
    (B, D), terms = a.shape, (2 if mode else 1)
    acc = acc_dtype(a.dtype)
    block, _, warps, _, stages = config()
    n_blocks, segment_tiles = _layout(B)
    segments = triton.cdiv(n_blocks, segment_tiles)
    lse_parts = a.new_empty(terms, segments, B, dtype=acc)
    pos_parts = torch.empty_like(lse_parts)
    col_max = torch.full((terms, B), float("-inf"), dtype=acc, device=a.device)
    col_sum = torch.zeros((terms, B), dtype=acc, device=a.device)
    col_pos = torch.zeros((terms, B), dtype=acc, device=a.device)
    counters = torch.zeros(1 + n_blocks, dtype=torch.int32, device=a.device)
    with on_device_of(a):
        traceable(_symmetric_fwd_kernel)[(segments * n_blocks,)](
            a, b if mode else a, counters, lse_parts, pos_parts, col_max, col_sum, col_pos,
            B, D, n_blocks, segment_tiles, INT_MODE=mode, FP64=a.dtype == torch.float64,
            PREC=precision, BLOCK_D=block_d, BLOCK=block, num_warps=warps, num_stages=stages)
    # -inf where a row had no negative in a column; the maxima are in base-2 units
    col_lse = (col_max + torch.log2(col_sum)) * LN2.value
    negatives_lse = torch.logsumexp(torch.cat([lse_parts, col_lse[:, None]], dim=1), dim=1)
    return negatives_lse, pos_parts.sum(dim=1) + col_pos


def backward(grad_losses: Tensor, a: Tensor, b: Optional[Tensor], row_lse: Tensor, mode: int,
             precision: str, block_d: int) -> Tuple[Tensor, Tensor]:
    """(da, db) in the features' dtype (db empty for "none")."""
    B, D = a.shape
    acc = acc_dtype(a.dtype)
    block, block_n, _, warps, stages = config()
    n_blocks, segment_tiles = _layout(B)
    segments = triton.cdiv(n_blocks, segment_tiles)
    # [ticket, a turn per BLOCK_N-column piece (the column sides), a turn per block (the rows)]
    counters = torch.zeros(1 + n_blocks * (block // block_n) + n_blocks, dtype=torch.int32,
                           device=a.device)

    def buffer(rows: int) -> Tensor:  # separate tensors: the kernel writes them, none aliased
        return torch.zeros((rows, D), dtype=acc, device=a.device)

    col_a, row_a = buffer(B), buffer(B)
    col_b, row_b = (buffer(B), buffer(B)) if mode else (buffer(0), buffer(0))  # never written
    with on_device_of(a):
        traceable(_symmetric_bwd_kernel)[(segments * n_blocks,)](
            a, b if mode else a, counters, row_lse, grad_losses, col_a, col_b, row_a, row_b,
            B, D, n_blocks, segment_tiles, INT_MODE=mode, FP64=a.dtype == torch.float64,
            PREC=precision, BLOCK_D=block_d, BLOCK=block, BLOCK_N=block_n, num_warps=warps,
            num_stages=stages)
    grad_a = (col_a + row_a).to(a.dtype)
    grad_b = (col_b + row_b).to(a.dtype) if mode else a.new_empty(0)
    return grad_a, grad_b
