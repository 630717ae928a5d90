// Operator schemas of the icl_msr namespace: the op surface every fused backend shares (the
// Triton backend registers the same schemas in the icl_msr_triton namespace). What each op
// computes is documented in icl_msr_kernels/kernels/ops.py, which also holds the ops' autograd and
// fake (meta) implementations; the kernels are registered per device in csrc/cpu and csrc/cuda.
#include <torch/library.h>

TORCH_LIBRARY(icl_msr, m) {
  // torch imports this module when it needs the ops' Python halves (fake tensors, autograd).
  m.set_python_module("icl_msr_kernels.kernels.extension");
  // Prototype attention: C = W P and the row log-sum-exps of the weights.
  m.def("attention_forward(Tensor x, Tensor prototypes, Tensor log_prior, "
        "float inv_attn_temperature, str prior_mode) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_c, Tensor x, Tensor prototypes, Tensor log_prior, "
        "Tensor c, Tensor row_lse, float inv_attn_temperature, str prior_mode) "
        "-> (Tensor, Tensor, Tensor)");
  // Both NT-Xent terms over features pre-scaled by 1/sqrt(tau): losses (2,) and row_lse (2, B).
  // symmetric: sweep each unordered pair of row blocks once where the kernels can (one process;
  // the CPU kernels always do).
  m.def("contrastive_forward(Tensor a, Tensor? b, Tensor? a_cols, Tensor? b_cols, "
        "Tensor? positive_logits, int row_offset, str combine, bool symmetric=False) "
        "-> (Tensor, Tensor)");
  // column_grads False: the columns' gradients are not wanted (a constant memory bank), and the
  // column sweep that makes them is skipped (they come back empty).
  m.def("contrastive_backward(Tensor grad_losses, Tensor a, Tensor? b, Tensor? a_cols, "
        "Tensor? b_cols, Tensor? positive_logits, Tensor row_lse, int row_offset, str combine, "
        "bool column_grads, bool symmetric=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // Memory-bank mode: the forward also returns each row's gradient sums (a_rows (1 or 2, B, D)
  // per term, b_rows (B, Db)); the backward scales them by the upstream gradients and, with
  // column_grads, sweeps the columns for theirs. CPU only.
  m.def("contrastive_rows_forward(Tensor a, Tensor? b, Tensor a_cols, Tensor? b_cols, "
        "Tensor positive_logits, str combine) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("contrastive_rows_backward(Tensor grad_losses, Tensor a_rows, Tensor b_rows, Tensor a, "
        "Tensor? b, Tensor a_cols, Tensor? b_cols, Tensor positive_logits, Tensor row_lse, "
        "str combine, bool column_grads) -> (Tensor, Tensor, Tensor, Tensor)");
  // The split distributed sweep: the listed block pairs of M rows (every rank's, in groups of
  // group_rows), each tile once. Forward: the (max, sum of exp) (2, M) of every row's negatives
  // over those tiles. Backward: their share of the gradient rows (M, D), (M, Db) for per-row
  // scales (2, M) and full log-sum-exps (2, M). Not differentiable themselves.
  m.def("contrastive_pairs_forward(Tensor a, Tensor? b, Tensor block_starts, Tensor pairs, "
        "int group_rows, str combine) -> (Tensor, Tensor)");
  m.def("contrastive_pairs_backward(Tensor a, Tensor? b, Tensor block_starts, Tensor pairs, "
        "Tensor row_lse, Tensor row_scale, int group_rows, str combine) -> (Tensor, Tensor)");
}
