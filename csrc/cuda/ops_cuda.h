// The CUDA kernels of the icl_msr ops (schemas in csrc/ops.cpp), registered in register.cpp, and
// their inputs checked (by the checks shared with the CPU kernels, csrc/checks.h) and made
// contiguous at entry.
#pragma once

// The ATen pieces used, not <ATen/ATen.h>: every nvcc pass parses these headers, and the whole
// of ATen takes most of a .cu file's compile time.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/frexp.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

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
    c10::string_view combine, bool symmetric);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_backward(
    const at::Tensor& grad_losses, const at::Tensor& a, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& a_cols, const std::optional<at::Tensor>& b_cols,
    const std::optional<at::Tensor>& positive_logits, const at::Tensor& row_lse,
    int64_t row_offset, c10::string_view combine, bool column_grads, bool symmetric);

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

// Feature rows as the kernels copy them, 16 bytes at a time (tile_kernels.cuh): contiguous, a
// multiple of 16 bytes wide (zero features appended, which add nothing to any product) and
// 16-byte aligned. Copied only when the width or the address asks for it.
inline at::Tensor vector_ready(const at::Tensor& t) {
  const int64_t per_vector = 16 / static_cast<int64_t>(t.element_size());
  const int64_t pad = (per_vector - t.size(1) % per_vector) % per_vector;
  at::Tensor out = t.contiguous();
  if (pad != 0) out = at::constant_pad_nd(out, {0, pad});
  if (reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 != 0) out = out.clone();
  return out;
}

// The first `dim` features of rows computed at a vector_ready width.
inline at::Tensor first_features(const at::Tensor& rows, int64_t dim) {
  return rows.size(-1) == dim ? rows : rows.narrow(-1, 0, dim).contiguous();
}

// The tensors of the attention ops, checked; x and the prototypes vector_ready, of width dim
// (in_dim before the padding).
struct AttentionInputs {
  at::Tensor x, prototypes, log_prior;
  int64_t rows, num_prototypes, dim, in_dim;
  PriorMode prior_mode;
};

inline AttentionInputs check_attention(const at::Tensor& x, const at::Tensor& prototypes,
                                       const at::Tensor& log_prior, double inv_attn_temperature,
                                       c10::string_view prior_mode) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernels, got one on ", x.device());
  const PriorMode mode =
      check_attention_args(x, prototypes, log_prior, inv_attn_temperature, prior_mode);
  const at::Tensor x_ready = vector_ready(x);
  return {x_ready, vector_ready(prototypes), log_prior.contiguous(), x.size(0),
          prototypes.size(0), x_ready.size(1), x.size(1), mode};
}

// The tensors of the contrastive ops, checked, the features vector_ready (of widths dim_a,
// dim_b; in_dim_a, in_dim_b before the padding); b and the columns are undefined tensors when
// absent (b also when combine is "none", which does not read it), and so is positive_logits (in
// the accumulation dtype when given).
struct ContrastiveInputs {
  at::Tensor a, b, a_cols, b_cols, positive_logits;
  int64_t rows, cols, dim_a, dim_b, in_dim_a, in_dim_b;
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
  ContrastiveInputs in{vector_ready(a), {}, {}, {}, {}, shape.rows, shape.cols, 0, 0,
                       a.size(1), 0, !shape.square, shape.combine};
  in.dim_a = in.a.size(1);
  if (shape.explicit_positive)
    in.positive_logits = positive_logits->to(accum_dtype(a.scalar_type())).contiguous();
  if (shape.uses_b) {
    in.b = vector_ready(*b);
    in.dim_b = in.b.size(1);
    in.in_dim_b = b->size(1);
  }
  if (!shape.square) {
    in.a_cols = vector_ready(*a_cols);
    if (shape.uses_b) in.b_cols = vector_ready(*b_cols);
  }
  return in;
}

}  // namespace icl_msr::cuda
