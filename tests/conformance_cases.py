"""What tests/test_conformance.py runs every backend through: the backends and their tile sizes,
and the docs/math.md §5 comparison with the float64 reference (exact-zero gradients included).

A new backend plugs in with one `Spec` entry in `_SPECS` (and, if it runs on the CPU only under
some condition, a line in `_runs_here`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch

import icl_msr_kernels as icl
from icl_msr_kernels import icl_msr_loss, icl_msr_regularizer, ntxent_loss

from helpers import GRAD_NAMES, HALF_SLACK, PAIRS, TOLERANCES, cast

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

HALF = (torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16",
               torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Spec:
    """One backend on one device type, and the sizes that reach all of its code paths.

    tile_shapes: (N, D, K) that cross every row, column, D-chunk and prototype tile boundary;
    small: the (N, D, K) of the generic cases; bank_sizes: Q of the memory-bank cases (one not a
    multiple of any tile, one crossing the column tiles, 1); namespace: the torch.ops namespace
    of the backend's four ops (None: it has no ops, the reference).
    """

    name: str
    device: str
    dtypes: tuple[torch.dtype, ...]
    tile_shapes: tuple[tuple[int, int, int], ...]
    small: tuple[int, int, int] = (4, 5, 3)
    bank_sizes: tuple[int, ...] = (37, 1)
    namespace: str | None = None
    slow: bool = False  # the Triton interpreter: the heavier cases run a subset of the pairs
    # A single-process sweep of the GPU kernels (`ops.set_sweep`) the entry runs under; such an
    # entry skips the cases that never take it (memory banks, pair kernels).
    sweep: str | None = None

    @property
    def id(self) -> str:
        return "-".join(filter(None, (self.name, self.sweep, self.device)))

    def pairs(self):
        """The (prior_mode, combine) pairs of the heavier cases: all four, or on a slow backend
        two that still cover both prior modes and both combines."""
        return [("logit", "concat"), ("mult", "add")] if self.slow else PAIRS

    def ops(self):
        icl.backends.load_backend(self.name)  # registers the ops (and their autograd)
        return getattr(torch.ops, self.namespace)


_ALL = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# The Triton interpreter has no bfloat16, and it is slow: N <= 10, D <= 40, K <= 20 there.
_INTERPRETER = (torch.float64, torch.float32, torch.float16)

_SPECS = (
    Spec("reference", "cpu", _ALL, tile_shapes=((9, 37, 19),)),
    # cpp: square row blocks of <= 512 rows (2N = 600: 4 blocks of 150; 2N = 2200: 8 of 275),
    # rectangular column blocks of 512 (Q = 1037: 3 blocks), attention row blocks of
    # clamp(65536 / K, 16, 256) rows (K = 600: 109-row blocks).
    Spec("cpp", "cpu", _ALL, tile_shapes=((300, 37, 7), (1100, 3, 2), (70, 37, 600)),
         bank_sizes=(37, 1037, 1), namespace="icl_msr"),
    # Interpreter tiles are 16 rows/columns and D chunks of 32; the contrastive kernels hold
    # the whole of D up to 256 (D = 37), in chunks beyond (D = 270). With 2N = 80 rows some
    # tiles hold no row's own or positive column and skip the masks.
    Spec("triton", "cpu", _INTERPRETER, tile_shapes=((9, 37, 19), (5, 270, 3), (40, 8, 3)),
         bank_sizes=(37, 1),
         namespace="icl_msr_triton", slow=True),
    # The symmetric sweep, 32-row blocks in 16-column pieces: 2N = 100 is four blocks, the last
    # partial, in two segments of distances (several programs add to every block, unmasked
    # tiles among them). float64 holds its math to 1e-10; float16 runs in the loss-scale case,
    # float32 in tests/test_triton.py.
    Spec("triton", "cpu", _INTERPRETER[:1], tile_shapes=((50, 8, 3),),
         namespace="icl_msr_triton", slow=True, sweep="symmetric"),
    # CUDA kernels: 64-wide tiles, 32-wide D chunks; the contrastive kernels hold the owned rows
    # in shared memory at D = 150 (16-bit types, float32); at D = 300 the 16-bit forward holds
    # them and the backwards stage them with every tile (too wide to hold; float64 always
    # stages), which is also two feature groups in the backward. Triton: the
    # whole of D in the contrastive backward at D = 150 (a BLOCK_D of 256, the wide tiles),
    # chunks at D = 300.
    Spec("cuda", "cuda", _ALL, tile_shapes=((70, 150, 70), (40, 300, 9)),
         bank_sizes=(37, 1037, 1), namespace="icl_msr"),
    # The CUDA symmetric sweep: 2N = 140 is three blocks, the last partial (one tile a CTA, so
    # every column add waits on another CTA's turn), D = 100 two 64-wide column-side chunks, the
    # second partial; 2N = 400 seven blocks. float64 and D = 150 take the full sweep.
    # tests/test_cuda.py covers many blocks with several tiles a CTA.
    Spec("cuda", "cuda", _ALL, tile_shapes=((70, 100, 70), (200, 40, 5), (40, 150, 9)),
         namespace="icl_msr", sweep="symmetric"),
    Spec("triton", "cuda", _ALL, tile_shapes=((70, 150, 70), (40, 300, 9)),
         bank_sizes=(37, 1037, 1), namespace="icl_msr_triton"),
)

_STATUS = icl.backend_status()
_AVAILABLE = set(icl.available_backends())


def _runs_here(spec: Spec) -> bool:
    """Whether the entry belongs in this process at all (else it is left out, not skipped)."""
    if spec.name == "triton" and spec.device == "cpu":
        # Only under the interpreter; tests/test_interpreter.py runs that child.
        return INTERPRETED
    return True


def _marks(spec: Spec) -> list:
    marks = []
    if spec.device == "cuda":
        marks.append(pytest.mark.cuda)
        if not HAS_CUDA:
            marks.append(pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() "
                                                 "is False"))
            return marks
        if spec.name == "triton" and INTERPRETED:
            marks.append(pytest.mark.skip(reason="CUDA tensors need compiled Triton, this "
                                                 "process runs the interpreter"))
            return marks
    if spec.name not in _AVAILABLE:
        marks.append(pytest.mark.skip(reason=f"backend {spec.name!r} unavailable: "
                                             f"{_STATUS.get(spec.name)}"))
    return marks


SPECS = [spec for spec in _SPECS if _runs_here(spec)]
# The (name, device) parameters of the suite.
BACKENDS = [pytest.param(spec, id=spec.id, marks=_marks(spec)) for spec in SPECS]


def backend_dtypes(dtypes=_ALL, *, extra=None, ops_only=False, sweeps=True):
    """Parameters (spec, dtype) for every backend and every dtype of `dtypes` it supports here;
    `extra(spec)` may add dtypes for a backend (e.g. bfloat16 on a GPU only); ops_only: only
    the backends with torch ops; sweeps=False: not the entries of a single-process sweep (for
    cases that never take it)."""
    params = []
    for spec in SPECS:
        if (ops_only and spec.namespace is None) or (spec.sweep and not sweeps):
            continue
        wanted = list(dtypes) + (list(extra(spec)) if extra else [])
        for dtype in _ALL:
            if dtype in wanted and dtype in spec.dtypes:
                params.append(pytest.param(spec, dtype, id=f"{spec.id}-{DTYPE_NAMES[dtype]}",
                                           marks=_marks(spec)))
    return params


def backend_shapes(kind: str, dtypes=(torch.float64, torch.float32)):
    """Parameters (spec, dtype, shape) for the backend's `kind` shapes ("tile_shapes")."""
    params = []
    for spec in SPECS:
        for shape in getattr(spec, kind):
            for dtype in dtypes:
                if dtype in spec.dtypes:
                    params.append(pytest.param(
                        spec, dtype, shape, marks=_marks(spec),
                        id=f"{spec.id}-{DTYPE_NAMES[dtype]}-n{shape[0]}-d{shape[1]}-k{shape[2]}"))
    return params


# ---------------------------------------------------------------------------------------------
# The functions under test, as (inputs, backend, **kwargs) -> tuple of loss parts.

def loss_parts(inputs, backend, **kwargs):
    return icl_msr_loss(inputs["z1"], inputs["z2"], inputs["prototypes"], inputs["prior_logits"],
                        temperature=inputs["temperature"], backend=backend, return_parts=True,
                        **kwargs)


def regularizer_parts(inputs, backend, **kwargs):
    return (icl_msr_regularizer(inputs["z1"], inputs["z2"], inputs["prototypes"],
                                inputs["prior_logits"], temperature=inputs["temperature"],
                                backend=backend, **kwargs),)


def ntxent_parts(inputs, backend, bank=None):
    return (ntxent_loss(inputs["z1"], inputs["z2"], temperature=inputs["temperature"],
                        backend=backend, bank=bank),)


# Weights of the parts in the differentiated total: each part's backward gets its own weight.
_WEIGHTS = (1.0, 0.3, 0.7)


def parts_and_grads(fn, inputs, backend, *, upstream=1.0, **kwargs):
    """(parts, {name: grad}) of fn; the gradients are those of upstream * sum(w_i part_i) for
    every input that requires grad and is used (ntxent does not use the prototypes)."""
    parts = fn(inputs, backend, **kwargs)
    total = sum(w * p for w, p in zip(_WEIGHTS, parts))
    leaves = {n: v for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    grads = torch.autograd.grad(total * upstream, list(leaves.values()), allow_unused=True) \
        if leaves else ()
    return [p.detach() for p in parts], {n: g for n, g in zip(leaves, grads) if g is not None}


# ---------------------------------------------------------------------------------------------
# docs/math.md §5

def nonzero_gradients(n: int, d: int, k: int, combine: str, gamma: float = 1.0
                      ) -> tuple[str, ...]:
    """The inputs whose exact gradient is not identically 0 at these sizes.

    N = 1: every row's only candidate is its positive, the loss is the constant 0 (nothing has a
    gradient). D = 1: every unit row is +-1 (z1, z2 and the prototypes get 0), and in "add" mode
    H = sign(x + gamma c) no longer depends on c (the prior gets 0 too). K = 1: the prior is the
    constant 1, every c is the one prototype, which in "concat" only adds the constant gamma to
    every logit. gamma = 0: c does not reach the logits (prototypes and prior get 0).
    """
    if n == 1:
        return ()
    zero = set()
    if d == 1:
        zero |= {"z1", "z2", "prototypes"} | ({"prior_logits"} if combine == "add" else set())
    if k == 1:
        zero |= {"prior_logits"} | ({"prototypes"} if combine == "concat" else set())
    if gamma == 0:
        zero |= {"prototypes", "prior_logits"}
    return tuple(name for name in GRAD_NAMES if name not in zero)


def errors(parts, grads, truth_parts, truth_grads, zero=()):
    """§5's normalised errors: loss |p - r| / max(|r|, 1); a gradient max|g - r| / max|r|, or
    max|g - r| (not divided) where the exact gradient is 0 (names in `zero`)."""
    loss_err = max((p.double() - r.double()).abs().item() / max(abs(r.item()), 1.0)
                   for p, r in zip(parts, truth_parts))
    grad_err = {}
    for name, ref in truth_grads.items():
        diff = (grads[name].double() - ref.double()).abs().max()
        scale = 1.0 if name in zero else ref.double().abs().max().clamp_min(1e-300)
        grad_err[name] = (diff / scale).item()
    return loss_err, grad_err


def assert_conforms(inputs, spec: Spec, dtype, *, fn=loss_parts, zero=(), ours=None,
                    eager=None, upstream=1.0, eager_upstream=1.0, **kwargs):
    """§5: backend `spec` run in `dtype` (on `ours`, default the float64 master `inputs` cast)
    against the float64 reference on `inputs`. Gradients of the names in `zero` are exactly 0
    and compared without dividing by them. For float16/bfloat16 the budget is the error of the
    eager reference on `eager` (default: `inputs` cast to `dtype`), its gradients taken with the
    upstream factor `eager_upstream` (its own losses are half-precision numbers, and 2^16 is
    none: a loss scale of at most 2^15 fits). Returns the backend's (parts, grads)."""
    ours = cast(inputs, dtype) if ours is None else ours
    parts, grads = parts_and_grads(fn, ours, spec.name, upstream=upstream, **kwargs)
    what = f"{spec.id} {DTYPE_NAMES[dtype]}"
    for name, value in ours.items():
        if name in grads:
            assert grads[name].dtype == value.dtype, \
                f"{what}: grad of {name} is {grads[name].dtype}"
            assert grads[name].shape == value.shape, f"{what}: grad of {name} has a wrong shape"
    truth_parts, truth_grads = parts_and_grads(fn, cast(inputs, torch.float64), "reference",
                                               upstream=upstream, **kwargs)
    assert set(grads) == set(truth_grads), f"{what}: gradients {set(grads)} vs {set(truth_grads)}"
    loss_err, grad_err = errors(parts, grads, truth_parts, truth_grads, zero)
    if dtype in TOLERANCES:
        loss_tol, grad_tol = TOLERANCES[dtype]
        budget_loss, budget = loss_tol, {name: grad_tol for name in grad_err}
    else:  # half: the eager reference's own error in that dtype, plus HALF_SLACK
        eager = cast(inputs, dtype) if eager is None else eager
        eager_parts, eager_grads = parts_and_grads(fn, eager, "reference",
                                                   upstream=eager_upstream, **kwargs)
        # Brought to `upstream` in float64 (the normalised errors do not depend on the scale).
        eager_grads = {n: g.double() * (upstream / eager_upstream)
                       for n, g in eager_grads.items()}
        eager_loss_err, eager_grad_err = errors(eager_parts, eager_grads, truth_parts,
                                                truth_grads, zero)
        budget_loss = eager_loss_err + HALF_SLACK
        budget = {name: eager_grad_err[name] + HALF_SLACK for name in grad_err}
    assert loss_err <= budget_loss, \
        f"{what}: loss error {loss_err:.3g} > {budget_loss:.3g} ({parts} vs {truth_parts})"
    for name, err in grad_err.items():
        kind = "absolute (exact 0)" if name in zero else "relative"
        assert err <= budget[name], \
            f"{what}: grad {name} {kind} error {err:.3g} > {budget[name]:.3g}"
    return parts, grads


def without_grad(inputs, names):
    """A copy of the float64 master inputs where only `names` require grad."""
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().requires_grad_(name in names)
        out[name] = value
    return out


def unit_rows(rows, dim, *, seed, device="cpu", dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    return (v / v.norm(dim=1, keepdim=True)).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Non-contiguous views holding given values

def strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A non-contiguous view with t's values (a leaf that requires grad when t does).

    "step": every other row (1-D: element) of a larger buffer, starting at an offset;
    "offset": a window at a row and column offset of a wider buffer (1-D: as "step");
    "transposed": column-major storage, t.t().contiguous().t()."""
    t = t.detach()
    if layout == "transposed" and t.dim() == 2:
        view = t.t().contiguous().t()
    elif layout == "offset" and t.dim() == 2:
        buf = torch.full((t.shape[0] + 2, t.shape[1] + 3), float("nan"), dtype=t.dtype,
                         device=t.device)
        buf[1:t.shape[0] + 1, 2:t.shape[1] + 2] = t
        view = buf[1:t.shape[0] + 1, 2:t.shape[1] + 2]
    else:  # "step", and the 1-D forms
        buf = torch.full((2 * t.shape[0] + 1, *t.shape[1:]), float("nan"), dtype=t.dtype,
                         device=t.device)
        buf[1::2] = t
        view = buf[1::2]
    assert torch.equal(view, t)
    return view
