// The CUDA kernels of the icl_msr ops (schemas in csrc/ops.cpp), registered in register.cu, and
// their inputs checked (by the checks shared with the CPU kernels, csrc/checks.h) and made
// contiguous at entry.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

#include <cmath>
#include <optional>
#include <tuple>

namespace icl_msr::cuda {

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& x,
                                                     const at::Tensor& prototypes,
                                                     const at::Tensor& log_prior,
                                                     double inv_attn_temperature,
                                                     c10::string_view prior_mode);

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_c, const at::Tensor& x, const at::Tensor& prototypes,
    const at::Tensor& log_prior, const at::Tensor& c, const at::Tensor& row_lse,
    double inv_attn_temperature, c10::string_view prior_mode);

std::tuple<at::Tensor, at::Tensor> contrastive_forward(
    const at::Tensor& a, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& a_cols, const std::optional<at::Tensor>& b_cols,
    const std::optional<at::Tensor>& positive_logits, int64_t row_offset,
    c10::string_view combine);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_backward(
    const at::Tensor& grad_losses, const at::Tensor& a, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& a_cols, const std::optional<at::Tensor>& b_cols,
    const std::optional<at::Tensor>& positive_logits, const at::Tensor& row_lse,
    int64_t row_offset, c10::string_view combine, bool column_grads);

std::tuple<at::Tensor, at::Tensor> contrastive_pairs_forward(
    const at::Tensor& a, const std::optional<at::Tensor>& b, const at::Tensor& block_starts,
    const at::Tensor& pairs, int64_t group_rows, c10::string_view combine);

std::tuple<at::Tensor, at::Tensor> contrastive_pairs_backward(
    const at::Tensor& a, const std::optional<at::Tensor>& b, const at::Tensor& block_starts,
    const at::Tensor& pairs, const at::Tensor& row_lse, const at::Tensor& row_scale,
    int64_t group_rows, c10::string_view combine);

// 2^ceil(log2 m) of a 0-d tensor m > 0, exactly: frexp gives m = mant 2^e with mant in [0.5, 1),
// and m / mant = 2^e is exact. The half-precision backwards divide their upstream gradient by it
// before casting down (a loss scaler's 2^16 would overflow float16) and multiply back after:
// exact in every dtype short of underflow, so float32/float64 results are unchanged. Tensor ops
// on the device: reading m on the host would synchronise with the stream.
inline at::Tensor pow2_at_least(const at::Tensor& m) {
  const at::Tensor mant = std::get<0>(at::frexp(m));
  return at::where(mant == 0.5, m, m / mant);
}

// The tensors of the attention ops, checked and made contiguous.
struct AttentionInputs {
  at::Tensor x, prototypes, log_prior;
  int64_t rows, num_prototypes, dim;
  PriorMode prior_mode;
};

inline AttentionInputs check_attention(const at::Tensor& x, const at::Tensor& prototypes,
                                       const at::Tensor& log_prior, double inv_attn_temperature,
                                       c10::string_view prior_mode) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernels, got one on ", x.device());
  const PriorMode mode =
      check_attention_args(x, prototypes, log_prior, inv_attn_temperature, prior_mode);
  return {x.contiguous(), prototypes.contiguous(), log_prior.contiguous(), x.size(0),
          prototypes.size(0), x.size(1), mode};
}

// The tensors of the contrastive ops, checked and made contiguous; b and the columns are
// undefined tensors when absent (b also when combine is "none", which does not read it), and so
// is positive_logits (in the accumulation dtype when given).
struct ContrastiveInputs {
  at::Tensor a, b, a_cols, b_cols, positive_logits;
  int64_t rows, cols, dim_a, dim_b;
  bool has_cols;
  Combine combine;
};

inline ContrastiveInputs check_contrastive(const at::Tensor& a, const std::optional<at::Tensor>& b,
                                           const std::optional<at::Tensor>& a_cols,
                                           const std::optional<at::Tensor>& b_cols,
                                           const std::optional<at::Tensor>& positive_logits,
                                           int64_t row_offset, c10::string_view combine) {
  TORCH_CHECK(a.is_cuda(), "a must be a CUDA tensor for the CUDA kernels, got one on ", a.device());
  const ContrastiveShape shape =
      check_contrastive_args(a, b, a_cols, b_cols, positive_logits, row_offset, combine);
  ContrastiveInputs in{a.contiguous(), {}, {}, {}, {}, shape.rows, shape.cols, a.size(1), 0,
                       !shape.square, shape.combine};
  if (shape.explicit_positive)
    in.positive_logits = positive_logits->to(accum_dtype(a.scalar_type())).contiguous();
  if (shape.uses_b) {
    in.b = b->contiguous();
    in.dim_b = b->size(1);
  }
  if (!shape.square) {
    in.a_cols = a_cols->contiguous();
    if (shape.uses_b) in.b_cols = b_cols->contiguous();
  }
  return in;
}

}  // namespace icl_msr::cuda
