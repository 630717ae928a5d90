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

# The GEMM floor: full (2N)^2 * D tile products a fused algorithm must do at the least, which is
# what cpp does. The logits are symmetric in single-process mode, so each tile pair {i, j} is
# computed once: forward a·aᵀ and b·bᵀ over half the tiles (1 product); backward recomputes them
# (1) and applies the coefficients of G and Gᵀ to the two feature sets (2) (docs/math.md §3-4).
PRODUCTS = {"fwd": 1, "bwd": 3, "fwdbwd": 4}
# The GPU backends sweep every tile (both triangles): forward 2, backward 4 (recompute 2, apply
# 2). Their floor counts what they multiply, so that it reads as the fraction of the GEMM rate
# their own products reach.
FULL_SWEEP_PROVIDERS = ("triton", "cuda")
FULL_SWEEP_PRODUCTS = {"fwd": 2, "bwd": 4, "fwdbwd": 6}
# The GPU backends under their symmetric sweep (`ops.set_sweep`): provider -> backend. They
# multiply what cpp does (PRODUCTS) where the sweep applies, a single process and features their
# kernels fit (the widest D per dtype below, with both feature sets: `triton_symmetric.supports`
# and the CUDA op's `symmetric_fits`); elsewhere they take the full sweep.
SYMMETRIC_PROVIDERS = {"triton-symmetric": "triton", "cuda-symmetric": "cuda"}
_SYMMETRIC_MAX_D = {"triton-symmetric": {"float16": 128, "bfloat16": 128},
                    "cuda-symmetric": {"float16": 128, "bfloat16": 128, "float32": 128}}

# Dense (2N)^2 buffers the eager reference holds at its peak in forward+backward: measured
# ~6.1 on the CPU in float32 (~5.1 under torch.compile). Rounded up so a skip errs on the side
# of not starting a point that would swap or be OOM-killed.
DENSE_BUFFERS = 7.0


# The losses a point can time: the ICL-MSR loss, or plain NT-Xent (with a bank: MoCo's, the one
# lightly's NTXentLoss computes).
LOSSES = ("icl-msr", "ntxent")


@dataclass
class Inputs:
    """Leaf tensors of one loss call; every one of them gets a gradient. `bank` (Q, D) unit rows
    of negatives (a constant), or None for in-batch negatives."""

    z1: Tensor
    z2: Tensor
    prototypes: Tensor
    prior_logits: Tensor
    bank: Tensor | None = None

    def leaves(self) -> tuple[Tensor, ...]:
        return (self.z1, self.z2, self.prototypes, self.prior_logits)

    def clear_grads(self) -> None:
        # set_to_none, as optimizer.zero_grad() does by default: backward then allocates the
        # gradients, which is what a training step pays for.
        for leaf in self.leaves():
            leaf.grad = None

    def nbytes(self) -> int:
        tensors = self.leaves() + ((self.bank,) if self.bank is not None else ())
        return sum(t.numel() * t.element_size() for t in tensors)


def make_inputs(n: int, d: int, k: int, dtype: torch.dtype, device: torch.device | str,
                seed: int = 0, bank: int = 0) -> Inputs:
    """Random (N, D) views, (K, D) prototypes and (K,) prior logits, all requiring grad, and a
    (bank, D) memory bank of unit rows when bank > 0 (float32, as a MoCo bank is kept).

    Generated on the CPU and copied, so every device and run sees the same numbers.
    """
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    inputs = Inputs(leaf(n, d), leaf(n, d), leaf(k, d), leaf(k))
    if bank:
        rows = torch.randn(bank, d, generator=gen)
        inputs.bank = (rows / rows.norm(dim=1, keepdim=True)).to(device)
    return inputs


# Memory-bank mode, N anchors against Q columns: products of N × Q × D in all, for NT-Xent and
# for ICL-MSR in its default "concat" mode (logits a·a' and a·a' + b·b'). A forward that will be
# differentiated computes the logits (NT-Xent 1, ICL-MSR 2) and applies their softmax weights to
# the bank rows in the same sweep, the rows' gradients (1; ICL-MSR 3: both terms over a, the
# second over b). NT-Xent's bank is a constant, which leaves the backward a scaling; ICL-MSR's
# bank columns get gradients through the prototypes, and the backward recomputes the logits (2)
# and applies the coefficients to the a and b rows (2).
BANK_PRODUCTS = {"ntxent": {"fwd": 2, "bwd": 0, "fwdbwd": 2},
                 "icl-msr": {"fwd": 5, "bwd": 4, "fwdbwd": 9}}
# The GPU backends' forward computes the logits only; their backward recomputes and applies them
# for the rows and, for ICL-MSR, once more for the columns.
FULL_SWEEP_BANK_PRODUCTS = {"ntxent": {"fwd": 1, "bwd": 2, "fwdbwd": 3},
                            "icl-msr": {"fwd": 2, "bwd": 8, "fwdbwd": 10}}


def _full_sweep(provider: str, dtype: str | None, d: int, bank: int) -> bool:
    if provider in SYMMETRIC_PROVIDERS:
        return bool(bank) or d > _SYMMETRIC_MAX_D[provider].get(dtype, 0)
    return provider in FULL_SWEEP_PROVIDERS


def fused_flops(n: int, d: int, phase: str, loss: str = "icl-msr", bank: int = 0,
                provider: str = "cpp", dtype: str | None = None) -> float:
    """FLOPs (2 per multiply-add) of the fused algorithm at per-view N for `phase`: what
    `provider` multiplies for the GPU backends (FULL_SWEEP_*; their symmetric sweeps in
    `dtype` where they apply), else the least a fused kernel must do (cpp's; for the eager and
    compiled references, the yardstick of what fusing gains).

    In-batch: products over (2N)² logits (the ICL-MSR features are [x, √γ c], twice as wide, in
    one product; NT-Xent's are x). With a bank: products of N × Q × D.
    """
    full_sweep = _full_sweep(provider, dtype, d, bank)
    if bank:
        model = (FULL_SWEEP_BANK_PRODUCTS if full_sweep else BANK_PRODUCTS)[loss]
        return model[phase] * 2.0 * n * bank * d
    rows = 2 * n
    model = FULL_SWEEP_PRODUCTS if full_sweep else PRODUCTS
    return model[phase] * 2.0 * rows * rows * d


def dense_bytes_estimate(n: int, dtype: torch.dtype, bank: int = 0) -> float:
    """Rough peak above the inputs of a provider that materialises the (2N)² (or N × Q)
    logits."""
    size = torch.empty((), dtype=dtype).element_size()
    if bank:
        return DENSE_BUFFERS * n * (bank + 2 * n) * size
    rows = 2 * n
    return DENSE_BUFFERS * rows * rows * size
