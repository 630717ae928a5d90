"""Public functional API: validation, backend dispatch and the cheap glue of the loss.

The glue (row normalisation, prior, temperature scaling, the "concat"/"add" features, the
positive logits of the memory-bank mode, the final weighted sum) is written once here and shared
by every backend; the backends only supply the two heavy pieces (`kernels.interface.Kernels`).
The math is docs/math.md; `reference` is its executable form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _validation as check
from .backends import resolve_backend
from .reference import log_prior_from_logits, rownorm

_HALF = (torch.float16, torch.bfloat16)


def _temperature_scale(temperature: float | Tensor, like: Tensor) -> float | Tensor:
    # Features scaled by 1/sqrt(tau) make every logit R/tau; a temperature tensor's gradient
    # then flows through this scale by plain autograd.
    if isinstance(temperature, Tensor):
        tau = temperature.to(device=like.device, dtype=like.dtype)
        # rsqrt(inf) = 0 would silently zero every logit: tau - tau + 1 is 1, or NaN for an
        # infinite tau, without reading the value on the host. (tau <= 0 already gives NaN.)
        return tau.rsqrt() * (tau - tau + 1)
    return temperature ** -0.5


class _ScaleRows(torch.autograd.Function):
    """rows (B, D) * scale (0-d tensor), with the scale's gradient summed in a fixed order.

    Autograd's own reduction of a broadcast product splits the sum by thread count, so a
    learnable temperature's gradient would change with torch.set_num_threads; here each row is
    summed on its own, then the row sums in order (cumsum is a sequential scan).
    """

    @staticmethod
    def forward(ctx, rows: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(rows, scale)
        return rows * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, scale = ctx.saved_tensors
        grad_rows = grad * scale if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * rows).sum(dim=1).cumsum(0)[-1].reshape(scale.shape)
        return grad_rows, grad_scale


def _scaled(rows: Tensor, scale: float | Tensor) -> Tensor:
    return _ScaleRows.apply(rows, scale) if isinstance(scale, Tensor) else rows * scale


@dataclass
class _Features:
    """Pre-scaled features of one loss call, in the working dtype.

    a, b: the anchor rows' base and interventional features (b None without a prototype term);
    a_cols, b_cols: the columns (None: the rows themselves, or all ranks' rows when gathered);
    positive_logits: (2, rows) in memory-bank mode, else None; split: distributed negatives with
    the job's tile pairs divided among the ranks (the columns are gathered inside).
    """

    a: Tensor
    b: Tensor | None
    a_cols: Tensor | None = None
    b_cols: Tensor | None = None
    positive_logits: Tensor | None = None
    row_offset: int = 0
    split: bool = False


class _Glue:
    """Steps 1-7 of docs/math.md §2 for one call, on the kernels of one backend."""

    def __init__(self, kernels, in_dtype: torch.dtype) -> None:
        self.kernels = kernels
        self.in_dtype = in_dtype
        # The fused backends run the glue in float32 around half-precision kernels.
        self.work_dtype = torch.float32 if (kernels.upcast_half and in_dtype in _HALF) else in_dtype

    def unit_rows(self, z: Tensor) -> Tensor:
        return rownorm(z.to(self.work_dtype))

    def interventional(self, x: Tensor, prototypes: Tensor, prior_logits: Tensor | None,
                       scale: float | Tensor, attn_temperature: float, gamma: float,
                       prior_mode: str, combine: str) -> Tensor:
        """The interventional features of unit rows x: sqrt(gamma) c(x) ("concat") or
        rownorm(x + gamma c(x)) ("add"), times scale (steps 2-7)."""
        p = rownorm(prototypes.to(self.work_dtype))  # step 2
        log_prior = log_prior_from_logits(prior_logits, prototypes.shape[0], like=p)  # step 3
        c = self.kernels.attention(x.to(self.in_dtype), p.to(self.in_dtype), log_prior,
                                   attn_temperature, prior_mode).to(self.work_dtype)  # 4-6
        if combine == "concat":  # R = [x, sqrt(gamma) c] [x, sqrt(gamma) c]ᵀ
            return _scaled(c, gamma ** 0.5 * scale)
        return _scaled(rownorm(x + gamma * c), scale)

    def stored(self, t: Tensor | None) -> Tensor | None:
        """Features in the inputs' dtype: the kernels read them as stored."""
        return None if t is None else t.to(self.in_dtype)


def _features(glue: _Glue, z1: Tensor, z2: Tensor, temperature: float | Tensor,
              interventional, combine: str, gather_distributed: bool, bank: Tensor | None,
              base_term: bool) -> _Features:
    """The kernels' operands. `interventional(x, scale)` maps unit rows to their interventional
    features (None: plain NT-Xent). Without base_term (the regulariser alone) the interventional
    logits become the only term: "add" features b, "concat" features [a, b] side by side."""

    def only_term(a, b):
        if base_term or b is None:
            return a, b
        return (b if combine == "add" else torch.cat([a, b], dim=1)), None

    if bank is None:
        x = glue.unit_rows(torch.cat([z1, z2]))  # step 1: (2N, D), the two views stacked
        scale = _temperature_scale(temperature, x)
        a = _scaled(x, scale)
        b = interventional(x, scale) if interventional is not None else None
        a, b = only_term(a, b)
        a, b = glue.stored(a), glue.stored(b)
        from .distributed import gather_columns, world_size

        if gather_distributed and world_size() > 1 and getattr(glue.kernels, "supports_pairs",
                                                               False):
            return _Features(a, b, split=True)
        a_cols, b_cols, row_offset = (gather_columns(a, b) if gather_distributed
                                      else (None, None, 0))
        return _Features(a, b, a_cols, b_cols, None, row_offset)

    # Anchors z1, positives z2, negatives the bank rows as given (§7). The bank's base features
    # are built apart from the rows': they need a gradient only through a learnable temperature,
    # and without one the kernels skip the columns' gradient sweep.
    n = z1.shape[0]
    xy = glue.unit_rows(torch.cat([z1, z2]))
    negatives = bank.to(glue.work_dtype)
    scale = _temperature_scale(temperature, xy)
    a, a_cols = _scaled(xy, scale), _scaled(negatives, scale)
    b = b_cols = None
    if interventional is not None:  # the prototype attention maps rows and bank alike
        b_all = interventional(torch.cat([xy, negatives]), scale)
        b, b_cols = b_all[:2 * n], b_all[2 * n:]
    a, b = only_term(a, b)
    a_cols, b_cols = only_term(a_cols, b_cols)
    mode = "none" if b is None else combine
    rows, positives = slice(0, n), slice(n, 2 * n)
    positive_base = (a[rows] * a[positives]).sum(1)
    if mode == "none":
        positive_int = torch.zeros_like(positive_base)
    else:
        positive_int = (b[rows] * b[positives]).sum(1)
        if mode == "concat":
            positive_int = positive_int + positive_base
    return _Features(glue.stored(a[rows]), glue.stored(None if b is None else b[rows]),
                     glue.stored(a_cols), glue.stored(b_cols),
                     torch.stack([positive_base, positive_int]), 0)


def _contrastive(glue: _Glue, f: _Features, combine: str) -> tuple[Tensor, Tensor]:
    mode = "none" if f.b is None else combine
    if f.split:
        from .distributed import split_contrastive

        return split_contrastive(glue.kernels, f.a, f.b, mode)
    return glue.kernels.contrastive(f.a, f.b, f.a_cols, f.b_cols, f.row_offset, mode,
                                    f.positive_logits)


def _check_common(z1, z2, temperature, backend, gather_distributed, bank, names=("z1", "z2")):
    check.check_embeddings(z1, z2, names=names)
    temperature = check.check_temperature(temperature)
    check.check_choice("backend", backend, check.BACKENDS)
    check.check_flag("gather_distributed", gather_distributed)
    check.check_bank(bank, z1, gather_distributed)
    return temperature


def _check_prototype_args(z1, prototypes, prior_logits, attn_temperature, gamma, prior_mode,
                          combine):
    check.check_prototypes(prototypes, prior_logits, z1)
    check.check_real("attn_temperature", attn_temperature, positive=True)
    check.check_real("gamma", gamma, positive=False)
    check.check_choice("prior_mode", prior_mode, check.PRIOR_MODES)
    check.check_choice("combine", combine, check.COMBINES)
    return float(attn_temperature), float(gamma)


def icl_msr_loss(
    z1: Tensor,
    z2: Tensor,
    prototypes: Tensor,
    prior_logits: Tensor | None = None,
    *,
    temperature: float | Tensor = 0.07,
    attn_temperature: float = 0.1,
    gamma: float = 1.0,
    lam: float = 1.0,
    prior_mode: str = "logit",
    combine: str = "concat",
    backend: str = "auto",
    gather_distributed: bool = False,
    bank: Tensor | None = None,
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """ICL-MSR loss L = L_base + lam * L_int (docs/math.md §2).

    Args:
        z1, z2: (N, D) embeddings of two views of the same N samples.
        prototypes: (K, D) meta semantics M (any floating dtype; cast to the embeddings').
        prior_logits: (K,) prior logits rho, pi = softmax(rho); None for a uniform prior.
        temperature: contrastive temperature tau > 0, a float or a 0-d tensor (may require grad;
            its value is not read on the host, and one <= 0 gives a NaN loss).
        attn_temperature: prototype-attention temperature > 0.
        gamma: weight >= 0 of the adjusted term inside the interventional logits.
        lam: regulariser weight >= 0.
        prior_mode: "logit" (prior added to the attention logits) or "mult" (multiplied in).
        combine: "concat" (R = X Xᵀ + gamma C Cᵀ) or "add" (H = rownorm(X + gamma C), R = H Hᵀ).
        backend: "auto", "reference", "cpp", "triton" or "cuda".
        gather_distributed: use the rows of every rank of the default process group as
            negatives (§6); this rank's loss is the mean over its own 2N anchors. Without a
            process group, or with one rank, the local loss.
        bank: None, or a (Q, D) tensor of negatives (a MoCo memory bank, §7): the anchors are
            z1's rows, each one's positive the same row of z2, the negatives the bank rows as
            given (lightly keeps unit rows), constant; both terms map the bank rows through the
            prototype attention too. Cannot be combined with gather_distributed.
        return_parts: also return L_base and L_int.

    Returns:
        The 0-d loss, or (loss, L_base, L_int) with return_parts=True. float16/bfloat16 inputs
        give float32 losses on the fused backends and losses in their own dtype on the reference.
    """
    temperature = _check_common(z1, z2, temperature, backend, gather_distributed, bank)
    attn_temperature, gamma = _check_prototype_args(z1, prototypes, prior_logits,
                                                    attn_temperature, gamma, prior_mode, combine)
    lam = check.check_real("lam", lam, positive=False)
    check.check_flag("return_parts", return_parts)
    glue = _Glue(resolve_backend(backend, z1.device), z1.dtype)

    def interventional(x, scale):
        return glue.interventional(x, prototypes, prior_logits, scale, attn_temperature, gamma,
                                   prior_mode, combine)

    f = _features(glue, z1, z2, temperature, interventional, combine, gather_distributed, bank,
                  base_term=True)
    base, inter = _contrastive(glue, f, combine)  # step 8
    loss = base + lam * inter  # step 9
    return (loss, base, inter) if return_parts else loss


def icl_msr_regularizer(
    z1: Tensor,
    z2: Tensor,
    prototypes: Tensor,
    prior_logits: Tensor | None = None,
    *,
    temperature: float | Tensor = 0.07,
    attn_temperature: float = 0.1,
    gamma: float = 1.0,
    prior_mode: str = "logit",
    combine: str = "concat",
    backend: str = "auto",
    gather_distributed: bool = False,
    bank: Tensor | None = None,
) -> Tensor:
    """The interventional term L_int of ICL-MSR alone (docs/math.md §8), to add to any method.

    Same arguments as `icl_msr_loss` (without lam and return_parts: weight it yourself). Only
    what L_int needs is computed: in "add" mode no base logits at all; in "concat" mode one
    product over [x, sqrt(gamma) c] features.

    Returns:
        The 0-d L_int (float32 for float16/bfloat16 inputs on the fused backends).
    """
    temperature = _check_common(z1, z2, temperature, backend, gather_distributed, bank)
    attn_temperature, gamma = _check_prototype_args(z1, prototypes, prior_logits,
                                                    attn_temperature, gamma, prior_mode, combine)
    glue = _Glue(resolve_backend(backend, z1.device), z1.dtype)

    def interventional(x, scale):
        return glue.interventional(x, prototypes, prior_logits, scale, attn_temperature, gamma,
                                   prior_mode, combine)

    f = _features(glue, z1, z2, temperature, interventional, combine, gather_distributed, bank,
                  base_term=False)
    inter, _ = _contrastive(glue, f, combine)
    return inter


def ntxent_loss(
    z1: Tensor,
    z2: Tensor,
    *,
    temperature: float | Tensor = 0.5,
    backend: str = "auto",
    gather_distributed: bool = False,
    bank: Tensor | None = None,
) -> Tensor:
    """Plain SimCLR NT-Xent (L_base alone) of two (N, D) views; returns a 0-d loss.

    Each of the 2N rows has its other view as positive and the other 2N - 2 rows (2NW - 2 with
    gather_distributed over W ranks) as negatives; the loss is the mean over the rows. With a
    (Q, D) bank, MoCo's loss instead: the N anchors z1 against their positives z2 and the Q bank
    rows as negatives (docs/math.md §7).
    """
    temperature = _check_common(z1, z2, temperature, backend, gather_distributed, bank)
    glue = _Glue(resolve_backend(backend, z1.device), z1.dtype)
    f = _features(glue, z1, z2, temperature, None, "none", gather_distributed, bank,
                  base_term=True)
    base, _ = _contrastive(glue, f, "none")
    return base
