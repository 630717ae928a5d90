"""The op surface shared by the fused backends: one schema, one autograd wiring, one backend class.

Every fused backend registers the same four torch ops, in its own namespace (``icl_msr`` for the
C++/CUDA extension, csrc/ops.cpp; ``icl_msr_triton`` for the Triton kernels):

- ``attention_forward(x, prototypes, log_prior, inv_attn_temperature: float, prior_mode: str)
  -> (c, row_lse)``: C = W P (docs/math.md §2 steps 4-6) for row-normalised x (B, D) and
  prototypes (K, D), log_prior (K,); c in x's dtype, row_lse (B,) in the accumulation dtype.
- ``attention_backward(grad_c, x, prototypes, log_prior, c, row_lse, inv_attn_temperature,
  prior_mode) -> (grad_x, grad_prototypes, grad_log_prior)``, each in its input's dtype.
- ``contrastive_forward(a, b?, a_cols?, b_cols?, positive_logits?, row_offset: int,
  combine: str, symmetric: bool = False) -> (losses (2,), row_lse (2, B))``: both NT-Xent
  terms (steps 7-8) over features pre-scaled by 1/sqrt(tau), as `interface.Kernels.contrastive`
  describes; combine is "none", "concat" or "add"; losses and row_lse in the accumulation dtype.
  symmetric asks for the sweep over unordered pairs of row blocks (`set_sweep`) where the
  backend has one for the problem; the others take the full sweep (the CPU kernels always pair
  the tiles).
- ``contrastive_backward(grad_losses, a, b?, a_cols?, b_cols?, positive_logits?, row_lse,
  row_offset, combine, column_grads: bool, symmetric: bool = False) -> (grad_a, grad_b,
  grad_a_cols, grad_b_cols)``: a tensor that was None gets an empty (0-element) gradient, and
  so do the columns when column_grads is False (a constant memory bank: the column sweep is
  skipped).

and, optionally (the CPU kernels), for the memory-bank mode:

- ``contrastive_rows_forward(a, b?, a_cols, b_cols?, positive_logits, combine) -> (losses,
  row_lse, a_rows, b_rows)``: contrastive_forward's outputs, and each row's gradient sums,
  accumulated in the same sweep: a_rows (1, B, D) or, for "concat", (2, B, D) per term over
  the a columns, b_rows (B, Db) over the b columns (empty for "none"), in the accumulation
  dtype.
- ``contrastive_rows_backward(grad_losses, a_rows, b_rows, a, b?, a_cols, b_cols?,
  positive_logits, row_lse, combine, column_grads: bool) -> (grad_a, grad_b, grad_a_cols,
  grad_b_cols)``: the row gradients for upstream grad_losses, a scaling of the sums, and with
  column_grads the columns' from a column sweep (else empty), in the accumulation dtype.

and, for distributed negatives that split the job's symmetric sweep among the ranks
(`distributed.SplitContrastive`; not differentiable themselves):

- ``contrastive_pairs_forward(a, b?, block_starts, pairs, group_rows: int, combine) -> (max,
  sum)``: over M rows a (M, D), b (M, Db) in groups of group_rows (each rank's two views), the
  blocks [block_starts[k], block_starts[k+1]) and the listed unordered block pairs (P, 3) =
  (round, i, j), the running (max, sum of exp) (2, M) of every row's negatives (its own and its
  positive column excluded) over those pairs' tiles; -inf and 0 where a row saw none.
- ``contrastive_pairs_backward(a, b?, block_starts, pairs, row_lse, row_scale, group_rows,
  combine) -> (grad_a (M, D), grad_b (M, Db))``: those tiles' negatives' share of the gradient
  of Σ_t Σ_g row_scale[t, g] (lse_t,g) given every row's full log-sum-exps row_lse (2, M); in the
  accumulation dtype (grad_b empty for "none").

A backend that registers the pair ops sets `pair_block_rows` (its preferred block size).

The accumulation dtype is float64 for float64 inputs and float32 for every other dtype. This
module holds what the backends share on the Python side: the fake (meta) implementations, the
autograd formulas (the backward ops give the first derivative; the gradient of the explicit
positive logits is computed here once), the refusal of double backward, and `OpKernels`, the
`interface.Kernels` object over a namespace's ops.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

OP_NAMES = ("attention_forward", "attention_backward", "contrastive_forward",
            "contrastive_backward")
# Ops only the CPU kernels implement (a backend says so with OpKernels(rows_forward=True)).
CPU_ONLY_OPS = ("contrastive_rows_forward", "contrastive_rows_backward")


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate in float64, the others in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# The single-process sweep of the GPU kernels (read at every call: ICL_MSR_SWEEP or set_sweep).

_SWEEPS = ("full", "symmetric")
_sweep = os.environ.get("ICL_MSR_SWEEP", "full")


def set_sweep(sweep: str) -> None:
    """Choose how the GPU kernels (`triton`, `cuda`) sweep a single-process problem's (2N)²
    logits.

    "full" (the default): every row block sweeps every column block, both triangles, with no
    communication between programs. "symmetric": each unordered pair of row blocks is computed
    once and serves both (the coefficient tile G applied to one block's features, Gᵀ to the
    other's: a third fewer products in forward+backward and half the exponentials), the
    programs adding their column sides to shared buffers in an order fixed by turn counters, so
    results stay deterministic. Each backend takes it where its kernels fit the problem
    (`triton`: float16/bfloat16 up to D = 128 on a GPU; `cuda`: float32/float16/bfloat16 up
    to D = 128) and sweeps "full" otherwise; distributed columns and memory banks always take
    "full", and the CPU kernels always pair the tiles. Not the default until a GPU measurement
    says it is the faster. Under torch.compile the value at tracing time is the one compiled in.
    """
    global _sweep
    if sweep not in _SWEEPS:
        raise ValueError(f"sweep must be one of {', '.join(map(repr, _SWEEPS))}, got {sweep!r}")
    _sweep = sweep


def get_sweep() -> str:
    """The current single-process sweep (see `set_sweep`)."""
    if _sweep not in _SWEEPS:  # a bad environment variable
        raise ValueError(f"ICL_MSR_SWEEP must be one of {', '.join(_SWEEPS)}, got {_sweep!r}")
    return _sweep


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: output shapes and dtypes only.

def attention_forward_fake(x, prototypes, log_prior, inv_attn_temperature, prior_mode):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=accum_dtype(x.dtype))


def attention_backward_fake(grad_c, x, prototypes, log_prior, c, row_lse, inv_attn_temperature,
                            prior_mode):
    return torch.empty_like(x), torch.empty_like(prototypes), torch.empty_like(log_prior)


def contrastive_forward_fake(a, b, a_cols, b_cols, positive_logits, row_offset, combine,
                             symmetric=False):
    acc = accum_dtype(a.dtype)
    return a.new_empty(2, dtype=acc), a.new_empty(2, a.shape[0], dtype=acc)


def contrastive_backward_fake(grad_losses, a, b, a_cols, b_cols, positive_logits, row_lse,
                              row_offset, combine, column_grads, symmetric=False):
    # Distinct tensors for absent inputs: op outputs may not alias each other.
    wanted = (True, True, column_grads, column_grads)
    return [a.new_empty(0) if t is None or not w else torch.empty_like(t)
            for t, w in zip((a, b, a_cols, b_cols), wanted)]


def contrastive_rows_forward_fake(a, b, a_cols, b_cols, positive_logits, combine):
    acc = accum_dtype(a.dtype)
    terms_on_a = 2 if combine == "concat" else 1
    b_rows = a.new_empty(0, dtype=acc) if combine == "none" else b.new_empty(b.shape, dtype=acc)
    return (a.new_empty(2, dtype=acc), a.new_empty(2, a.shape[0], dtype=acc),
            a.new_empty(terms_on_a, *a.shape, dtype=acc), b_rows)


def contrastive_rows_backward_fake(grad_losses, a_rows, b_rows, a, b, a_cols, b_cols,
                                   positive_logits, row_lse, combine, column_grads):
    acc = a_rows.dtype
    with_b = combine != "none"

    def like(t, wanted):
        return t.new_empty(t.shape, dtype=acc) if wanted else a_rows.new_empty(0)

    return (a_rows.new_empty(a_rows.shape[1:]), like(b if with_b else a, with_b),
            like(a_cols, column_grads), like(b_cols if with_b else a_cols, column_grads and with_b))


def contrastive_pairs_forward_fake(a, b, block_starts, pairs, group_rows, combine):
    acc = accum_dtype(a.dtype)
    return a.new_empty(2, a.shape[0], dtype=acc), a.new_empty(2, a.shape[0], dtype=acc)


def contrastive_pairs_backward_fake(a, b, block_starts, pairs, row_lse, row_scale, group_rows,
                                    combine):
    acc = accum_dtype(a.dtype)
    grad_b = a.new_empty(0) if combine == "none" else b.new_empty(b.shape, dtype=acc)
    return a.new_empty(a.shape, dtype=acc), grad_b


FAKES = {
    "attention_forward": attention_forward_fake,
    "attention_backward": attention_backward_fake,
    "contrastive_forward": contrastive_forward_fake,
    "contrastive_backward": contrastive_backward_fake,
    "contrastive_rows_forward": contrastive_rows_forward_fake,
    "contrastive_rows_backward": contrastive_rows_backward_fake,
    "contrastive_pairs_forward": contrastive_pairs_forward_fake,
    "contrastive_pairs_backward": contrastive_pairs_backward_fake,
}


# ---------------------------------------------------------------------------------------------
# Autograd.

def positive_logit_grad(grad_losses: Tensor, positive_logits: Tensor, row_lse: Tensor,
                        combine: str) -> Tensor:
    """d(grad_losses · losses)/d positive_logits (2, B): g_t (softmax weight of the positive - 1)
    / B per row; zero for the interventional row when there is no interventional term."""
    rows = positive_logits.shape[1]
    acc = row_lse.dtype
    weight = torch.exp(positive_logits.to(acc) - row_lse) - 1
    grad = grad_losses.to(acc)[:, None] * weight / rows
    if combine == "none":
        grad = torch.cat([grad[:1], torch.zeros_like(grad[1:])])
    return grad.to(positive_logits.dtype)


def no_double_backward(backend: str):
    """Autograd formula of a backward op: refuse, clearly, to differentiate it."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"icl_msr_kernels: backend {backend!r} computes first-order gradients only; double "
            f"backward (a gradient of a gradient, e.g. torch.autograd.grad(..., "
            f"create_graph=True) followed by another backward) is not supported. Use "
            f"backend='reference' for higher-order gradients.")

    return backward


def _nothing_to_save(ctx, inputs, output) -> None:
    """setup_context of a backward op: its own backward only raises."""


def register_autograd(namespace: str, backend: str) -> None:
    """Autograd of ``namespace::*_forward`` through its ``*_backward`` ops (all four must be
    defined); the backward ops refuse double backward naming `backend`."""
    ops = getattr(torch.ops, namespace)

    def attention_setup(ctx, inputs, output):
        x, prototypes, log_prior, inv_attn_temperature, prior_mode = inputs
        c, row_lse = output
        ctx.save_for_backward(x, prototypes, log_prior, c, row_lse)
        ctx.inv_attn_temperature, ctx.prior_mode = inv_attn_temperature, prior_mode
        ctx.mark_non_differentiable(row_lse)

    def attention_backward(ctx, grad_c, _grad_row_lse):
        x, prototypes, log_prior, c, row_lse = ctx.saved_tensors
        grads = ops.attention_backward(grad_c, x, prototypes, log_prior, c, row_lse,
                                       ctx.inv_attn_temperature, ctx.prior_mode)
        return (*grads, None, None)

    def contrastive_setup(ctx, inputs, output):
        a, b, a_cols, b_cols, positive_logits, row_offset, combine, symmetric = inputs
        _losses, row_lse = output
        ctx.save_for_backward(a, b, a_cols, b_cols, positive_logits, row_lse)
        ctx.row_offset, ctx.combine, ctx.symmetric = row_offset, combine, symmetric
        ctx.mark_non_differentiable(row_lse)

    def sweep_backward(grad_losses, operands, row_lse, row_offset, combine, needs_input_grad,
                       symmetric=False):
        a, b, a_cols, b_cols, positive_logits = operands
        column_grads = a_cols is not None and any(needs_input_grad[2:4])
        grads = ops.contrastive_backward(grad_losses, a, b, a_cols, b_cols, positive_logits,
                                         row_lse, row_offset, combine, column_grads, symmetric)
        grads = [g if t is not None and needed else None
                 for g, t, needed in zip(grads, (a, b, a_cols, b_cols), needs_input_grad)]
        grad_positive = (None if positive_logits is None else
                         positive_logit_grad(grad_losses, positive_logits, row_lse, combine))
        return (*grads, grad_positive)

    def contrastive_backward(ctx, grad_losses, _grad_row_lse):
        *operands, row_lse = ctx.saved_tensors
        return (*sweep_backward(grad_losses, operands, row_lse, ctx.row_offset, ctx.combine,
                                ctx.needs_input_grad, ctx.symmetric), None, None, None)

    def rows_setup(ctx, inputs, output):
        a, b, a_cols, b_cols, positive_logits, combine = inputs
        _losses, row_lse, a_rows, b_rows = output
        ctx.save_for_backward(a, b, a_cols, b_cols, positive_logits, row_lse, a_rows, b_rows)
        ctx.combine = combine
        ctx.mark_non_differentiable(row_lse, a_rows, b_rows)

    def rows_backward(ctx, grad_losses, _grad_row_lse, _grad_a_rows, _grad_b_rows):
        a, b, a_cols, b_cols, positive_logits, row_lse, a_rows, b_rows = ctx.saved_tensors
        operands = (a, b, a_cols, b_cols, positive_logits)
        if torch.is_grad_enabled():
            # create_graph: the sweep's backward op records the node that refuses a second
            # derivative, which the sums, constants to autograd, cannot.
            return (*sweep_backward(grad_losses, operands, row_lse, 0, ctx.combine,
                                    ctx.needs_input_grad), None)
        column_grads = any(ctx.needs_input_grad[2:4])
        grads = ops.contrastive_rows_backward(grad_losses, a_rows, b_rows, *operands, row_lse,
                                              ctx.combine, column_grads)
        grads = [g.to(t.dtype) if t is not None and needed else None
                 for g, t, needed in zip(grads, operands[:4], ctx.needs_input_grad)]
        grad_positive = positive_logit_grad(grad_losses, positive_logits, row_lse, ctx.combine)
        return (*grads, grad_positive, None)

    torch.library.register_autograd(f"{namespace}::attention_forward", attention_backward,
                                    setup_context=attention_setup)
    backward_ops = ["attention_backward", "contrastive_backward"]
    if hasattr(ops, "contrastive_rows_forward"):
        torch.library.register_autograd(f"{namespace}::contrastive_rows_forward", rows_backward,
                                        setup_context=rows_setup)
        backward_ops.append("contrastive_rows_backward")
    torch.library.register_autograd(f"{namespace}::contrastive_forward", contrastive_backward,
                                    setup_context=contrastive_setup)
    for op in backward_ops:
        torch.library.register_autograd(f"{namespace}::{op}", no_double_backward(backend),
                                        setup_context=_nothing_to_save)


# ---------------------------------------------------------------------------------------------
# The backend object.

class OpKernels:
    """`interface.Kernels` over the four ops of one namespace."""

    # float16/bfloat16 inputs: the glue runs in float32; the ops read the inputs as stored and
    # accumulate in float32.
    upcast_half = True

    def __init__(self, name: str, namespace: str, pair_block_rows: int = 512,
                 rows_forward: bool = False) -> None:
        self.name = name
        self.namespace = namespace
        self.pair_block_rows = pair_block_rows
        # Whether this backend's device has the contrastive_rows ops (the memory-bank mode).
        self.rows_forward = rows_forward

    def _ops(self):
        return getattr(torch.ops, self.namespace)

    @property
    def supports_pairs(self) -> bool:
        """Whether the namespace has the pair ops (the split distributed sweep)."""
        return hasattr(self._ops(), "contrastive_pairs_forward")

    def pairs_forward(self, a, b, block_starts, pairs, group_rows, combine):
        return self._ops().contrastive_pairs_forward(a, b, block_starts, pairs, group_rows,
                                                     combine)

    def pairs_backward(self, a, b, block_starts, pairs, row_lse, row_scale, group_rows,
                       combine):
        grad_a, grad_b = self._ops().contrastive_pairs_backward(
            a, b, block_starts, pairs, row_lse, row_scale, group_rows, combine)
        return grad_a, (grad_b if combine != "none" else None)

    def attention(self, x: Tensor, prototypes: Tensor, log_prior: Tensor, attn_temperature: float,
                  prior_mode: str) -> Tensor:
        c, _row_lse = self._ops().attention_forward(x, prototypes, log_prior,
                                                    1.0 / attn_temperature, prior_mode)
        return c

    def contrastive(self, a: Tensor, b: Tensor | None, a_cols: Tensor | None,
                    b_cols: Tensor | None, row_offset: int, combine: str,
                    positive_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self._use_rows_forward(a, b, a_cols, b_cols, positive_logits):
            losses, *_ = self._ops().contrastive_rows_forward(a, b, a_cols, b_cols,
                                                              positive_logits, combine)
        else:
            # Only a single-process problem has a symmetric sweep; the op falls back to the
            # full one where its kernels do not fit the problem.
            symmetric = a_cols is None and get_sweep() == "symmetric"
            losses, _row_lse = self._ops().contrastive_forward(a, b, a_cols, b_cols,
                                                               positive_logits, row_offset,
                                                               combine, symmetric)
        return losses[0], losses[1]

    def _use_rows_forward(self, a, b, a_cols, b_cols, positive_logits) -> bool:
        """A memory bank, in a call that will be differentiated: the forward that also
        accumulates the row gradients saves the backward's row sweep (the columns, when they
        need gradients, still get a sweep of their own). Without a backward to come, the plain
        forward is cheaper."""
        if not self.rows_forward or positive_logits is None or not torch.is_grad_enabled():
            return False
        return any(t is not None and t.requires_grad
                   for t in (a, b, a_cols, b_cols, positive_logits))
