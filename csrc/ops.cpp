// Operator schemas of the icl_msr namespace. The kernels are registered per device in
// csrc/cpu and csrc/cuda; autograd and fake (meta) implementations live in Python
// (icl_msr_kernels/kernels/extension.py).
#include <torch/library.h>

TORCH_LIBRARY(icl_msr, m) {
  // Prototype attention (SPEC steps 4-6): x (B, D) and prototypes (K, D) row-normalised,
  // log_prior (K,). Returns C (B, D) in x's dtype and row_lse (B,) in the accumulation dtype
  // (float64 for float64 inputs, else float32).
  m.def("attention_forward(Tensor x, Tensor prototypes, Tensor log_prior, "
        "float inv_attn_temperature, int prior_mode) -> (Tensor, Tensor)");
  // Gradients of C with respect to x, prototypes and log_prior, each in its input's dtype.
  m.def("attention_backward(Tensor grad_c, Tensor x, Tensor prototypes, Tensor log_prior, "
        "Tensor c, Tensor row_lse, float inv_attn_temperature, int prior_mode) "
        "-> (Tensor, Tensor, Tensor)");
  // Fused NT-Xent of both terms (SPEC steps 7-8) over features pre-scaled by 1/sqrt(tau):
  // B local rows (a, b) against M columns (a_cols, b_cols; None = the rows themselves, row_offset
  // 0). Returns losses (2,) = (L_base, L_int) and row_lse (2, B), both in the accumulation dtype.
  m.def("contrastive_forward(Tensor a, Tensor? b, Tensor? a_cols, Tensor? b_cols, "
        "int row_offset, int int_mode) -> (Tensor, Tensor)");
  // Gradients of grad_losses · losses for a, b, a_cols, b_cols, in their dtypes; a tensor that
  // was None gets an empty (0-element) gradient.
  m.def("contrastive_backward(Tensor grad_losses, Tensor a, Tensor? b, Tensor? a_cols, "
        "Tensor? b_cols, Tensor row_lse, int row_offset, int int_mode) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}
