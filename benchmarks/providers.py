"""What gets benchmarked: the eager reference, its torch.compile, and every fused backend.

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
from icl_msr_kernels import icl_msr_loss
from icl_msr_kernels.backends import BackendUnavailable, resolve_backend

from .problem import Inputs

EAGER = "reference"
COMPILED = "reference-compiled"

Step = Callable[[Inputs], Tensor]


@dataclass(frozen=True)
class Provider:
    """One line in the plots: a backend, possibly under torch.compile."""

    name: str
    backend: str
    compiled: bool = False
    world_size: int = 1

    @property
    def fused(self) -> bool:
        """Fused backends never materialise (2N)^2 logits; the floor fraction and the ratios
        against the reference are reported for them."""
        return self.backend != EAGER

    @property
    def dense(self) -> bool:
        """Whether peak memory grows as (2N)^2, so large N may not fit (see problem.py)."""
        return not self.fused

    def make_step(self) -> Step:
        """A callable computing the loss (forward only, graph recorded) from the inputs.

        A compiled provider compiles on its first call; `measure` times that call separately.
        """
        backend = self.backend

        def loss(z1: Tensor, z2: Tensor, prototypes: Tensor, prior_logits: Tensor) -> Tensor:
            return icl_msr_loss(z1, z2, prototypes, prior_logits, backend=backend)

        if self.compiled:
            # Static shapes: one specialised graph per size is torch.compile's best case, which
            # is the fair baseline for a fused kernel. Fresh dynamo state so that a sweep within
            # one process never hits the recompile limit and silently falls back to eager.
            torch._dynamo.reset()
            loss = torch.compile(loss, dynamic=False)

        def step(inputs: Inputs) -> Tensor:
            return loss(inputs.z1, inputs.z2, inputs.prototypes, inputs.prior_logits)

        return step


def all_names() -> list[str]:
    """Every provider name this package knows, available or not."""
    return [EAGER, COMPILED] + [b for b in icl_msr_kernels.backend_status() if b != EAGER]


def by_name(name: str) -> Provider:
    if name == COMPILED:
        return Provider(COMPILED, EAGER, compiled=True)
    if name not in icl_msr_kernels.backend_status():
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(all_names())}")
    return Provider(name, name)


def unavailable_reason(provider: Provider, device: torch.device) -> str | None:
    """Why `provider` is not benchmarked on `device`, or None when it is."""
    if provider.backend == "triton" and device.type == "cpu":
        # Only the Triton interpreter runs on CPU tensors; its timings say nothing about the
        # kernels, so Triton is benchmarked on CUDA only.
        return "triton runs on the CPU only under TRITON_INTERPRET=1: timings meaningless"
    try:
        resolve_backend(provider.backend, device)
    except BackendUnavailable as err:
        return str(err)
    return None


def discover(device: torch.device, names: list[str] | None = None
             ) -> tuple[list[Provider], dict[str, str]]:
    """The providers to run on `device` (all available, or those named) and, for each other
    known or requested one, why it is left out."""
    providers: list[Provider] = []
    skipped: dict[str, str] = {}
    for name in names or all_names():
        provider = by_name(name)
        reason = unavailable_reason(provider, device)
        if reason is None:
            providers.append(provider)
        else:
            skipped[name] = reason
    return providers, skipped
