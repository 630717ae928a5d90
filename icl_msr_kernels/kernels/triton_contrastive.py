"""NT-Xent (docs/math.md §2 steps 7-8) on both terms at once, as Triton kernels: the torch ops
icl_msr_triton::contrastive_forward / contrastive_backward of the shared op surface
(`kernels.ops`).

Features arrive pre-scaled by 1/sqrt(tau), so every similarity is already a logit. Local rows
(B of them, two views side by side) are compared with M columns: the rows themselves
(single process) or every rank's rows gathered (distributed negatives, this rank's rows
starting at column row_offset). The positive of row r is column row_offset + (r + B/2) mod B;
its own column row_offset + r is excluded. With explicit positive logits (memory-bank mode,
EXPLICIT_POS) every column is a negative and each row's positive is given. Base logits are a·a';
interventional ones are a·a' + b·b' ("concat") or b·b' ("add"); combine "none" has the base
term only. The forward folds only the negatives into the running log-sum-exp and merges the
positive at the end, lse = pos + log(1 + exp(lse_neg - pos)), so that each row's term is >= 0
and exactly 0 without negatives.

- forward: each program owns a block of rows and sweeps the column tiles once, computing the
  a·a' tile once for both terms and folding both into online log-sum-exps; it saves only the
  row lse (2, B) and never forms a B x M matrix;
- backward: tiles are recomputed. With G = (softmax_row - Y)/B per term, d(rows) = G cols and
  d(cols) = Gᵀ rows. One kernel does every sweep: a program owns a block of "owner" rows
  (features it writes the gradient of) and sweeps the "swept" ones, using the lse of whichever
  side is made of rows. Single process, owner = swept = rows and R symmetric, so
  G_ij + G_ji = (exp(S_ij - lse_i) + exp(S_ij - lse_j) - 2 Y_ij)/B gives a row's whole gradient
  in one sweep; distributed, one row-owned sweep gives d(rows) and one column-owned sweep
  d(cols).

Only the tiles that are partial or hold some row's own or positive column apply the masks (and
look for the positive logits); the others, nearly all of a large problem, fold every entry.
Exponentials are base 2 (`triton_common`): 2^(s log2(e) - m2), one FMA and one ex2 an entry.
Compiled, the FMA rounds only the difference, so at tau = 1e-3, where |s| reaches 1000, the
float32 error stays that of exp(s - m).

One contrastive problem has only B / BLOCK row blocks, so both sweeps are also split over
segments of the swept side (`segment_length`): each program writes partial results (a
segment's lse and positive logit, or a partial gradient) that torch combines in a fixed order.
Every program writes only its own outputs: no atomics, deterministic.
"""

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import (LOG2E, TunedKernel, acc_dtype, check_inputs, define_op, dot_nt,
                            dot_precision, load_tile, natural_lse, on_device_of,
                            segment_length, store_tile, uses_fma, whole_d_blocking)


@triton.jit
def _online_lse(m, l, s):
    """Fold a (rows, cols) tile of logits (-inf where an entry is no negative) into each row's
    running max (in base-2 units) and sum of exponentials."""
    m_new = tl.maximum(m, tl.max(s, 1) * LOG2E)
    # A row may have no valid column yet (its segment's first tiles held only its own column):
    # shift by 0 then, so that exp2(-inf - -inf) never makes a NaN.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    l = l * tl.exp2(m - shift) + tl.sum(tl.exp2(s * LOG2E - shift[:, None]), 1)
    return m_new, l


@triton.jit
def _take_positives(s, pos, valid, is_pos):
    """Record each row's positive logit from the tile and leave only its negatives (`valid`
    and not `is_pos`), the others -inf."""
    pos += tl.sum(tl.where(is_pos, s, 0.0), 1)
    return tl.where(valid & (is_pos == 0), s, float("-inf")), pos


@triton.jit
def _needs_masks(r, r_mask, c_lo, c_hi, B, row_offset, EXPLICIT_POS: tl.constexpr):
    """Whether a tile of anchor rows r (local, a contiguous range) and columns [c_lo, c_hi]
    holds some row's own column or its positive: only those tiles pay for the masks. (A row
    block's positives are a contiguous range of columns, or two when it wraps around B; their
    span covers both.)"""
    if EXPLICIT_POS:  # no column is a row's own or its positive
        return False
    big = 1 << 62
    lo = tl.min(tl.where(r_mask, r, big), 0)
    hi = tl.max(tl.where(r_mask, r, -1), 0)
    pos = (r + B // 2) % B
    pos_lo = tl.min(tl.where(r_mask, pos, big), 0)
    pos_hi = tl.max(tl.where(r_mask, pos, -1), 0)
    own = (row_offset + lo <= c_hi) & (row_offset + hi >= c_lo)
    positive = (row_offset + pos_lo <= c_hi) & (row_offset + pos_hi >= c_lo)
    return own | positive


@triton.jit
def _ntxent_fwd_kernel(
    a_ptr, b_ptr, ac_ptr, bc_ptr, lse_ptr, pos_ptr,
    B, M, D, row_offset, segment_cols,
    INT_MODE: tl.constexpr, EXPLICIT_POS: tl.constexpr, FP64: tl.constexpr,
    PREC: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Each row's lse of its negatives and its positive logit over one segment of columns, per
    term: (terms, segments, B) outputs, -inf and 0 where a row has none in the segment."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    segment = tl.program_id(1)
    segments = tl.num_programs(1)
    row_mask = rows < B
    self_col = row_offset + rows
    pos_col = row_offset + (rows + B // 2) % B
    acc_ty = tl.float64 if FP64 else tl.float32
    a = load_tile(a_ptr, rows, row_mask, 0, D, BLOCK_D)
    m_base = tl.full((BLOCK_M,), float("-inf"), acc_ty)
    l_base = tl.zeros((BLOCK_M,), acc_ty)
    pos_base = tl.zeros((BLOCK_M,), acc_ty)
    if INT_MODE != 0:
        b = load_tile(b_ptr, rows, row_mask, 0, D, BLOCK_D)
        m_int = tl.full((BLOCK_M,), float("-inf"), acc_ty)
        l_int = tl.zeros((BLOCK_M,), acc_ty)
        pos_int = tl.zeros((BLOCK_M,), acc_ty)

    col_start = segment * segment_cols  # a multiple of BLOCK_N: no tile crosses segments
    for c0 in range(col_start, tl.minimum(col_start + segment_cols, M), BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < M
        a_cols = load_tile(ac_ptr, cols, col_mask, 0, D, BLOCK_D)
        s_aa = dot_nt(a, a_cols, a_ptr, rows, row_mask, ac_ptr, cols, col_mask, D,
                      BLOCK_M, BLOCK_N, BLOCK_D, ONE_D, FP64, PREC)
        if INT_MODE != 0:
            b_cols = load_tile(bc_ptr, cols, col_mask, 0, D, BLOCK_D)
            s_int = dot_nt(b, b_cols, b_ptr, rows, row_mask, bc_ptr, cols, col_mask, D,
                           BLOCK_M, BLOCK_N, BLOCK_D, ONE_D, FP64, PREC)
            if INT_MODE == 1:  # "concat": the a·a' tile is shared with the base term
                s_int += s_aa
        # Most tiles are whole and hold no row's own or positive column: no masks there.
        # (Padded rows past B only ever reach their own, unstored, statistics.)
        if (c0 + BLOCK_N > M) | _needs_masks(rows, row_mask, c0, c0 + BLOCK_N - 1, B,
                                             row_offset, EXPLICIT_POS):
            if EXPLICIT_POS:  # every column is a negative
                valid = row_mask[:, None] & col_mask[None, :]
                is_pos = valid & (cols[None, :] < 0)  # nowhere
            else:
                valid = col_mask[None, :] & (cols[None, :] != self_col[:, None])
                is_pos = cols[None, :] == pos_col[:, None]
            s_aa, pos_base = _take_positives(s_aa, pos_base, valid, is_pos)
            if INT_MODE != 0:
                s_int, pos_int = _take_positives(s_int, pos_int, valid, is_pos)
        m_base, l_base = _online_lse(m_base, l_base, s_aa)
        if INT_MODE != 0:
            m_int, l_int = _online_lse(m_int, l_int, s_int)

    out = segment * B + rows
    tl.store(lse_ptr + out, natural_lse(m_base, l_base), mask=row_mask)
    tl.store(pos_ptr + out, pos_base, mask=row_mask)
    if INT_MODE != 0:
        out += segments * B
        tl.store(lse_ptr + out, natural_lse(m_int, l_int), mask=row_mask)
        tl.store(pos_ptr + out, pos_int, mask=row_mask)


@triton.jit
def _softmax_weights(s, lse_own, lse_swept, OWNER_ROWS: tl.constexpr, SWEPT_ROWS: tl.constexpr):
    """B·(G_os + G_so) before the masks, for the sides that are rows: the softmax weights."""
    p = tl.zeros(s.shape, s.dtype)
    if OWNER_ROWS:
        p += tl.exp2(s * LOG2E - (lse_own * LOG2E)[:, None])
    if SWEPT_ROWS:
        p += tl.exp2(s * LOG2E - (lse_swept * LOG2E)[None, :])
    return p


@triton.jit
def _mask_weights(p, valid, is_pos, OWNER_ROWS: tl.constexpr, SWEPT_ROWS: tl.constexpr):
    """The softmax weights with the excluded entries 0 and the positive indicator subtracted.

    Subtracting Y inside the tile, in float32, keeps the relative precision of p_pos - 1 (small
    once the positive dominates) before the tile is cast to a half-precision dot operand.
    """
    sides: tl.constexpr = OWNER_ROWS + SWEPT_ROWS
    return tl.where(valid, p, 0.0) - tl.where(is_pos, sides, 0.0)


@triton.jit
def _tile_masks(own, own_mask, swept, swept_mask, B, row_offset, OWNER_ROWS: tl.constexpr,
                EXPLICIT_POS: tl.constexpr):
    """(valid, is_pos) of an (owned, swept) tile: entries that are candidates of their anchor
    row (its own column excluded), and the positive ones among them."""
    # (local row r, global column c) of every tile entry
    if OWNER_ROWS:
        r = own[:, None]
        c = swept[None, :]
    else:
        r = swept[None, :]
        c = own[:, None]
    if EXPLICIT_POS:  # every column is a negative; the positives' gradient is taken apart
        valid = own_mask[:, None] & swept_mask[None, :]
        is_pos = valid & (c < 0)  # nowhere
    else:
        valid = own_mask[:, None] & swept_mask[None, :] & (c != row_offset + r)
        is_pos = valid & (c == row_offset + (r + B // 2) % B)
    return valid, is_pos


@triton.jit
def _term_weights(grad_ptr, INT_MODE: tl.constexpr, FP64: tl.constexpr):
    """(scale_a, w_base, w_int, g_int) from the upstream gradients of (L_base, L_int).

    The a-gradient of "concat" mixes both terms in one product; their tiles are weighted by
    w_t = g_t / scale_a, relative to the larger |g|, before the cast to the features' dtype, and
    scale_a goes on afterwards, so half-precision operands stay in range whatever the loss scale.
    """
    acc_ty: tl.constexpr = tl.float64 if FP64 else tl.float32
    g_base = tl.load(grad_ptr).to(acc_ty)
    g_int = tl.load(grad_ptr + 1).to(acc_ty)
    if INT_MODE == 1:
        scale_a = tl.maximum(tl.abs(g_base), tl.abs(g_int))
        scale_a = tl.where(scale_a == 0, 1.0, scale_a)
        w_base = g_base / scale_a
        w_int = g_int / scale_a
    else:
        scale_a = g_base
        w_base = g_base
        w_int = g_int
    return scale_a, w_base, w_int, g_int


@triton.jit
def _ntxent_bwd_kernel(
    oa_ptr, ob_ptr, sa_ptr, sb_ptr, lse_ptr, grad_ptr, da_ptr, db_ptr,
    n_own, n_swept, B, D, row_offset, segment_len,
    OWNER_ROWS: tl.constexpr, SWEPT_ROWS: tl.constexpr,
    INT_MODE: tl.constexpr, EXPLICIT_POS: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_D: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Gradients of the owner features (a, and b unless "none") from one segment of the swept
    rows, for one D chunk: rows segment * n_own + owner of the (segments * n_own, D) outputs."""
    own = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    own_mask = own < n_own
    d0 = tl.program_id(1) * BLOCK_D
    segment = tl.program_id(2)
    acc_ty = tl.float64 if FP64 else tl.float32
    oa = load_tile(oa_ptr, own, own_mask, d0, D, BLOCK_D)
    if OWNER_ROWS:
        lse_own_base = tl.load(lse_ptr + own, mask=own_mask, other=0.0)
        lse_own_int = tl.load(lse_ptr + B + own, mask=own_mask, other=0.0)
    else:
        lse_own_base = 0.0
        lse_own_int = 0.0

    scale_a, w_base, w_int, g_int = _term_weights(grad_ptr, INT_MODE, FP64)

    acc_a = tl.zeros((BLOCK_O, BLOCK_D), acc_ty)
    if INT_MODE != 0:
        ob = load_tile(ob_ptr, own, own_mask, d0, D, BLOCK_D)
        acc_b = tl.zeros((BLOCK_O, BLOCK_D), acc_ty)

    swept_start = segment * segment_len  # a multiple of BLOCK_S: no tile crosses segments
    for s0 in range(swept_start, tl.minimum(swept_start + segment_len, n_swept), BLOCK_S):
        swept = s0 + tl.arange(0, BLOCK_S)
        swept_mask = swept < n_swept
        if SWEPT_ROWS:
            lse_swept_base = tl.load(lse_ptr + swept, mask=swept_mask, other=0.0)
            lse_swept_int = tl.load(lse_ptr + B + swept, mask=swept_mask, other=0.0)
        else:
            lse_swept_base = 0.0
            lse_swept_int = 0.0

        sa = load_tile(sa_ptr, swept, swept_mask, d0, D, BLOCK_D)
        s_aa = dot_nt(oa, sa, oa_ptr, own, own_mask, sa_ptr, swept, swept_mask, D,
                      BLOCK_O, BLOCK_S, BLOCK_D, ONE_D, FP64, PREC)
        if INT_MODE != 0:
            sb = load_tile(sb_ptr, swept, swept_mask, d0, D, BLOCK_D)
            s_int = dot_nt(ob, sb, ob_ptr, own, own_mask, sb_ptr, swept, swept_mask, D,
                           BLOCK_O, BLOCK_S, BLOCK_D, ONE_D, FP64, PREC)
            if INT_MODE == 1:
                s_int += s_aa
        # The masks only where the tile is partial or holds some row's own or positive entry
        # (padded owner rows only reach their own, unstored, gradient rows).
        if OWNER_ROWS:
            special = _needs_masks(own, own_mask, s0, s0 + BLOCK_S - 1, B, row_offset,
                                   EXPLICIT_POS)
        else:
            special = _needs_masks(swept, swept_mask, tl.program_id(0) * BLOCK_O,
                                   tl.program_id(0) * BLOCK_O + BLOCK_O - 1, B, row_offset,
                                   EXPLICIT_POS)
        t_a = _softmax_weights(s_aa, lse_own_base, lse_swept_base, OWNER_ROWS, SWEPT_ROWS)
        if INT_MODE != 0:
            t_b = _softmax_weights(s_int, lse_own_int, lse_swept_int, OWNER_ROWS, SWEPT_ROWS)
        if (s0 + BLOCK_S > n_swept) | special:
            valid, is_pos = _tile_masks(own, own_mask, swept, swept_mask, B, row_offset,
                                        OWNER_ROWS, EXPLICIT_POS)
            t_a = _mask_weights(t_a, valid, is_pos, OWNER_ROWS, SWEPT_ROWS)
            if INT_MODE != 0:
                t_b = _mask_weights(t_b, valid, is_pos, OWNER_ROWS, SWEPT_ROWS)
        if INT_MODE != 0:
            acc_b = tl.dot(t_b.to(sb.dtype), sb, acc_b, input_precision=PREC,
                           out_dtype=acc_b.dtype)
            if INT_MODE == 1:  # "concat": a also enters the interventional logits
                t_a = t_a * w_base + t_b * w_int
        acc_a = tl.dot(t_a.to(sa.dtype), sa, acc_a, input_precision=PREC,
                       out_dtype=acc_a.dtype)

    out = segment * n_own + own
    store_tile(da_ptr, out, own_mask, d0, D, acc_a * (scale_a / B), BLOCK_D)
    if INT_MODE != 0:
        store_tile(db_ptr, out, own_mask, d0, D, acc_b * (g_int / B), BLOCK_D)


# Tile shapes (rows, columns, num_warps, num_stages); the first of each list is the default.
# The forward holds the row tiles and two (rows, cols) logit tiles, like a flash-attention
# forward without its output; the backward also holds one or two (rows, BLOCK_D) float32
# accumulators over the whole of D (up to 256), hence smaller tiles, and smaller still for
# BLOCK_D = 256 (the wide spaces). Every configuration here compiles for sm_90 without register
# spills in "concat", the heaviest mode, at D = 128 and, for the wide spaces, D = 256 (ptxas -v,
# checked by tests/test_triton.py::test_shipped_configs_do_not_spill); configurations that
# spilled were dropped. FMA dots (float32 "ieee", float64) keep whole operand rows in registers
# and need small tiles.
_FWD_MMA = [(128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)]
_FWD_FMA = [(32, 32, 16, 2), (32, 16, 8, 2), (16, 32, 8, 2)]
_FWD_WIDE_MMA = [(64, 32, 8, 3), (64, 16, 8, 3), (32, 16, 4, 2)]
_FWD_WIDE_FMA = [(32, 16, 8, 2), (16, 32, 8, 2), (32, 32, 8, 2)]
_BWD_MMA = [(64, 32, 8, 3), (32, 32, 8, 2), (64, 16, 8, 3), (32, 64, 8, 3)]
_BWD_FMA = [(32, 16, 8, 2), (16, 32, 4, 2), (32, 32, 16, 2), (32, 16, 4, 2)]
_BWD_WIDE = [(32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)]
# Everything that changes the compiled kernel, so that a timing is never reused across them.
_fwd = TunedKernel(_ntxent_fwd_kernel, ("BLOCK_M", "BLOCK_N"), _FWD_MMA, _FWD_FMA,
                   ["B", "M", "D", "INT_MODE", "EXPLICIT_POS", "FP64", "PREC"],
                   {"BLOCK_M": 16, "BLOCK_N": 16}, wide_mma=_FWD_WIDE_MMA,
                   wide_fma=_FWD_WIDE_FMA)
_bwd = TunedKernel(_ntxent_bwd_kernel, ("BLOCK_O", "BLOCK_S"), _BWD_MMA, _BWD_FMA,
                   ["n_own", "n_swept", "D", "INT_MODE", "OWNER_ROWS", "SWEPT_ROWS",
                    "EXPLICIT_POS", "FP64", "PREC"],
                   {"BLOCK_O": 16, "BLOCK_S": 16}, wide_mma=_BWD_WIDE, wide_fma=_BWD_WIDE)
_COMBINE_CODES = {"none": 0, "concat": 1, "add": 2}  # INT_MODE of the kernels


def _check_args(a, b, a_cols, positive_logits, combine):
    check_inputs(a, b, a_cols, positive_logits)
    if combine not in _COMBINE_CODES:
        raise ValueError(f"combine must be one of {', '.join(map(repr, _COMBINE_CODES))}, got "
                         f"{combine!r}")
    if positive_logits is None and a.shape[0] % 2:
        raise ValueError(f"contrastive rows must be the two views stacked (an even count), got "
                         f"{a.shape[0]}")
    if positive_logits is not None and a_cols is None:
        raise ValueError("a_cols must be given with positive_logits (the columns are the "
                         "negatives)")


def _symmetric_sweep(a: Tensor, a_cols: Optional[Tensor], precision: str,
                     symmetric: bool) -> bool:
    """Whether the problem on `a` takes the symmetric sweep: asked for (`ops.set_sweep`), one
    process, and kernels that fit it."""
    return (symmetric and a_cols is None
            and triton_symmetric.supports(a.dtype, precision, a.shape[1]))


@define_op("contrastive_forward")
def contrastive_forward(a: Tensor, b: Optional[Tensor], a_cols: Optional[Tensor],
                        b_cols: Optional[Tensor], positive_logits: Optional[Tensor],
                        row_offset: int, combine: str,
                        symmetric: bool = False) -> Tuple[Tensor, Tensor]:
    """(losses, lse): losses = [L_base, L_int] (2,), lse (2, B) the row log-sum-exps per term
    (the second row unused for "none")."""
    _check_args(a, b, a_cols, positive_logits, combine)
    precision = dot_precision(a.dtype)
    symmetric = _symmetric_sweep(a, a_cols, precision, symmetric)
    if a_cols is None:
        a_cols, b_cols = a, b
    mode = _COMBINE_CODES[combine]
    terms = 2 if mode else 1
    a, a_cols = a.contiguous(), a_cols.contiguous()
    # "none" has no b: the kernel never reads these pointers, any tensor will do.
    b, b_cols = (b.contiguous(), b_cols.contiguous()) if mode else (a, a_cols)
    (B, D), M = a.shape, a_cols.shape[0]
    acc = acc_dtype(a.dtype)
    block_d, n_chunks = whole_d_blocking(D, False, a.dtype, precision)
    if symmetric:
        with on_device_of(a):
            negatives_lse, pos = triton_symmetric.forward(a, b, mode, precision, block_d)
    else:
        segment_cols = segment_length(B, 1, M)
        segments = triton.cdiv(M, segment_cols)
        lse_parts = a.new_empty(terms, segments, B, dtype=acc)
        pos_parts = torch.empty_like(lse_parts)
        with on_device_of(a):
            _fwd.launch(lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), segments), a, b, a_cols,
                        b_cols, lse_parts, pos_parts, B, M, D, row_offset, segment_cols,
                        fma=uses_fma(a.dtype, precision), INT_MODE=mode,
                        EXPLICIT_POS=positive_logits is not None,
                        FP64=a.dtype == torch.float64, PREC=precision, BLOCK_D=block_d,
                        ONE_D=n_chunks == 1)
        negatives_lse = torch.logsumexp(lse_parts, dim=1)  # (terms, B)
        pos = (pos_parts.sum(dim=1) if positive_logits is None
               else positive_logits[:terms].to(acc))
    # lse - pos = log(1 + exp(negatives_lse - pos)): >= 0, and exactly 0 without negatives.
    row_terms = torch.logaddexp(torch.zeros_like(pos), negatives_lse - pos)
    lse = pos + row_terms
    losses = row_terms.sum(dim=1) / B
    if terms == 1:  # "none": L_int is zero
        lse = torch.cat([lse, torch.zeros_like(lse)])
        losses = torch.cat([losses, torch.zeros_like(losses)])
    return losses, lse


@define_op("contrastive_backward")
def contrastive_backward(grad_losses: Tensor, a: Tensor, b: Optional[Tensor],
                         a_cols: Optional[Tensor], b_cols: Optional[Tensor],
                         positive_logits: Optional[Tensor], row_lse: Tensor, row_offset: int,
                         combine: str, column_grads: bool,
                         symmetric: bool = False) -> List[Tensor]:
    """[da, db, da_cols, db_cols] of `contrastive_forward`; an empty tensor for each absent
    input. (The explicit positive logits' gradient is taken in `kernels.ops`.)"""
    _check_args(a, b, a_cols, positive_logits, combine)
    precision = dot_precision(a.dtype)
    mode = _COMBINE_CODES[combine]
    grad_losses = grad_losses.to(row_lse.dtype).contiguous()
    row_lse = row_lse.contiguous()
    a = a.contiguous()
    b = b.contiguous() if mode else a
    (B, D) = a.shape
    block_d, n_chunks = whole_d_blocking(D, True, a.dtype, precision)
    consts = dict(fma=uses_fma(a.dtype, precision), INT_MODE=mode,
                  EXPLICIT_POS=positive_logits is not None, FP64=a.dtype == torch.float64,
                  PREC=precision, BLOCK_D=block_d, ONE_D=n_chunks == 1)

    def sweep(own_a, own_b, swept_a, swept_b, owner_rows, swept_rows):
        n_own, n_swept = own_a.shape[0], swept_a.shape[0]
        segment_len = segment_length(n_own, n_chunks, n_swept)
        segments = triton.cdiv(n_swept, segment_len)
        # One segment writes the gradients themselves; several write float32 partial sums.
        dtype = a.dtype if segments == 1 else acc_dtype(a.dtype)
        d_a = own_a.new_empty(segments * n_own, D, dtype=dtype)
        d_b = own_b.new_empty(segments * n_own, D, dtype=dtype) if mode else d_a  # never written
        _bwd.launch(lambda meta: (triton.cdiv(n_own, meta["BLOCK_O"]), n_chunks, segments),
                    own_a, own_b, swept_a, swept_b, row_lse, grad_losses, d_a, d_b,
                    n_own, n_swept, B, D, row_offset, segment_len,
                    OWNER_ROWS=owner_rows, SWEPT_ROWS=swept_rows, **consts)
        grads = (d_a, d_b) if mode else (d_a,)
        if segments > 1:
            grads = tuple(g.view(segments, n_own, D).sum(dim=0).to(a.dtype) for g in grads)
        return grads if mode else (grads[0], a.new_empty(0))

    with on_device_of(a):
        # Absent gradients are distinct empty tensors: op outputs may not alias each other.
        if _symmetric_sweep(a, a_cols, precision, symmetric):
            grads = triton_symmetric.backward(grad_losses, a, b, row_lse, mode, precision,
                                              block_d)
            return [*grads, a.new_empty(0), a.new_empty(0)]
        if a_cols is None:  # single process: every row's whole gradient in one sweep (G + Gᵀ)
            return [*sweep(a, b, a, b, True, True), a.new_empty(0), a.new_empty(0)]
        a_cols = a_cols.contiguous()
        b_cols = b_cols.contiguous() if mode else a_cols
        da, db = sweep(a, b, a_cols, b_cols, True, False)
        if not column_grads:  # a constant memory bank: no column sweep
            return [da, db, a.new_empty(0), a.new_empty(0)]
        da_cols, db_cols = sweep(a_cols, b_cols, a, b, False, True)
    return [da, db, da_cols, db_cols]


# The symmetric sweep builds on this module's tile helpers; imported last, once they exist.
from . import triton_symmetric  # noqa: E402
