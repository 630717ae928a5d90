"""What gets benchmarked: the eager reference, its torch.compile, every fused backend, and
lightly's NTXentLoss (the library our NTXentLoss replaces) where lightly is installed.

Fused backends are discovered from `icl_msr_kernels.backend_status()`, so a backend that starts
importing (cpp, triton, cuda, or a later one) is benchmarked with no change here.

Hook for distributed negatives: a `Provider` carries `world_size`; a provider with
world_size > 1 would run its loss with gather_distributed=True under that many gloo/NCCL ranks,
each holding N rows per view. `measure.measure_point` is where the ranks would be spawned (one
worker process per rank, rank 0 reporting); until then the sweep rejects such providers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import icl_msr_kernels
from icl_msr_kernels import icl_msr_loss, ntxent_loss
from icl_msr_kernels.backends import BackendUnavailable, resolve_backend

from .problem import SYMMETRIC_PROVIDERS, Inputs

EAGER = "reference"
COMPILED = "reference-compiled"
LIGHTLY = "lightly"  # lightly.loss.NTXentLoss, eager: NT-Xent only, with or without a bank

Step = Callable[[Inputs], Tensor]


@dataclass(frozen=True)
class Provider:
    """One line in the plots: a backend, possibly under torch.compile."""

    name: str
    backend: str
    compiled: bool = False
    world_size: int = 1
    sweep: str | None = None  # `icl_msr_kernels.kernels.ops.set_sweep`, set in the point's process

    @property
    def fused(self) -> bool:
        """Fused backends never materialise (2N)^2 logits; the floor fraction and the ratios
        against the reference are reported for them."""
        return self.backend not in (EAGER, LIGHTLY)

    @property
    def dense(self) -> bool:
        """Whether peak memory grows as (2N)^2 (N × Q with a bank), so large N may not fit."""
        return not self.fused

    def make_step(self, loss_name: str = "icl-msr") -> Step:
        """A callable computing `loss_name` (forward only, graph recorded) from the inputs.

        A compiled provider compiles on its first call; `measure` times that call separately.
        """
        if self.backend == LIGHTLY:
            return _lightly_step()
        backend = self.backend
        if self.sweep:
            from icl_msr_kernels.kernels import ops as kernel_ops

            kernel_ops.set_sweep(self.sweep)

        def loss(z1: Tensor, z2: Tensor, prototypes: Tensor, prior_logits: Tensor,
                 bank: Tensor | None) -> Tensor:
            if loss_name == "ntxent":
                return ntxent_loss(z1, z2, temperature=0.07, backend=backend, bank=bank)
            return icl_msr_loss(z1, z2, prototypes, prior_logits, backend=backend, bank=bank)

        if self.compiled:
            # Static shapes: one specialised graph per size is torch.compile's best case, which
            # is the fair baseline for a fused kernel. Fresh dynamo state so that a sweep within
            # one process never hits the recompile limit and silently falls back to eager.
            torch._dynamo.reset()
            loss = torch.compile(loss, dynamic=False)

        def step(inputs: Inputs) -> Tensor:
            return loss(inputs.z1, inputs.z2, inputs.prototypes, inputs.prior_logits,
                        inputs.bank)

        return step


def _lightly_step() -> Step:
    """lightly's NTXentLoss on the same views, its bank set to the inputs' bank (never updated:
    every repeat then sees the same negatives, as ours does)."""
    from lightly.loss import NTXentLoss

    cache: dict[tuple, object] = {}

    def step(inputs: Inputs) -> Tensor:
        bank = inputs.bank
        key = () if bank is None else tuple(bank.shape)
        if key not in cache:
            cache[key] = NTXentLoss(temperature=0.07, memory_bank_size=key or 0).to(
                inputs.z1.device)
            if bank is not None:
                cache[key].memory_bank.bank.copy_(bank)
        # out0 without grad would skip the bank update, but the gradient must reach out0: the
        # bank update itself is a copy of N rows, negligible next to the loss.
        return cache[key](inputs.z1, inputs.z2)

    return step


def all_names() -> list[str]:
    """Every provider name this package knows, available or not."""
    return [EAGER, COMPILED, LIGHTLY] + [b for b in icl_msr_kernels.backend_status()
                                         if b != EAGER] + list(SYMMETRIC_PROVIDERS)


def by_name(name: str) -> Provider:
    if name == COMPILED:
        return Provider(COMPILED, EAGER, compiled=True)
    if name == LIGHTLY:
        return Provider(LIGHTLY, LIGHTLY)
    if name in SYMMETRIC_PROVIDERS:  # a GPU backend with its single-process symmetric sweep
        return Provider(name, SYMMETRIC_PROVIDERS[name], sweep="symmetric")
    if name not in icl_msr_kernels.backend_status():
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(all_names())}")
    return Provider(name, name)


def unavailable_reason(provider: Provider, device: torch.device, loss: str = "icl-msr"
                       ) -> str | None:
    """Why `provider` is not benchmarked on `device` for `loss`, or None when it is."""
    if provider.backend == LIGHTLY:
        if loss != "ntxent":
            return "lightly has no ICL-MSR loss (benchmark it with --loss ntxent)"
        try:
            import lightly.loss  # noqa: F401
        except Exception as err:  # noqa: BLE001 - any import failure means "not here"
            return f"lightly is not importable ({type(err).__name__}: {err})"
        return None
    if provider.backend == "triton" and device.type == "cpu":
        # Only the Triton interpreter runs on CPU tensors; its timings say nothing about the
        # kernels, so Triton is benchmarked on CUDA only.
        return "triton runs on the CPU only under TRITON_INTERPRET=1: timings meaningless"
    try:
        resolve_backend(provider.backend, device)
    except BackendUnavailable as err:
        return str(err)
    return None


def discover(device: torch.device, names: list[str] | None = None, loss: str = "icl-msr"
             ) -> tuple[list[Provider], dict[str, str]]:
    """The providers to run on `device` for `loss` (all available, or those named) and, for
    each other known or requested one, why it is left out."""
    providers: list[Provider] = []
    skipped: dict[str, str] = {}
    for name in names or all_names():
        provider = by_name(name)
        reason = unavailable_reason(provider, device, loss)
        if reason is None:
            providers.append(provider)
        else:
            skipped[name] = reason
    return providers, skipped
