"""Argument checks shared by every public entry point.

Each failure names the argument, what was expected and what came: a `TypeError` for a wrong
kind of value, a `ValueError` for a wrong shape, range or choice.
"""

from __future__ import annotations

import math
from numbers import Real

from torch import Tensor

PRIOR_MODES = ("logit", "mult")
COMBINES = ("concat", "add")
BACKENDS = ("auto", "reference", "cpp", "triton", "cuda")


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r}"


def check_embeddings(z1: object, z2: object, names: tuple[str, str] = ("z1", "z2")) -> None:
    """z1, z2: floating (N, D) tensors of one shape, dtype and device, N >= 1, D >= 1."""
    for name, z in zip(names, (z1, z2)):
        if not isinstance(z, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {_describe(z)}")
        if z.dim() != 2:
            raise ValueError(f"{name} must be 2-D of shape (N, D), got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype (float64, float32, float16 or "
                            f"bfloat16), got {z.dtype}")
        if z.shape[0] < 1 or z.shape[1] < 1:
            raise ValueError(f"{name} must have N >= 1 rows and D >= 1 columns, got shape "
                             f"{tuple(z.shape)}")
    a, b = names
    if z1.shape != z2.shape:
        raise ValueError(f"{a} and {b} must have the same shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    if z1.dtype != z2.dtype:
        raise TypeError(f"{a} and {b} must have the same dtype, got {z1.dtype} and {z2.dtype}")
    if z1.device != z2.device:
        raise ValueError(f"{a} and {b} must be on the same device, got {z1.device} and {z2.device}")


def check_prototypes(prototypes: object, prior_logits: object, z1: Tensor) -> None:
    """prototypes: floating (K, D) with the embeddings' D; prior_logits: None or (K,)."""
    dim = z1.shape[1]
    if not isinstance(prototypes, Tensor):
        raise TypeError(f"prototypes must be a torch.Tensor of shape (K, {dim}), got "
                        f"{_describe(prototypes)}")
    if prototypes.dim() != 2 or prototypes.shape[1] != dim or prototypes.shape[0] < 1:
        raise ValueError(f"prototypes must have shape (K, {dim}) with K >= 1 (D of the "
                         f"embeddings), got shape {tuple(prototypes.shape)}")
    if not prototypes.is_floating_point():
        raise TypeError(f"prototypes must have a floating dtype, got {prototypes.dtype}")
    if prototypes.device != z1.device:
        raise ValueError(f"prototypes must be on the embeddings' device {z1.device}, got "
                         f"{prototypes.device}")
    if prior_logits is None:
        return
    k = prototypes.shape[0]
    if not isinstance(prior_logits, Tensor):
        raise TypeError(f"prior_logits must be None or a torch.Tensor of shape ({k},), got "
                        f"{_describe(prior_logits)}")
    if tuple(prior_logits.shape) != (k,):
        raise ValueError(f"prior_logits must have shape ({k},) (one logit per prototype), got "
                         f"shape {tuple(prior_logits.shape)}")
    if not prior_logits.is_floating_point():
        raise TypeError(f"prior_logits must have a floating dtype, got {prior_logits.dtype}")
    if prior_logits.device != prototypes.device:
        raise ValueError(f"prior_logits must be on the prototypes' device {prototypes.device}, "
                         f"got {prior_logits.device}")


def check_real(name: str, value: object, *, positive: bool) -> float:
    """A finite real number, > 0 when positive else >= 0; returns it as a float."""
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float {bound}, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite float {bound}, got {value!r}")
    return value


def check_temperature(temperature: object) -> float | Tensor:
    """A float > 0, or a 0-d floating tensor (which may require grad).

    A tensor's value is not read: that would synchronise with its device in every training
    step. A tensor temperature <= 0 gives a NaN loss (its 1/sqrt is NaN), never a silent value.
    """
    if not isinstance(temperature, Tensor):
        return check_real("temperature", temperature, positive=True)
    if temperature.dim() != 0:
        raise ValueError(f"temperature must be a float or a 0-d tensor, got a tensor of shape "
                         f"{tuple(temperature.shape)}")
    if not temperature.is_floating_point():
        raise TypeError(f"temperature must have a floating dtype, got {temperature.dtype}")
    return temperature


def check_bank(bank: object, z1: Tensor, gather_distributed: bool) -> None:
    """bank: None or a floating (Q >= 1, D) tensor of negatives on the embeddings' device."""
    if bank is None:
        return
    dim = z1.shape[1]
    if not isinstance(bank, Tensor):
        raise TypeError(f"bank must be None or a torch.Tensor of shape (Q, {dim}), got "
                        f"{_describe(bank)}")
    if bank.dim() != 2 or bank.shape[1] != dim:
        raise ValueError(f"bank must have shape (Q, {dim}) (one negative per row, D of the "
                         f"embeddings), got shape {tuple(bank.shape)}")
    if bank.shape[0] < 1:
        raise ValueError("bank must hold at least one row (Q >= 1), got an empty bank; pass "
                         "bank=None for in-batch negatives")
    if not bank.is_floating_point():
        raise TypeError(f"bank must have a floating dtype, got {bank.dtype}")
    if bank.device != z1.device:
        raise ValueError(f"bank must be on the embeddings' device {z1.device}, got {bank.device}")
    if gather_distributed:
        raise ValueError(
            "bank= cannot be combined with gather_distributed=True: with a memory bank the "
            "negatives are the bank, and lightly's convention gathers only the rows that are "
            "enqueued, never the negatives; NTXentLoss / ICLMSRLoss(memory_bank_size=..., "
            "gather_distributed=True) do exactly that")


def check_distributed_available(gather_distributed: bool) -> None:
    """As lightly: asking for gathered negatives where torch.distributed is missing is an error."""
    import torch.distributed as dist

    if gather_distributed and not dist.is_available():
        raise ValueError("gather_distributed=True but torch.distributed is not available in "
                         "this torch build; set gather_distributed=False")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")
    return value
