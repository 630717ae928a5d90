// Registers the CUDA kernels of the icl_msr ops (csrc/ops.cpp) for the CUDA dispatch key. The
// schemas, autograd and fake implementations are shared with the CPU backend, so the dispatcher
// alone picks the device: backend "cuda" is these kernels on CUDA tensors.
//
// backend="auto" on CUDA tensors (icl_msr_kernels/backends.py, _AUTO_ORDER) tries "cuda" first,
// then "triton", then "reference". Which of "cuda" and "triton" is faster is for the GPU
// benchmark to decide and is still PENDING MEASUREMENT: these kernels were written and compiled
// (sm_80, sm_90) on a machine without a GPU. "cuda" stays first until then because it is
// available wherever the extension was built with CUDA, with no JIT compilation on first use;
// reorder _AUTO_ORDER once the benchmark has numbers, and record them there.
#include <torch/library.h>

#include "cuda/ops_cuda.h"

TORCH_LIBRARY_IMPL(icl_msr, CUDA, m) {
  m.impl("attention_forward", &icl_msr::cuda::attention_forward);
  m.impl("attention_backward", &icl_msr::cuda::attention_backward);
  m.impl("contrastive_forward", &icl_msr::cuda::contrastive_forward);
  m.impl("contrastive_backward", &icl_msr::cuda::contrastive_backward);
}
