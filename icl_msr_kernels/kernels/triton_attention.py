"""Prototype attention C = W P (docs/math.md §2 steps 4-6) as Triton kernels: the torch ops
icl_msr_triton::attention_forward / attention_backward of the shared op surface (`kernels.ops`).

W = exp(E + log pi - lse) with E = x Pᵀ / tau_a, where lse = lse_k(E + log pi) ("logit") or
lse_k(E) ("mult": W = softmax(E) · pi); the forward saves only lse (one float a row).

- forward: one program per block of rows (and D chunk) sweeps the prototypes in BLOCK_K tiles
  with an online softmax, flash-attention style (2N queries; K keys that are also the values);
- backward, with dW = dC Pᵀ and delta = <dC_a, C_a>:
  dE = W∘(dW - delta) ("logit") or W∘dW - softmax(E)∘delta ("mult"),
  dx = dE P / tau_a from a row-owned sweep over prototype tiles, and
  dP = dEᵀ x / tau_a + Wᵀ dC, d log pi = sum_a dE ("logit") or sum_a W∘dW ("mult") from a
  prototype-owned sweep over row tiles, split into row segments (`segment_length`) since few
  prototypes would make few programs; torch adds the segments' partial sums.
"""

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import (TunedKernel, acc_dtype, check_inputs, d_blocking, define_op, dot_nt,
                            dot_precision, load_tile, on_device_of, scalar, segment_length,
                            store_tile, uses_fma)


@triton.jit
def _attention_grads(e, log_prior, lse, dw, delta, valid, MULT: tl.constexpr):
    """(W, dE) of one tile from its scores E; the other operands are broadcast to the tile."""
    w = tl.where(valid, tl.exp(e + log_prior - lse), 0.0)
    if MULT:  # W = softmax(E)·pi: the normaliser does not involve pi
        de = w * dw - tl.where(valid, tl.exp(e - lse), 0.0) * delta
    else:
        de = w * (dw - delta)
    return w, de


@triton.jit
def _attention_fwd_kernel(
    x_ptr, p_ptr, lp_ptr, c_ptr, lse_ptr, inv_tau_ptr,
    B, K, D,
    MULT: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    d0 = tl.program_id(1) * BLOCK_D
    acc_ty = tl.float64 if FP64 else tl.float32
    x = load_tile(x_ptr, rows, row_mask, d0, D, BLOCK_D)
    inv_tau = tl.load(inv_tau_ptr)  # in the accumulation dtype (a float argument is float32)

    m = tl.full((BLOCK_M,), float("-inf"), acc_ty)  # running max of the normaliser's logits
    l = tl.zeros((BLOCK_M,), acc_ty)  # running sum of their exponentials
    acc = tl.zeros((BLOCK_M, BLOCK_D), acc_ty)  # running unnormalised W P
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        p = load_tile(p_ptr, ks, k_mask, d0, D, BLOCK_D)
        log_prior = tl.load(lp_ptr + ks, mask=k_mask, other=0.0).to(acc_ty)
        e = dot_nt(x, p, x_ptr, rows, row_mask, p_ptr, ks, k_mask, D,
                   BLOCK_M, BLOCK_K, BLOCK_D, ONE_D, FP64, PREC) * inv_tau
        z = e if MULT else e + log_prior[None, :]
        z = tl.where(k_mask[None, :], z, float("-inf"))
        # The first tile always holds prototype 0, so m is finite from then on.
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        w = tl.exp(z - m_new[:, None])
        l = l * alpha + tl.sum(w, 1)
        if MULT:
            w = w * tl.exp(log_prior)[None, :]
        acc = tl.dot(w.to(p.dtype), p, acc * alpha[:, None], input_precision=PREC,
                     out_dtype=acc.dtype)
        m = m_new
    store_tile(c_ptr, rows, row_mask, d0, D, acc / l[:, None], BLOCK_D)
    if tl.program_id(1) == 0:
        tl.store(lse_ptr + rows, m + tl.log(l), mask=row_mask)


@triton.jit
def _attention_bwd_rows_kernel(
    x_ptr, p_ptr, lp_ptr, dc_ptr, lse_ptr, delta_ptr, dx_ptr, inv_tau_ptr,
    B, K, D,
    MULT: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx = dE P / tau_a: each program owns a block of rows (and a D chunk of dx)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    d0 = tl.program_id(1) * BLOCK_D
    acc_ty = tl.float64 if FP64 else tl.float32
    x = load_tile(x_ptr, rows, row_mask, d0, D, BLOCK_D)
    dc = load_tile(dc_ptr, rows, row_mask, d0, D, BLOCK_D)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=row_mask, other=0.0)
    inv_tau = tl.load(inv_tau_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_D), acc_ty)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        p = load_tile(p_ptr, ks, k_mask, d0, D, BLOCK_D)
        log_prior = tl.load(lp_ptr + ks, mask=k_mask, other=0.0).to(acc_ty)
        e = dot_nt(x, p, x_ptr, rows, row_mask, p_ptr, ks, k_mask, D,
                   BLOCK_M, BLOCK_K, BLOCK_D, ONE_D, FP64, PREC) * inv_tau
        dw = dot_nt(dc, p, dc_ptr, rows, row_mask, p_ptr, ks, k_mask, D,
                    BLOCK_M, BLOCK_K, BLOCK_D, ONE_D, FP64, PREC)
        valid = row_mask[:, None] & k_mask[None, :]
        w, de = _attention_grads(e, log_prior[None, :], lse[:, None], dw, delta[:, None],
                                 valid, MULT)
        acc = tl.dot(de.to(p.dtype), p, acc, input_precision=PREC, out_dtype=acc.dtype)
    store_tile(dx_ptr, rows, row_mask, d0, D, acc * inv_tau, BLOCK_D)


@triton.jit
def _attention_bwd_protos_kernel(
    x_ptr, p_ptr, lp_ptr, dc_ptr, lse_ptr, delta_ptr, dp_ptr, dlp_ptr, inv_tau_ptr,
    B, K, D, segment_rows,
    MULT: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_D: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Partial dP and d log pi of one segment of rows: each program owns a block of prototypes
    (and a D chunk) and writes its own slice of the (segments, K, D) and (segments, K) outputs."""
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    d0 = tl.program_id(1) * BLOCK_D
    segment = tl.program_id(2)
    acc_ty = tl.float64 if FP64 else tl.float32
    p = load_tile(p_ptr, ks, k_mask, d0, D, BLOCK_D)
    log_prior = tl.load(lp_ptr + ks, mask=k_mask, other=0.0).to(acc_ty)
    inv_tau = tl.load(inv_tau_ptr)

    acc = tl.zeros((BLOCK_K, BLOCK_D), acc_ty)
    dlp = tl.zeros((BLOCK_K,), acc_ty)
    row_start = segment * segment_rows  # a multiple of BLOCK_M: no tile crosses segments
    for r0 in range(row_start, tl.minimum(row_start + segment_rows, B), BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < B
        x = load_tile(x_ptr, rows, row_mask, d0, D, BLOCK_D)
        dc = load_tile(dc_ptr, rows, row_mask, d0, D, BLOCK_D)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=row_mask, other=0.0)
        # Transposed tiles (prototypes x rows) so the products below need no tl.trans.
        e = dot_nt(p, x, p_ptr, ks, k_mask, x_ptr, rows, row_mask, D,
                   BLOCK_K, BLOCK_M, BLOCK_D, ONE_D, FP64, PREC) * inv_tau
        dw = dot_nt(p, dc, p_ptr, ks, k_mask, dc_ptr, rows, row_mask, D,
                    BLOCK_K, BLOCK_M, BLOCK_D, ONE_D, FP64, PREC)
        valid = k_mask[:, None] & row_mask[None, :]
        w, de = _attention_grads(e, log_prior[:, None], lse[None, :], dw, delta[None, :],
                                 valid, MULT)
        acc = tl.dot((de * inv_tau).to(x.dtype), x, acc, input_precision=PREC,
                     out_dtype=acc.dtype)
        acc = tl.dot(w.to(dc.dtype), dc, acc, input_precision=PREC, out_dtype=acc.dtype)
        dlp += tl.sum(w * dw if MULT else de, 1)
    out_rows = segment * K + ks  # row of the (segments * K, D) partial-sum matrix
    store_tile(dp_ptr, out_rows, k_mask, d0, D, acc, BLOCK_D)
    if tl.program_id(1) == 0:
        tl.store(dlp_ptr + out_rows, dlp, mask=k_mask)


# Tile shapes (rows, prototypes, num_warps, num_stages) of the row-owned kernels and
# (prototypes, rows, ...) of the prototype-owned one; the first of each list is the default.
# K is usually small (tens to hundreds), so prototype tiles stay narrow. Every configuration
# here compiles for sm_90 without register spills at D = 128 (ptxas -v, checked by
# tests/test_triton.py::test_shipped_configs_do_not_spill); FMA dots (float32 "ieee", float64)
# need small tiles to keep their operands in registers.
_ROW_MMA = [(64, 32, 8, 3), (32, 32, 4, 2), (64, 16, 8, 3)]
_ROW_FMA = [(64, 32, 8, 2), (32, 32, 4, 3)]
_PROTO_MMA = [(32, 32, 4, 2), (64, 64, 8, 2), (16, 32, 4, 2)]
_PROTO_FMA = [(64, 32, 8, 2), (32, 32, 4, 3)]
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_K": 16}
# Everything that changes the compiled kernel, so that a timing is never reused across them.
_KEY = ["B", "K", "D", "MULT", "FP64", "PREC"]

_fwd = TunedKernel(_attention_fwd_kernel, ("BLOCK_M", "BLOCK_K"), _ROW_MMA, _ROW_FMA, _KEY,
                   _INTERPRET_META)
_bwd_rows = TunedKernel(_attention_bwd_rows_kernel, ("BLOCK_M", "BLOCK_K"), _ROW_MMA, _ROW_FMA,
                        _KEY, _INTERPRET_META)
_bwd_protos = TunedKernel(_attention_bwd_protos_kernel, ("BLOCK_K", "BLOCK_M"), _PROTO_MMA,
                          _PROTO_FMA, _KEY, _INTERPRET_META)


def _row_grid(n_chunks: int, rows: int):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), n_chunks)


@define_op("attention_forward")
def attention_forward(x: Tensor, prototypes: Tensor, log_prior: Tensor,
                      inv_attn_temperature: float, prior_mode: str) -> Tuple[Tensor, Tensor]:
    """(C, lse): C = W P (B, D) in x's dtype, lse (B,) the row log-normaliser of W."""
    check_inputs(x, prototypes, log_prior)
    precision = dot_precision(x.dtype)
    x, prototypes, log_prior = x.contiguous(), prototypes.contiguous(), log_prior.contiguous()
    (B, D), K = x.shape, prototypes.shape[0]
    block_d, n_chunks = d_blocking(D, False, x.dtype, precision)
    c = torch.empty_like(x)
    lse = x.new_empty(B, dtype=acc_dtype(x.dtype))
    with on_device_of(x):
        _fwd.launch(_row_grid(n_chunks, B), x, prototypes, log_prior, c, lse,
                    scalar(inv_attn_temperature, x), B, K, D,
                    fma=uses_fma(x.dtype, precision), MULT=prior_mode == "mult",
                    FP64=x.dtype == torch.float64, PREC=precision, BLOCK_D=block_d,
                    ONE_D=n_chunks == 1)
    return c, lse


@define_op("attention_backward")
def attention_backward(grad_c: Tensor, x: Tensor, prototypes: Tensor, log_prior: Tensor,
                       c: Tensor, row_lse: Tensor, inv_attn_temperature: float, prior_mode: str
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dP, d log_prior) of `attention_forward`, each in its input's dtype."""
    check_inputs(grad_c, x, prototypes, log_prior)
    precision = dot_precision(x.dtype)
    x, prototypes, log_prior = x.contiguous(), prototypes.contiguous(), log_prior.contiguous()
    (B, D), K = x.shape, prototypes.shape[0]
    acc = acc_dtype(x.dtype)
    # The kernels read dC in the features' dtype. A loss scaler's upstream gradient (2^16 and
    # more) would overflow float16 there, so dC is divided by its largest magnitude before the
    # cast and the gradients multiplied by it afterwards (kept on the device: no host sync).
    grad_scale = grad_c.detach().to(acc).abs().amax().clamp_min(torch.finfo(acc).tiny)
    grad_c = (grad_c.to(acc) / grad_scale).to(x.dtype).contiguous()
    delta = (grad_c.to(acc) * c.to(acc)).sum(dim=1)  # <dC_a, C_a>, the softmax-backward term
    block_d, n_chunks = d_blocking(D, True, x.dtype, precision)
    consts = dict(fma=uses_fma(x.dtype, precision), MULT=prior_mode == "mult",
                  FP64=x.dtype == torch.float64, PREC=precision, BLOCK_D=block_d,
                  ONE_D=n_chunks == 1)
    inv_tau = scalar(inv_attn_temperature, x)

    with on_device_of(x):
        dx = x.new_empty(B, D, dtype=acc)
        _bwd_rows.launch(_row_grid(n_chunks, B), x, prototypes, log_prior, grad_c, row_lse,
                         delta, dx, inv_tau, B, K, D, **consts)

        segment_rows = segment_length(K, n_chunks, B)
        segments = triton.cdiv(B, segment_rows)
        dp_parts = x.new_empty(segments, K, D, dtype=acc)
        dlp_parts = x.new_empty(segments, K, dtype=acc)
        _bwd_protos.launch(lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), n_chunks, segments),
                           x, prototypes, log_prior, grad_c, row_lse, delta, dp_parts, dlp_parts,
                           inv_tau, B, K, D, segment_rows, **consts)
    dx = (dx * grad_scale).to(x.dtype)
    dp = (dp_parts.sum(dim=0) * grad_scale).to(prototypes.dtype)
    dlp = (dlp_parts.sum(dim=0) * grad_scale).to(log_prior.dtype)
    return dx, dp, dlp
