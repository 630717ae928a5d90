"""Backend registry: the one place that knows which kernels exist and which one runs.

A backend is an object with the two heavy pieces of SPEC, each differentiable:

- ``attention(x, prototypes, log_prior, attn_temperature, prior_mode) -> C``
  x (B, D) and prototypes (K, D) row-normalised, log_prior (K,); C (B, D) (SPEC steps 4-6).
- ``contrastive(a, b, a_cols, b_cols, row_offset, int_mode) -> (L_base, L_int)``
  NT-Xent of B local rows against M columns on features pre-scaled by 1/sqrt(tau), never
  materialising B x M; a_cols/b_cols None means the columns are the rows (SPEC steps 7-8).
  See `reference.contrastive_losses` for the exact contract.

and a class attribute ``upcast_half``: whether the cheap glue around them runs in float32 for
float16/bfloat16 inputs. Adding a backend is one module plus one entry in ``_LOADERS``.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from .reference import ReferenceKernels


class BackendUnavailable(RuntimeError):
    """Raised when a named backend cannot run in this process; the message says why."""


def _load_reference():
    return ReferenceKernels


def _load_cpp():
    from .kernels import extension

    return extension.load("cpu")


def _load_triton():
    from .kernels import triton_backend

    return triton_backend.load()


def _load_cuda():
    from .kernels import extension

    return extension.load("cuda")


# name -> (loader, device types it runs on). A loader returns the kernels or raises
# BackendUnavailable with the reason.
_LOADERS: dict[str, tuple[Callable[[], object], tuple[str, ...]]] = {
    "reference": (_load_reference, ("cpu", "cuda")),
    "cpp": (_load_cpp, ("cpu",)),
    "triton": (_load_triton, ("cuda", "cpu")),
    "cuda": (_load_cuda, ("cuda",)),
}

# What backend="auto" tries, fastest first, per device type. On CUDA, "cuda" before "triton" is
# PENDING a GPU benchmark (no GPU has been lent yet; benchmarks/gpu_check.sh measures both): it
# comes first for now because it needs no JIT compilation and no autotuning on first use.
_AUTO_ORDER = {
    "cpu": ("cpp", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

_cache: dict[str, object] = {}


def _device_reason(name: str, device_type: str) -> str | None:
    """Why backend `name` cannot run on tensors of `device_type`, or None if it can."""
    if device_type not in _LOADERS[name][1]:
        return f"backend {name!r} does not run on {device_type} tensors"
    if name == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("backend 'triton' runs on CPU tensors only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing triton)")
    return None


def load_backend(name: str):
    """The kernels of backend `name`; raises BackendUnavailable saying why not."""
    if name not in _cache:
        try:
            _cache[name] = _LOADERS[name][0]()
        except BackendUnavailable as err:
            _cache[name] = err
    loaded = _cache[name]
    if isinstance(loaded, BackendUnavailable):
        raise loaded
    return loaded


def backend_status() -> dict[str, str | None]:
    """Every backend name -> None when it is usable in this process, else why it is not."""
    status: dict[str, str | None] = {}
    for name in _LOADERS:
        try:
            load_backend(name)
            status[name] = None
        except BackendUnavailable as err:
            status[name] = str(err)
    return status


def available_backends() -> list[str]:
    """Names of the backends that can run in this process (on at least one device type)."""
    return [name for name, reason in backend_status().items() if reason is None]


def resolve_backend(name: str, device: torch.device):
    """The kernels for `name` on `device`; "auto" picks the fastest available one."""
    device_type = device.type
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device_type, ("reference",)):
            try:
                if _device_reason(candidate, device_type) is None:
                    return load_backend(candidate)
            except BackendUnavailable:
                continue
        return load_backend("reference")
    try:
        kernels = load_backend(name)
    except BackendUnavailable as err:
        raise BackendUnavailable(f"backend {name!r} is not available: {err}") from None
    reason = _device_reason(name, device_type)
    if reason is not None:
        raise BackendUnavailable(reason)
    return kernels
