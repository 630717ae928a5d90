"""Thin nn.Module wrappers over the functional API."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _validation as check
from .loss import icl_msr_loss, ntxent_loss


class ICLMSRLoss(nn.Module):
    """ICL-MSR loss with its own learnable meta semantics (SPEC.md).

    Owns ``prototypes`` (K, D), a parameter initialised with unit-norm random rows; ``prior_logits``
    (K,), a parameter when ``learnable_prior`` else a zero buffer (uniform prior); and
    ``log_temperature``, a parameter when ``learnable_temperature``. ``forward(z1, z2)`` takes two
    (N, D) views and returns the 0-d loss.
    """

    def __init__(
        self,
        dim: int,
        num_prototypes: int = 64,
        *,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        attn_temperature: float = 0.1,
        gamma: float = 1.0,
        lam: float = 1.0,
        learnable_prior: bool = False,
        prior_mode: str = "logit",
        combine: str = "concat",
        backend: str = "auto",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_prototypes", num_prototypes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        temperature = check.check_real("temperature", temperature, positive=True)
        self.attn_temperature = check.check_real("attn_temperature", attn_temperature, positive=True)
        self.gamma = check.check_real("gamma", gamma, positive=False)
        self.lam = check.check_real("lam", lam, positive=False)
        self.prior_mode = check.check_choice("prior_mode", prior_mode, check.PRIOR_MODES)
        self.combine = check.check_choice("combine", combine, check.COMBINES)
        self.backend = check.check_choice("backend", backend, check.BACKENDS)
        self.gather_distributed = check.check_flag("gather_distributed", gather_distributed)

        # Random unit rows spread the meta semantics over the sphere the embeddings live on.
        prototypes = torch.randn(num_prototypes, dim)
        self.prototypes = nn.Parameter(prototypes / prototypes.norm(dim=1, keepdim=True))
        if learnable_prior:
            self.prior_logits = nn.Parameter(torch.zeros(num_prototypes))
        else:
            self.register_buffer("prior_logits", torch.zeros(num_prototypes))
        if learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self.log_temperature = None
            self.temperature = temperature

    def forward(self, z1: Tensor, z2: Tensor, return_parts: bool = False):
        temperature = self.temperature if self.log_temperature is None else self.log_temperature.exp()
        return icl_msr_loss(
            z1, z2, self.prototypes, self.prior_logits,
            temperature=temperature, attn_temperature=self.attn_temperature, gamma=self.gamma,
            lam=self.lam, prior_mode=self.prior_mode, combine=self.combine, backend=self.backend,
            gather_distributed=self.gather_distributed, return_parts=return_parts,
        )

    def extra_repr(self) -> str:
        k, d = self.prototypes.shape
        return (f"dim={d}, num_prototypes={k}, prior_mode={self.prior_mode!r}, "
                f"combine={self.combine!r}, backend={self.backend!r}")


class NTXentLoss(nn.Module):
    """Fused drop-in for ``lightly.loss.NTXentLoss``: ``forward(out0, out1)`` on (N, D) views.

    Same semantics as lightly's (cosine similarities, each sample's other view as positive, all
    other 2N - 2 samples as negatives, mean over the 2N rows). Memory banks are not supported.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: int = 0,
        gather_distributed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.temperature = check.check_real("temperature", temperature, positive=True)
        if memory_bank_size not in (0, None):
            raise NotImplementedError(
                f"memory_bank_size={memory_bank_size!r}: icl_msr_kernels.NTXentLoss has no "
                "memory bank; use memory_bank_size=0 (gather_distributed=True adds negatives "
                "from other ranks instead)")
        self.gather_distributed = check.check_flag("gather_distributed", gather_distributed)
        self.backend = check.check_choice("backend", backend, check.BACKENDS)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        check.check_embeddings(out0, out1, names=("out0", "out1"))
        return ntxent_loss(out0, out1, temperature=self.temperature, backend=self.backend,
                           gather_distributed=self.gather_distributed)
