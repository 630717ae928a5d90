"""icl_msr_kernels: fused ICL-MSR and NT-Xent contrastive losses for PyTorch.

Public API: `icl_msr_loss`, `icl_msr_regularizer`, `ntxent_loss`, `ICLMSRLoss`,
`ICLMSRRegularizer`, `NTXentLoss` (and its `MemoryBank`), `available_backends`, `backend_status`.
The math is docs/math.md and `reference`, the dispatch `backends`, the kernels `kernels/`.
"""

from .backends import available_backends, backend_status
from .kernels.interface import BackendUnavailable
from .loss import icl_msr_loss, icl_msr_regularizer, ntxent_loss
from .modules import ICLMSRLoss, ICLMSRRegularizer, MemoryBank, NTXentLoss

__all__ = [
    "icl_msr_loss",
    "ntxent_loss",
    "icl_msr_regularizer",
    "ICLMSRLoss",
    "NTXentLoss",
    "ICLMSRRegularizer",
    "MemoryBank",
    "available_backends",
    "backend_status",
    "BackendUnavailable",
]
from ._version import __version__
