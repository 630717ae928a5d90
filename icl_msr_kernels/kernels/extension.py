"""Backends "cpp" and "cuda": the ops of the icl_msr torch extension (csrc/).

The extension ``icl_msr_kernels._C`` defines the four ops of `kernels.ops` in the ``icl_msr``
namespace (schemas in csrc/ops.cpp) with CPU kernels (csrc/cpu) and, when built with CUDA, CUDA
kernels (csrc/cuda). This module loads it and registers, once and for every device, the Python
halves of the ops (`kernels.ops`: fake tensors, autograd), so that ``torch.compile(
fullgraph=True)`` traces through them; csrc/ops.cpp names this module as the ops' Python module,
so that where only the library is loaded, torch's error says which module to import for them.
The dispatcher picks the device kernel, so the "cpp" and "cuda" backends are one `OpKernels`
under two names.
"""

from __future__ import annotations

import importlib.util

import torch

from . import ops
from .interface import BackendUnavailable

NAMESPACE = "icl_msr"
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _register() -> None:
    """Loads the extension library and registers the ops' fake and autograd halves.

    Raises BackendUnavailable when the library is not built or does not load.
    """
    spec = importlib.util.find_spec("icl_msr_kernels._C")
    if spec is None or spec.origin is None:
        raise BackendUnavailable(
            "the C++ extension icl_msr_kernels._C is not built (run `pip install "
            "--no-build-isolation -e .` in the repository, with a C++ compiler and ninja)")
    try:
        torch.ops.load_library(spec.origin)
    except OSError as err:
        raise BackendUnavailable(f"the C++ extension {spec.origin} does not load: {err}") from None
    missing = [op for op in ops.OP_NAMES if not hasattr(torch.ops.icl_msr, op)]
    if missing:
        raise BackendUnavailable(f"the C++ extension {spec.origin} does not define the ops "
                                 f"{missing}; rebuild it")
    for op, fake in ops.FAKES.items():
        if hasattr(torch.ops.icl_msr, op):  # the pair ops are optional
            torch.library.register_fake(f"{NAMESPACE}::{op}", fake)
    ops.register_autograd(NAMESPACE, "cpp/cuda")


def _kernels_missing(device_type: str) -> str | None:
    """Why the ops cannot run on `device_type` tensors in this process, or None if they can."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False in this process"
    key = _DISPATCH_KEYS[device_type]
    missing = [op for op in ops.OP_NAMES
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key)]
    if not missing:
        return None
    how = ("with nvcc found (CUDA_HOME) and ICL_MSR_NO_CUDA unset" if device_type == "cuda"
           else "from a checkout with csrc/cpu")
    return f"the C++ extension was built without {key} kernels for {missing}; rebuild it {how}"


def _availability() -> dict[str, str | None]:
    """Device type -> None when the ops run on it in this process, else why not."""
    try:
        _register()
    except BackendUnavailable as err:
        return {device_type: str(err) for device_type in _DISPATCH_KEYS}
    return {device_type: _kernels_missing(device_type) for device_type in _DISPATCH_KEYS}


# Loaded and registered once, when this module is first imported: `load` may then be called from
# code that torch.compile traces (the first loss call can be inside a compiled function), and
# only reads these.
_UNAVAILABLE = _availability()
_KERNELS = {"cpu": ops.OpKernels("cpp", NAMESPACE, rows_forward=True),
            "cuda": ops.OpKernels("cuda", NAMESPACE)}


def load(device_type: str) -> ops.OpKernels:
    """The kernels for `device_type` ("cpu": backend "cpp", "cuda": backend "cuda").

    Raises BackendUnavailable saying why they cannot run in this process.
    """
    reason = _UNAVAILABLE[device_type]
    if reason is not None:
        raise BackendUnavailable(reason)
    return _KERNELS[device_type]
