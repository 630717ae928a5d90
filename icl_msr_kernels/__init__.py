"""icl_msr_kernels: fused ICL-MSR and NT-Xent contrastive losses for PyTorch.

Public API: `icl_msr_loss`, `ntxent_loss`, `ICLMSRLoss`, `NTXentLoss`, `available_backends`,
`backend_status`. The math is in `reference`, the dispatch in `backends`.
"""

from .backends import BackendUnavailable, available_backends, backend_status
from .loss import icl_msr_loss, ntxent_loss
from .modules import ICLMSRLoss, NTXentLoss

__all__ = [
    "icl_msr_loss",
    "ntxent_loss",
    "ICLMSRLoss",
    "NTXentLoss",
    "available_backends",
    "backend_status",
    "BackendUnavailable",
]
__version__ = "0.1.0"
