"""The benchmarked problem: its inputs, the FLOP model of a fused backend, memory estimates.

Kept free of timing and process logic so that the sweep, the worker and the pytest-benchmark
cases all build exactly the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

# The GEMM floor: full (2N)^2 * D tile products a fused algorithm must do at the least. The
# logits are symmetric in single-process mode, so each tile pair {i, j} is computed once:
# forward a·aᵀ and b·bᵀ over half the tiles (1 product); backward recomputes them (1) and applies
# the coefficients of G and Gᵀ to the two feature sets (2). A backend that sweeps every tile
# (both triangles) does 6, so it can reach at most 4/6 of this floor (docs/math.md §3-4, PERF_NOTES).
PRODUCTS = {"fwd": 1, "bwd": 3, "fwdbwd": 4}

# Dense (2N)^2 buffers the eager reference holds at its peak in forward+backward: measured
# ~6.1 on the CPU in float32 (~5.1 under torch.compile). Rounded up so a skip errs on the side
# of not starting a point that would swap or be OOM-killed.
DENSE_BUFFERS = 7.0


@dataclass
class Inputs:
    """Leaf tensors of one loss call; every one of them gets a gradient."""

    z1: Tensor
    z2: Tensor
    prototypes: Tensor
    prior_logits: Tensor

    def leaves(self) -> tuple[Tensor, ...]:
        return (self.z1, self.z2, self.prototypes, self.prior_logits)

    def clear_grads(self) -> None:
        # set_to_none, as optimizer.zero_grad() does by default: backward then allocates the
        # gradients, which is what a training step pays for.
        for leaf in self.leaves():
            leaf.grad = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.leaves())


def make_inputs(n: int, d: int, k: int, dtype: torch.dtype, device: torch.device | str,
                seed: int = 0) -> Inputs:
    """Random (N, D) views, (K, D) prototypes and (K,) prior logits, all requiring grad.

    Generated on the CPU and copied, so every device and run sees the same numbers.
    """
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    return Inputs(leaf(n, d), leaf(n, d), leaf(k, d), leaf(k))


def fused_flops(n: int, d: int, phase: str) -> float:
    """FLOPs (2 per multiply-add) the fused algorithm must do at per-view N for `phase`."""
    rows = 2 * n
    return PRODUCTS[phase] * 2.0 * rows * rows * d


def dense_bytes_estimate(n: int, dtype: torch.dtype) -> float:
    """Rough peak above the inputs of a provider that materialises the (2N)^2 logits."""
    rows = 2 * n
    return DENSE_BUFFERS * rows * rows * torch.empty((), dtype=dtype).element_size()
