"""Public functional API: validation, backend dispatch and the cheap glue of SPEC.

The glue (row normalisation, prior, feature scaling, the "concat"/"add" combination, the
final weighted sum) is written once here and shared by every backend; the backends only
supply the two heavy pieces (see `backends`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validation as check
from .backends import resolve_backend
from .reference import log_prior_from_logits, rownorm

_HALF = (torch.float16, torch.bfloat16)


def _columns(a: Tensor, b: Tensor | None, gather_distributed: bool):
    """Column features and this rank's row offset: the rows themselves, or all ranks' rows."""
    if not gather_distributed:
        return None, None, 0
    from .distributed import gather_columns

    return gather_columns(a, b)


def _temperature_scale(temperature: float | Tensor, like: Tensor) -> float | Tensor:
    # Features scaled by 1/sqrt(tau) make every logit R/tau; a temperature tensor's gradient
    # then flows through this scale by plain autograd.
    if isinstance(temperature, Tensor):
        return temperature.to(device=like.device, dtype=like.dtype).rsqrt()
    return temperature ** -0.5


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
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """ICL-MSR loss L = L_base + lam * L_int (SPEC.md).

    Args:
        z1, z2: (N, D) embeddings of two views of the same N samples.
        prototypes: (K, D) meta semantics M (any floating dtype; cast to the embeddings').
        prior_logits: (K,) prior logits rho, pi = softmax(rho); None for a uniform prior.
        temperature: contrastive temperature tau > 0, a float or a 0-d tensor (may require grad).
        attn_temperature: prototype-attention temperature > 0.
        gamma: weight >= 0 of the adjusted term inside the interventional logits.
        lam: regulariser weight >= 0.
        prior_mode: "logit" (prior added to the attention logits) or "mult" (multiplied in).
        combine: "concat" (R = X Xᵀ + gamma C Cᵀ) or "add" (H = rownorm(X + gamma C), R = H Hᵀ).
        backend: "auto", "reference", "cpp", "triton" or "cuda".
        gather_distributed: use the rows of every rank of the default process group as
            negatives (SPEC §6); this rank's loss is the mean over its own 2N anchors.
        return_parts: also return L_base and L_int.

    Returns:
        The 0-d loss, or (loss, L_base, L_int) with return_parts=True. float16/bfloat16 inputs
        give float32 losses on the fused backends and losses in their own dtype on the reference.
    """
    check.check_embeddings(z1, z2)
    check.check_prototypes(prototypes, prior_logits, z1)
    temperature = check.check_temperature(temperature)
    attn_temperature = check.check_real("attn_temperature", attn_temperature, positive=True)
    gamma = check.check_real("gamma", gamma, positive=False)
    lam = check.check_real("lam", lam, positive=False)
    check.check_choice("prior_mode", prior_mode, check.PRIOR_MODES)
    check.check_choice("combine", combine, check.COMBINES)
    check.check_choice("backend", backend, check.BACKENDS)
    check.check_flag("gather_distributed", gather_distributed)
    check.check_flag("return_parts", return_parts)
    kernels = resolve_backend(backend, z1.device)

    in_dtype = z1.dtype
    work_dtype = torch.float32 if (kernels.upcast_half and in_dtype in _HALF) else in_dtype
    x = rownorm(torch.cat([z1, z2]).to(work_dtype))  # step 1: (2N, D), the two views stacked
    p = rownorm(prototypes.to(work_dtype))  # step 2
    log_prior = log_prior_from_logits(prior_logits, prototypes.shape[0], like=p)  # step 3
    c = kernels.attention(x.to(in_dtype), p.to(in_dtype), log_prior, attn_temperature,
                          prior_mode).to(work_dtype)  # steps 4-6

    scale = _temperature_scale(temperature, x)
    a = x * scale
    if combine == "concat":  # step 7: R = [x, sqrt(gamma) c] [x, sqrt(gamma) c]ᵀ
        b = c * (gamma ** 0.5 * scale)
    else:
        b = rownorm(x + gamma * c) * scale
    a, b = a.to(in_dtype), b.to(in_dtype)  # kernels read features as stored
    a_cols, b_cols, row_offset = _columns(a, b, gather_distributed)
    base, inter = kernels.contrastive(a, b, a_cols, b_cols, row_offset, combine)  # step 8
    loss = base + lam * inter  # step 9
    return (loss, base, inter) if return_parts else loss


def ntxent_loss(
    z1: Tensor,
    z2: Tensor,
    *,
    temperature: float | Tensor = 0.5,
    backend: str = "auto",
    gather_distributed: bool = False,
) -> Tensor:
    """Plain SimCLR NT-Xent (SPEC's L_base alone) of two (N, D) views; returns a 0-d loss.

    Each of the 2N rows has its other view as positive and the other 2N - 2 rows (2NW - 2 with
    gather_distributed over W ranks) as negatives; the loss is the mean over the rows.
    """
    check.check_embeddings(z1, z2)
    temperature = check.check_temperature(temperature)
    check.check_choice("backend", backend, check.BACKENDS)
    check.check_flag("gather_distributed", gather_distributed)
    kernels = resolve_backend(backend, z1.device)

    in_dtype = z1.dtype
    work_dtype = torch.float32 if (kernels.upcast_half and in_dtype in _HALF) else in_dtype
    x = rownorm(torch.cat([z1, z2]).to(work_dtype))
    a = (x * _temperature_scale(temperature, x)).to(in_dtype)
    a_cols, _, row_offset = _columns(a, None, gather_distributed)
    base, _ = kernels.contrastive(a, None, a_cols, None, row_offset, "none")
    return base
