// Registers the CUDA kernels of the icl_msr ops (csrc/ops.cpp) for the CUDA dispatch key. The
// schemas, autograd and fake implementations are shared with the CPU backend, so the dispatcher
// alone picks the device: backend "cuda" is these kernels on CUDA tensors.
//
// Which of "cuda" and "triton" backend="auto" tries first on CUDA tensors is decided in
// icl_msr_kernels/backends.py (_AUTO_ORDER), next to the measurement that justifies it.
#include <torch/library.h>

#include "cuda/ops_cuda.h"

TORCH_LIBRARY_IMPL(icl_msr, CUDA, m) {
  m.impl("attention_forward", &icl_msr::cuda::attention_forward);
  m.impl("attention_backward", &icl_msr::cuda::attention_backward);
  m.impl("contrastive_forward", &icl_msr::cuda::contrastive_forward);
  m.impl("contrastive_backward", &icl_msr::cuda::contrastive_backward);
  m.impl("contrastive_pairs_forward", &icl_msr::cuda::contrastive_pairs_forward);
  m.impl("contrastive_pairs_backward", &icl_msr::cuda::contrastive_pairs_backward);
}
