"""Backend registry: the one place that knows which kernels exist and which one runs.

A backend is an object implementing `kernels.interface.Kernels` (the two heavy pieces of the
loss, each differentiable). Adding a backend is one module plus one entry in ``_LOADERS``.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from .kernels.interface import BackendUnavailable, Kernels
from .reference import ReferenceKernels


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

# What backend="auto" tries, fastest first, per device type. On CUDA, "triton" comes first: no
# GPU measurement of the two fused CUDA backends exists yet (benchmarks/gpu_check.sh takes it),
# and by their compiled code (register use, instruction mix) the Triton kernels are expected to
# be the faster; reorder here, next to the figures, once the GPU benchmark has them.
_AUTO_ORDER = {
    "cpu": ("cpp", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}
_warned_fallback: set[str] = set()

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


def _warn_fallback(device_type: str, reasons: dict[str, str]) -> None:
    """Once per device type: "auto" runs the reference where a fused backend could have run."""
    if device_type in _warned_fallback or not reasons:
        return
    _warned_fallback.add(device_type)
    why = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
    warnings.warn(
        f"icl_msr_kernels: backend='auto' falls back to the pure-PyTorch reference on "
        f"{device_type} tensors, which builds the 2N x 2N similarity matrix (memory grows as N^2 "
        f"and runs out at large batches). No fused backend is usable: {why}",
        RuntimeWarning, stacklevel=4)


def resolve_backend(name: str, device: torch.device) -> Kernels:
    """The kernels for `name` on `device`; "auto" picks the fastest available one."""
    device_type = device.type
    if name == "auto":
        reasons: dict[str, str] = {}
        for candidate in _AUTO_ORDER.get(device_type, ("reference",)):
            if candidate == "reference":
                break
            reason = _device_reason(candidate, device_type)
            if reason is not None:
                continue  # not meant for this device in this process (e.g. triton on the CPU)
            try:
                return load_backend(candidate)
            except BackendUnavailable as err:
                reasons[candidate] = str(err)
        _warn_fallback(device_type, reasons)
        return load_backend("reference")
    try:
        kernels = load_backend(name)
    except BackendUnavailable as err:
        raise BackendUnavailable(f"backend {name!r} is not available: {err}") from None
    reason = _device_reason(name, device_type)
    if reason is not None:
        raise BackendUnavailable(reason)
    return kernels
