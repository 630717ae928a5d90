"""nn.Module wrappers over the functional API, and the memory bank they may own."""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from . import _validation as check
from .distributed import gather_rows
from .loss import icl_msr_loss, icl_msr_regularizer, ntxent_loss
from .reference import rownorm

BankSize = Union[int, Sequence[int]]


class MemoryBank(nn.Module):
    """A MoCo queue of negatives with the contract of lightly's ``MemoryBankModule``
    (feature-last; docs/math.md §7).

    ``size``: 0 (no bank), a ``(Q, D)`` pair, or an int Q (D taken from the first batch; lightly
    rejects this form). ``bank`` (Q, D) float32 holds unit rows, initialised to row-normalised
    Gaussian rows; ``bank_ptr`` (1,) int64 is where the next rows go. Both are buffers that
    follow ``.to()`` but are not saved in ``state_dict`` (as lightly's), and may be read, copied
    or reset (``bank_ptr.zero_()``) by the user.
    """

    def __init__(self, size: BankSize = 0, gather_distributed: bool = False) -> None:
        super().__init__()
        self.size = self._parse_size(size)
        self.gather_distributed = check.check_flag("gather_distributed", gather_distributed)
        shape = self.size if len(self.size) == 2 else (self.size[0], 0)
        self.register_buffer("bank", torch.empty(shape, dtype=torch.float32), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if len(self.size) == 2 and self.size[0] > 0:
            self._initialise(self.size[1], self.bank.device)

    @staticmethod
    def _parse_size(size: BankSize) -> tuple[int, ...]:
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if is_int(size):
            parsed = (size,)
        elif isinstance(size, Sequence) and all(is_int(v) for v in size):
            parsed = tuple(size)
        else:
            raise TypeError(f"memory_bank_size must be 0, an int Q or a (Q, D) pair of ints, got "
                            f"{size!r}")
        if len(parsed) not in (1, 2) or any(v < 0 for v in parsed) or \
                (len(parsed) == 2 and parsed[0] > 0 and parsed[1] < 1):
            raise ValueError(f"memory_bank_size must be 0, an int Q >= 0 or a (Q, D) pair with "
                             f"Q >= 0 and D >= 1, got {size!r}")
        return (0,) if parsed[0] == 0 else parsed

    @property
    def enabled(self) -> bool:
        return self.size[0] > 0

    @torch.no_grad()
    def _initialise(self, dim: int, device: torch.device) -> None:
        rows = torch.randn(self.size[0], dim, device=device)
        self.bank = rownorm(rows)
        self.bank_ptr = torch.zeros(1, dtype=torch.long, device=device)

    def negatives(self, like: Tensor) -> Tensor:
        """The bank as it is now, on `like`'s device (created there on first use when only Q
        was given). The loss must read it before `enqueue` changes it."""
        dim = like.shape[1]
        if self.bank.shape[1] == 0:
            self._initialise(dim, like.device)
        if self.bank.shape[1] != dim:
            raise ValueError(f"memory_bank_size {tuple(self.bank.shape)} does not fit the "
                             f"embeddings: they have D={dim}, the bank rows {self.bank.shape[1]}")
        return self.bank.to(like.device)

    @torch.no_grad()
    def enqueue(self, rows: Tensor) -> None:
        """Write rows (n, D), detached, at the pointer (all ranks' rows in rank order first when
        gather_distributed). A batch that reaches the end fills the bank up to it, the rest is
        dropped and the pointer goes back to 0 (lightly's rule)."""
        if self.gather_distributed:
            rows = gather_rows(rows)
        rows = rows.detach()
        capacity = self.bank.shape[0]
        ptr = int(self.bank_ptr)
        n = rows.shape[0]
        if ptr + n >= capacity:
            self.bank[ptr:] = rows[:capacity - ptr]
            self.bank_ptr.zero_()
        else:
            self.bank[ptr:ptr + n] = rows
            self.bank_ptr[0] = ptr + n

    def extra_repr(self) -> str:
        return f"size={self.size}, gather_distributed={self.gather_distributed}"


class NTXentLoss(nn.Module):
    """Fused drop-in for ``lightly.loss.NTXentLoss``: ``forward(out0, out1)`` on (N, D) views.

    Same semantics as lightly's: without a memory bank, cosine similarities with each sample's
    other view as positive and the other 2N - 2 samples (of every rank, with
    ``gather_distributed`` under several ranks) as negatives, mean over the 2N rows. With
    ``memory_bank_size`` (0, a ``(Q, D)`` pair, or an int Q), MoCo's loss: anchors ``out0``,
    positives ``out1``, negatives the bank as it was before this batch; afterwards, when ``out0``
    requires grad, the normalised ``out1`` is enqueued (``self.memory_bank``, see `MemoryBank`).
    Differences from lightly are listed in the README.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: BankSize = 0,
        gather_distributed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.temperature = check.check_real("temperature", temperature, positive=True)
        self.gather_distributed = check.check_flag("gather_distributed", gather_distributed)
        check.check_distributed_available(gather_distributed)
        self.backend = check.check_choice("backend", backend, check.BACKENDS)
        self.memory_bank = MemoryBank(memory_bank_size, gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        check.check_embeddings(out0, out1, names=("out0", "out1"))
        if not self.memory_bank.enabled:
            return ntxent_loss(out0, out1, temperature=self.temperature, backend=self.backend,
                               gather_distributed=self.gather_distributed)
        loss = ntxent_loss(out0, out1, temperature=self.temperature, backend=self.backend,
                           bank=self.memory_bank.negatives(out0))
        if out0.requires_grad:
            self.memory_bank.enqueue(rownorm(out1))
        return loss


class _MetaSemantics(nn.Module):
    """What ICLMSRLoss and ICLMSRRegularizer share: the learnable meta semantics, the prior, the
    temperature, the attention settings and an optional memory bank."""

    def __init__(self, dim: int, num_prototypes: int, *, temperature: float,
                 learnable_temperature: bool, attn_temperature: float, gamma: float,
                 learnable_prior: bool, prior_mode: str, combine: str, backend: str,
                 gather_distributed: bool, memory_bank_size: BankSize) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_prototypes", num_prototypes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        temperature = check.check_real("temperature", temperature, positive=True)
        self.attn_temperature = check.check_real("attn_temperature", attn_temperature,
                                                 positive=True)
        self.gamma = check.check_real("gamma", gamma, positive=False)
        self.prior_mode = check.check_choice("prior_mode", prior_mode, check.PRIOR_MODES)
        self.combine = check.check_choice("combine", combine, check.COMBINES)
        self.backend = check.check_choice("backend", backend, check.BACKENDS)
        self.gather_distributed = check.check_flag("gather_distributed", gather_distributed)
        check.check_flag("learnable_temperature", learnable_temperature)
        check.check_flag("learnable_prior", learnable_prior)
        check.check_distributed_available(gather_distributed)

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
        self.memory_bank = MemoryBank(memory_bank_size, gather_distributed)

    def _call(self, fn, z1: Tensor, z2: Tensor, **extra):
        """fn (icl_msr_loss or icl_msr_regularizer) on z1, z2 with this module's settings; with
        a memory bank, the bank as negatives and z2's unit rows enqueued afterwards."""
        check.check_embeddings(z1, z2)
        temperature = self.temperature if self.log_temperature is None else self.log_temperature.exp()
        bank = self.memory_bank.negatives(z1) if self.memory_bank.enabled else None
        out = fn(z1, z2, self.prototypes, self.prior_logits, temperature=temperature,
                 attn_temperature=self.attn_temperature, gamma=self.gamma,
                 prior_mode=self.prior_mode, combine=self.combine, backend=self.backend,
                 gather_distributed=self.gather_distributed and bank is None, bank=bank, **extra)
        if bank is not None and z1.requires_grad:
            self.memory_bank.enqueue(rownorm(z2))
        return out

    def extra_repr(self) -> str:
        k, d = self.prototypes.shape
        bank = f", memory_bank_size={self.memory_bank.size}" if self.memory_bank.enabled else ""
        return (f"dim={d}, num_prototypes={k}, prior_mode={self.prior_mode!r}, "
                f"combine={self.combine!r}, backend={self.backend!r}{bank}")


class ICLMSRLoss(_MetaSemantics):
    """ICL-MSR loss L_base + lam L_int with its own learnable meta semantics (docs/math.md).

    Owns ``prototypes`` (K, D), a parameter initialised with unit-norm random rows;
    ``prior_logits`` (K,), a parameter when ``learnable_prior`` else a zero buffer (uniform
    prior); ``log_temperature``, a parameter when ``learnable_temperature``; and, with
    ``memory_bank_size`` (0, (Q, D) or Q), a MoCo memory bank (``memory_bank``, the same
    semantics and update rule as `NTXentLoss`'s): MoCo + ICL-MSR. ``forward(z1, z2)`` takes two
    (N, D) views (with a bank: queries and keys) and returns the 0-d loss, or
    (loss, L_base, L_int) with ``return_parts=True``.
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
        memory_bank_size: BankSize = 0,
    ) -> None:
        super().__init__(dim, num_prototypes, temperature=temperature,
                         learnable_temperature=learnable_temperature,
                         attn_temperature=attn_temperature, gamma=gamma,
                         learnable_prior=learnable_prior, prior_mode=prior_mode, combine=combine,
                         backend=backend, gather_distributed=gather_distributed,
                         memory_bank_size=memory_bank_size)
        self.lam = check.check_real("lam", lam, positive=False)

    def forward(self, z1: Tensor, z2: Tensor, return_parts: bool = False):
        return self._call(icl_msr_loss, z1, z2, lam=self.lam, return_parts=return_parts)


class ICLMSRRegularizer(_MetaSemantics):
    """The ICL-MSR regulariser L_int alone, to add to any self-supervised loss
    (docs/math.md §8). Owns its meta semantics, prior, temperature and optional memory bank
    exactly as `ICLMSRLoss`; ``forward(z1, z2)`` on two (N, D) views returns the 0-d L_int.

    Example, added to a BYOL-style loss::

        regularizer = ICLMSRRegularizer(dim=256, num_prototypes=64)
        loss = byol_loss(p1, z2.detach()) + byol_loss(p2, z1.detach())
        loss = loss + 0.5 * regularizer(z1, z2)   # its prototypes go to the optimizer too
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
        learnable_prior: bool = False,
        prior_mode: str = "logit",
        combine: str = "concat",
        backend: str = "auto",
        gather_distributed: bool = False,
        memory_bank_size: BankSize = 0,
    ) -> None:
        super().__init__(dim, num_prototypes, temperature=temperature,
                         learnable_temperature=learnable_temperature,
                         attn_temperature=attn_temperature, gamma=gamma,
                         learnable_prior=learnable_prior, prior_mode=prior_mode, combine=combine,
                         backend=backend, gather_distributed=gather_distributed,
                         memory_bank_size=memory_bank_size)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return self._call(icl_msr_regularizer, z1, z2)
