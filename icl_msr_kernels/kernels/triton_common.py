"""Shared machinery of the Triton backend: options, tile helpers, launching, op registration.

The two ops (`triton_attention`, `triton_contrastive`) are built from the same parts:

- tile helpers (`load_tile`, `store_tile`, `dot_nt`) that handle any D: when D fits one
  BLOCK_D-wide tile ("ONE_D") the row tiles are loaded once and held in registers, as in
  flash-attention; otherwise dot products loop over D in BLOCK_D chunks and every kernel that
  accumulates a (rows, D) result gets a grid axis over D chunks (`d_blocking`);
- `segment_length`, which splits a sweep over segments so small problems still fill the GPU;
- `TunedKernel`, a kernel with its GPU autotuning spaces and the fixed configuration the Triton
  interpreter runs (the interpreter cannot time configurations);
- `define_op`, which registers a function as one of the shared ops of `kernels.ops` in the
  icl_msr_triton namespace: `torch.library.triton_op` (traceable by torch.compile down to the
  kernels) where torch has it and the kernels are compiled, an opaque `torch.library.custom_op`
  with the shared fake implementation otherwise (older torch, and the interpreter, whose kernels
  cannot run on fake tensors);
- `on_device_of` (kernels launch on their tensors' GPU) and `scalar` (float64 scalars).

Options (read at every call, so they may be changed at run time):

- ``ICL_MSR_TRITON_FP32_PRECISION`` / `set_fp32_precision`: how float32 dot products run (see
  there); the default "ieee" is true float32 and meets the float32 tolerance of
  docs/math.md §5. Under torch.compile the value at tracing time is the one compiled in.
- ``ICL_MSR_TRITON_AUTOTUNE=0`` / `set_autotune(False)`: skip autotuning and run every kernel
  with its default tiles (quicker start: autotuning compiles and times every configuration
  once per kernel variant and problem size).

How a single-process contrastive problem is swept ("full" or "symmetric") is chosen for both
GPU backends by `ops.set_sweep`; the ops take it as their `symmetric` argument.

The contrastive kernels take their exponentials in base 2: e^(s - m) = 2^(s log2(e) - m2)
with the shift m2 = m log2(e) kept per row (running maxima are held in these units), so a tile
entry costs one fused multiply-add and one ex2 where exp(s - m) costs a subtraction, a multiply
and the ex2. Log-sum-exps leave the kernels in natural units, (m2 + log2 l) ln 2, formed with
the same m2 the sums were taken against.

Every kernel writes each output element from exactly one program and uses no atomics on data
(the symmetric sweep adds to shared buffers in an order fixed by turn counters), so results are
bit-identical run to run for a given tile configuration (docs/math.md §4). Autotuning
picks a configuration per process by timing; ICL_MSR_TRITON_AUTOTUNE=0 also makes results
identical across processes.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Sequence

import torch
import triton
import triton.language as tl

from .ops import FAKES

try:  # The interpreter's stand-in for a compiled kernel (TRITON_INTERPRET=1).
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - every supported Triton has it
    InterpretedFunction = ()

# Namespace of the torch ops this backend registers.
OP_NAMESPACE = "icl_msr_triton"

# Widest D chunk a kernel holds as one tile, (forward, backward), by how tl.dot runs: tensor
# cores on 2-byte operands ("half"), on 4-byte ones once ("tf32") or three times on split
# operands ("tf32x3"), or CUDA-core FMAs ("fma": float32 "ieee" and float64, whose dot keeps
# whole operand rows per thread). Chosen from register spills and shared memory compiled for
# sm_80 and sm_90: wider tiles spill or overflow an A100's shared memory. A forward kernel past
# its width loops over D inside each tile at no extra arithmetic; a backward kernel takes one D
# chunk per program and recomputes the logit tiles for each. The interpreter uses small chunks
# so that tests reach the chunked paths.
_MAX_BLOCK_D = {"half": (128, 128), "tf32": (64, 64), "tf32x3": (32, 32), "fma": (32, 32)}
_INTERPRET_BLOCK_D = 32
# Tensor-core minimum: tl.dot needs every tile dimension >= 16.
_MIN_BLOCK = 16

_FP32_PRECISIONS = ("ieee", "tf32x3", "tf32")
_fp32_precision = os.environ.get("ICL_MSR_TRITON_FP32_PRECISION", "ieee")
_autotune = os.environ.get("ICL_MSR_TRITON_AUTOTUNE", "1") != "0"


# Python floats as constexprs keep their double precision in float64 kernels.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def natural_lse(m2, l):
    """log(sum) in natural units of running (max, sum) kept in base 2: -inf when l is 0."""
    return (m2 + tl.log2(l)) * LN2


@triton.jit
def load_tile(ptr, rows, row_mask, d0, D, BLOCK_D: tl.constexpr):
    """Rows `rows` of a row-major (n, D) matrix, columns d0 .. d0 + BLOCK_D - 1, zero-padded."""
    cols = d0 + tl.arange(0, BLOCK_D)
    offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]  # int64: n * D may pass 2**31
    return tl.load(ptr + offsets, mask=row_mask[:, None] & (cols[None, :] < D), other=0.0)


@triton.jit
def store_tile(ptr, rows, row_mask, d0, D, value, BLOCK_D: tl.constexpr):
    """Write `value` (rows, BLOCK_D) to columns d0 .. of a row-major (n, D) matrix, in its dtype."""
    cols = d0 + tl.arange(0, BLOCK_D)
    offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty),
             mask=row_mask[:, None] & (cols[None, :] < D))


@triton.jit
def dot_nt(x_tile, y_tile, x_ptr, x_rows, x_mask, y_ptr, y_rows, y_mask, D,
           BX: tl.constexpr, BY: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D: tl.constexpr,
           FP64: tl.constexpr, PREC: tl.constexpr):
    """x[x_rows] · y[y_rows]ᵀ over all of D, accumulated in float32 (float64 for FP64).

    With ONE_D the tiles x_tile, y_tile already hold whole rows and the product is one dot;
    otherwise the rows are re-read from x_ptr, y_ptr chunk by chunk (the tiles are unused).
    """
    if ONE_D:
        out = tl.dot(x_tile, tl.trans(y_tile), input_precision=PREC)
    else:
        out = tl.zeros((BX, BY), dtype=tl.float64 if FP64 else tl.float32)
        for d0 in range(0, D, BLOCK_D):
            x = load_tile(x_ptr, x_rows, x_mask, d0, D, BLOCK_D)
            y = load_tile(y_ptr, y_rows, y_mask, d0, D, BLOCK_D)
            out = tl.dot(x, tl.trans(y), out, input_precision=PREC, out_dtype=out.dtype)
    return out


# --------------------------------------------------------------------------------------------
# Host-side helpers


def interpreting() -> bool:
    """True when triton.jit produced interpreter functions (TRITON_INTERPRET=1 at import)."""
    return isinstance(load_tile, InterpretedFunction)


def set_fp32_precision(precision: str) -> None:
    """Choose how float32 dot products run: "ieee" (default), "tf32x3" or "tf32".

    "ieee" is true float32 on CUDA cores and meets the float32 tolerance (docs/math.md §5). "tf32x3" uses
    tensor cores on each operand split into two TF32 parts, close to float32; "tf32" uses them
    once, fastest, with about three fewer decimal digits (outside the float32 tolerance).
    Half-precision and float64 inputs are unaffected.
    """
    global _fp32_precision
    if precision not in _FP32_PRECISIONS:
        raise ValueError(f"fp32 precision must be one of {', '.join(map(repr, _FP32_PRECISIONS))}, "
                         f"got {precision!r}")
    _fp32_precision = precision


def get_fp32_precision() -> str:
    """The current float32 dot precision (see `set_fp32_precision`)."""
    return _fp32_precision


def set_autotune(enabled: bool) -> None:
    """Autotune tile shapes on first use (True, the default) or use each kernel's default."""
    global _autotune
    _autotune = bool(enabled)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision for operands of `dtype` (only float32 has a choice)."""
    if dtype != torch.float32:
        return "ieee"
    if _fp32_precision not in _FP32_PRECISIONS:  # a bad environment variable
        raise ValueError(f"ICL_MSR_TRITON_FP32_PRECISION must be one of "
                         f"{', '.join(_FP32_PRECISIONS)}, got {_fp32_precision!r}")
    return _fp32_precision


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def uses_fma(dtype: torch.dtype, precision: str) -> bool:
    """Whether tl.dot runs on CUDA-core FMAs (float32 "ieee", float64), not tensor cores."""
    return dtype == torch.float64 or (dtype == torch.float32 and precision == "ieee")


def d_blocking(dim: int, backward: bool, dtype: torch.dtype, precision: str) -> tuple[int, int]:
    """(BLOCK_D, number of D chunks) for feature width `dim` and operands of `dtype`."""
    if interpreting():
        cap = _INTERPRET_BLOCK_D
    elif uses_fma(dtype, precision):
        cap = _MAX_BLOCK_D["fma"][backward]
    else:  # tensor cores: float32 in "tf32" or "tf32x3", or 2-byte types
        cap = _MAX_BLOCK_D[precision if dtype == torch.float32 else "half"][backward]
    block = min(max(triton.next_power_of_2(int(dim)), _MIN_BLOCK), cap)
    return block, triton.cdiv(int(dim), block)


# Up to this width the contrastive kernels hold whole feature rows (tiles of the next power of
# two): the backward then computes each logit tile once rather than once per D chunk, and the
# forward blocks D the same way, so that under the interpreter (whose chunked dots round
# differently) the backward recomputes the forward's logits exactly. Their autotuning spaces
# hold tiles that fit (TunedKernel's wide spaces above 128). float32 on tensor cores ("tf32",
# "tf32x3", 4-byte operands, split in two for "tf32x3") overflows shared memory or spills with
# whole rows and keeps its chunks.
_MAX_WHOLE_D = 256
WIDE_BLOCK_D = 128  # BLOCK_D above this takes a kernel's wide spaces


def whole_d_blocking(dim: int, backward: bool, dtype: torch.dtype,
                     precision: str) -> tuple[int, int]:
    """`d_blocking` of a kernel that holds the whole of D when it is <= 256 (FMA dots and
    2-byte tensor-core operands)."""
    whole = uses_fma(dtype, precision) or dtype in (torch.float16, torch.bfloat16)
    if whole and dim <= _MAX_WHOLE_D:
        return max(triton.next_power_of_2(int(dim)), _MIN_BLOCK), 1
    return d_blocking(dim, backward, dtype, precision)


# Split sweeps. A kernel whose programs own blocks of n_own rows and sweep n_swept others would
# have only n_own / BLOCK programs for a small n_own (one contrastive problem, a few
# prototypes), far fewer than a GPU's SMs. Such sweeps are cut into segments, one program per
# (block, segment), each writing partial results that torch combines in a fixed order: the GPU
# fills and results stay deterministic without atomics.
_TARGET_PROGRAMS = 264  # about two waves on a 132-SM H100, four on a 108-SM A100
_NOMINAL_BLOCK = 64  # owner rows per program assumed when sizing segments (before autotuning)
_SEGMENT_QUANTUM = 128  # segments are multiples of every swept-tile size the configs use
_INTERPRET_SEGMENT = 16  # the interpreter's tile size: tests reach the multi-segment paths


def segment_length(n_own: int, n_chunks: int, n_swept: int) -> int:
    """Swept rows per segment for a sweep of `n_swept` rows by blocks of `n_own` owners."""
    if interpreting():
        return _INTERPRET_SEGMENT
    programs = triton.cdiv(int(n_own), _NOMINAL_BLOCK) * n_chunks
    segments = max(1, min(_TARGET_PROGRAMS // programs,
                          triton.cdiv(int(n_swept), _SEGMENT_QUANTUM)))
    return triton.cdiv(triton.cdiv(int(n_swept), segments), _SEGMENT_QUANTUM) * _SEGMENT_QUANTUM


def check_device(*tensors: torch.Tensor | None) -> None:
    """Raise RuntimeError unless the kernels can run on these tensors' device."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
            continue
        if t.device.type == "cpu":
            raise RuntimeError(
                "backend 'triton' runs on CPU tensors only under the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is first imported (or use CUDA tensors)")
        raise RuntimeError(f"backend 'triton' runs on CUDA tensors, got a tensor on {t.device}")


Space = Sequence[tuple[int, int, int, int]]  # (block_a, block_b, num_warps, num_stages) each


class TunedKernel:
    """A Triton kernel with its GPU autotuning spaces and a fixed interpreter configuration.

    Tensor-core dots ("mma") and CUDA-core FMA dots ("fma", see `uses_fma`) want different
    tiles, so each has its own space; its first entry is the default used without autotuning.
    Configurations are timed per distinct value of `key`. The interpreter cannot time them
    (it has no CUDA events), so there the kernel runs with `interpret_meta`. Every kernel here
    writes its outputs without reading them, so autotuning may rerun it freely.
    """

    def __init__(self, fn: Any, block_names: tuple[str, str], mma: Space, fma: Space,
                 key: list[str], interpret_meta: dict[str, int], wide_mma: Space | None = None,
                 wide_fma: Space | None = None):
        def tuner(space: Space) -> Any:
            configs = [triton.Config({block_names[0]: a, block_names[1]: b}, num_warps=w,
                                     num_stages=s) for a, b, w, s in space]
            return triton.autotune(configs=configs, key=key)(fn)

        self.fn = fn
        # Per (dot kind, wide): the spaces for BLOCK_D above WIDE_BLOCK_D, where given.
        self.spaces = {("mma", False): mma, ("fma", False): fma,
                       ("mma", True): wide_mma or mma, ("fma", True): wide_fma or fma}
        # (autotuned, default only) per space; a one-config autotuner never times anything.
        self._tuners = {kind: (tuner(space), tuner(space[:1]))
                        for kind, space in self.spaces.items()}
        self.interpret_meta = interpret_meta

    def _kind(self, fma: bool, block_d: int) -> tuple[str, bool]:
        return ("fma" if fma else "mma", block_d > WIDE_BLOCK_D)

    def default_config(self, fma: bool, block_d: int = WIDE_BLOCK_D) -> triton.Config:
        """The configuration used without autotuning (and first among those tuned)."""
        return self._tuners[self._kind(fma, block_d)][1].configs[0]

    def configs(self, fma: bool, block_d: int = WIDE_BLOCK_D) -> list[triton.Config]:
        """Every configuration autotuning may choose at this BLOCK_D."""
        return self._tuners[self._kind(fma, block_d)][0].configs

    def launch(self, grid: Callable[[dict], tuple[int, ...]], *args: Any, fma: bool,
               **consts: Any) -> None:
        """Run on `grid(meta)` programs; `consts` are the constexprs autotuning does not choose
        (BLOCK_D among them)."""
        if interpreting():
            meta = {**self.interpret_meta, **consts}
            self.fn[grid(meta)](*args, **meta)
            return
        tuned, default = self._tuners[self._kind(fma, consts["BLOCK_D"])]
        _wrap_triton(tuned if _autotune else default)[grid](*args, **consts)


# --------------------------------------------------------------------------------------------
# Op registration

_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
_wrap_triton = torch.library.wrap_triton if _HAS_TRITON_OP else (lambda kernel: kernel)


def traceable(kernel: Any) -> Any:
    """`kernel` as a `define_op` function must launch it for torch.compile to trace the launch
    (torch.library.wrap_triton; the kernel itself under the interpreter or an older torch)."""
    return kernel if interpreting() else _wrap_triton(kernel)


def define_op(name: str) -> Callable[[Callable[..., Any]], Any]:
    """Decorator registering `fn` as the torch op icl_msr_triton::name (no mutated arguments),
    with the schema and fake implementation of `kernels.ops` (the op surface every fused
    backend shares).

    torch.library.triton_op lets torch.compile see through the op to the kernels (its fake
    implementation is `fn` itself run on fake tensors). Without it, or under the interpreter
    (whose kernels need real data), the op is an opaque custom_op with the shared fake.
    """

    def register(fn: Callable[..., Any]) -> Any:
        qualname = f"{OP_NAMESPACE}::{name}"
        if _HAS_TRITON_OP and not interpreting():
            return torch.library.triton_op(qualname, mutates_args=())(fn)
        op = torch.library.custom_op(qualname, mutates_args=())(fn)
        op.register_fake(FAKES[name])
        return op

    return register


@contextlib.contextmanager
def on_device_of(t: torch.Tensor):
    """Launch on `t`'s GPU rather than the current one (Triton launches on the current device)."""
    if t.device.type == "cuda":
        with torch.cuda.device(t.device):
            yield
    else:
        yield


def scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """`value` as a 1-element tensor of `like`'s accumulation dtype on its device, for a kernel
    to load: Triton types a Python float argument as float32, which float64 kernels cannot use.
    (torch.full launches a fill; it does not copy from the host or wait for the device.)"""
    return torch.full((1,), value, dtype=acc_dtype(like.dtype), device=like.device)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_inputs(*tensors: torch.Tensor | None) -> None:
    """Raise unless the kernels can run on these tensors: dtype, then device (`check_device`)."""
    for t in tensors:
        if t is not None and t.dtype not in _DTYPES:
            raise TypeError(f"backend 'triton' supports float32, float16, bfloat16 and float64 "
                            f"inputs, got {t.dtype}")
    check_device(*tensors)
