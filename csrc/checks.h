// Argument checks of the icl_msr ops, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels
// so that bad input reads the same on either device. Each message names the argument, what was
// expected and what came. Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "tile_math.h"

namespace icl_msr {

// docs/math.md §4: float64 inputs accumulate in float64, every other floating dtype in float32.
inline at::ScalarType accum_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// A float64/32/16 or bfloat16 tensor of `dim` dimensions on `device` (the op's first input's).
inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim,
                         const at::Device& device) {
  TORCH_CHECK(t.device() == device, name, " must be on ", device,
              " like the op's other inputs, got ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              name, " must be float64, float32, float16 or bfloat16, got ", dtype);
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& like,
                             const char* like_name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have the dtype of ", like_name,
              " (", like.scalar_type(), "), got ", t.scalar_type());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t size,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == size, name, " must have ", size, " ", what, " (dimension ", dim,
              "), got shape ", t.sizes());
}

// The ops take their modes by name, as the Python API does.
inline PriorMode parse_prior_mode(c10::string_view prior_mode) {
  if (prior_mode == "logit") return kPriorLogit;
  if (prior_mode == "mult") return kPriorMult;
  TORCH_CHECK(false, "prior_mode must be \"logit\" or \"mult\", got \"", prior_mode, "\"");
}

inline Combine parse_combine(c10::string_view combine) {
  if (combine == "none") return kCombineNone;
  if (combine == "concat") return kCombineConcat;
  if (combine == "add") return kCombineAdd;
  TORCH_CHECK(false, "combine must be \"none\", \"concat\" or \"add\", got \"", combine, "\"");
}

// attention_forward / attention_backward: x (B, D), prototypes (K >= 1, D), log_prior (K,).
inline PriorMode check_attention_args(const at::Tensor& x, const at::Tensor& prototypes,
                                      const at::Tensor& log_prior, double inv_attn_temperature,
                                      c10::string_view prior_mode) {
  check_tensor(x, "x", 2, x.device());
  check_tensor(prototypes, "prototypes", 2, x.device());
  check_same_dtype(prototypes, "prototypes", x, "x");
  check_size(prototypes, "prototypes", 1, x.size(1), "features, as x");
  TORCH_CHECK(prototypes.size(0) >= 1, "prototypes must have at least one row, got shape ",
              prototypes.sizes());
  check_tensor(log_prior, "log_prior", 1, x.device());
  check_size(log_prior, "log_prior", 0, prototypes.size(0), "entries, one per prototype");
  TORCH_CHECK(std::isfinite(inv_attn_temperature) && inv_attn_temperature > 0,
              "inv_attn_temperature must be finite and > 0, got ", inv_attn_temperature);
  return parse_prior_mode(prior_mode);
}

// The extra inputs of attention_backward: grad_c and c like x, row_lse (B,).
inline void check_attention_backward_args(const at::Tensor& grad_c, const at::Tensor& c,
                                          const at::Tensor& row_lse, const at::Tensor& x) {
  for (const auto& [t, name] : {std::pair{&grad_c, "grad_c"}, std::pair{&c, "c"}}) {
    check_tensor(*t, name, 2, x.device());
    check_size(*t, name, 0, x.size(0), "rows, as x");
    check_size(*t, name, 1, x.size(1), "features, as x");
  }
  check_tensor(row_lse, "row_lse", 1, x.device());
  check_size(row_lse, "row_lse", 0, x.size(0), "entries, one per row of x");
}

// What the contrastive ops' arguments describe, once checked.
struct ContrastiveShape {
  int64_t rows;            // B local rows
  int64_t cols;            // M columns: B when they are the rows, else the given columns
  bool square;             // columns are the rows (a_cols None)
  bool uses_b;             // an interventional term (combine != "none")
  bool explicit_positive;  // positive_logits given: every column is a negative (memory bank)
  Combine combine;
};

// contrastive_forward / contrastive_backward: a (B, D), b (B, Db) unless combine is "none",
// a_cols (M, D) and b_cols (M, Db) or neither, row_offset placing the rows among the columns.
// Without positive_logits the rows are the two views stacked (B even) and hold each other's
// positives; with positive_logits (2, B) the columns must be given and are all negatives.
inline ContrastiveShape check_contrastive_args(const at::Tensor& a,
                                               const std::optional<at::Tensor>& b,
                                               const std::optional<at::Tensor>& a_cols,
                                               const std::optional<at::Tensor>& b_cols,
                                               const std::optional<at::Tensor>& positive_logits,
                                               int64_t row_offset, c10::string_view combine) {
  const Combine mode = parse_combine(combine);
  check_tensor(a, "a", 2, a.device());
  const int64_t rows = a.size(0);
  const bool explicit_positive = positive_logits.has_value();
  if (explicit_positive) {
    TORCH_CHECK(rows >= 1, "a must have at least one row, got shape ", a.sizes());
    TORCH_CHECK(a_cols.has_value(),
                "a_cols must be given with positive_logits (the columns are the negatives)");
    TORCH_CHECK(row_offset == 0, "row_offset must be 0 with positive_logits, got ", row_offset);
    check_tensor(*positive_logits, "positive_logits", 2, a.device());
    check_size(*positive_logits, "positive_logits", 0, 2, "rows (base, interventional)");
    check_size(*positive_logits, "positive_logits", 1, rows, "columns, one per row of a");
  } else {
    TORCH_CHECK(rows >= 2 && rows % 2 == 0,
                "a must have a positive, even number of rows (the two views stacked), got shape ",
                a.sizes());
  }
  ContrastiveShape shape{rows, rows, !a_cols.has_value(), mode != kCombineNone,
                         explicit_positive, mode};
  if (shape.uses_b) {
    TORCH_CHECK(b.has_value(), "b must be given when combine is \"", combine, "\"");
    check_tensor(*b, "b", 2, a.device());
    check_same_dtype(*b, "b", a, "a");
    check_size(*b, "b", 0, rows, "rows, as a");
  }
  if (shape.square) {
    TORCH_CHECK(!b_cols.has_value(), "b_cols must be None when a_cols is None");
    TORCH_CHECK(row_offset == 0,
                "row_offset must be 0 when the columns are the rows (a_cols None), got ",
                row_offset);
    return shape;
  }
  check_tensor(*a_cols, "a_cols", 2, a.device());
  check_same_dtype(*a_cols, "a_cols", a, "a");
  check_size(*a_cols, "a_cols", 1, a.size(1), "features, as a");
  shape.cols = a_cols->size(0);
  TORCH_CHECK(shape.cols >= 1, "a_cols must have at least one row, got shape ", a_cols->sizes());
  TORCH_CHECK(explicit_positive || (row_offset >= 0 && row_offset + rows <= shape.cols),
              "row_offset must place the ", rows, " rows of a inside the ", shape.cols,
              " rows of a_cols, got row_offset ", row_offset);
  if (shape.uses_b) {
    TORCH_CHECK(b_cols.has_value(), "b_cols must be given when a_cols is and combine is \"",
                combine, "\"");
    check_tensor(*b_cols, "b_cols", 2, a.device());
    check_same_dtype(*b_cols, "b_cols", a, "a");
    check_size(*b_cols, "b_cols", 0, shape.cols, "rows, as a_cols");
    check_size(*b_cols, "b_cols", 1, b->size(1), "features, as b");
  }
  return shape;
}

// What the pair ops' arguments describe, once checked: M rows in groups of group_rows, the
// blocks [starts[k], starts[k+1]) and the listed block pairs, cut into rounds (each round's
// [begin, end) in the pair list, which holds (round, i, j) rows sorted by round).
struct PairsShape {
  int64_t rows;
  int64_t group_rows;
  bool uses_b;
  Combine combine;
  std::vector<int64_t> starts;
  std::vector<std::pair<int64_t, int64_t>> pairs;        // (i, j), i <= j
  std::vector<std::pair<int64_t, int64_t>> round_spans;  // [begin, end) in `pairs`
};

// contrastive_pairs_forward / _backward: a (M, D), b (M, Db) unless combine is "none";
// block_starts (nb + 1,) and pairs (P, 3) int64 CPU tensors (the schedule, read by the host).
inline PairsShape check_pairs_args(const at::Tensor& a, const std::optional<at::Tensor>& b,
                                   const at::Tensor& block_starts, const at::Tensor& pairs,
                                   int64_t group_rows, c10::string_view combine) {
  PairsShape shape;
  shape.combine = parse_combine(combine);
  shape.uses_b = shape.combine != kCombineNone;
  check_tensor(a, "a", 2, a.device());
  shape.rows = a.size(0);
  shape.group_rows = group_rows;
  TORCH_CHECK(group_rows >= 2 && group_rows % 2 == 0 && shape.rows % group_rows == 0,
              "group_rows must be even and divide the ", shape.rows, " rows of a (each rank's "
              "two views), got ", group_rows);
  if (shape.uses_b) {
    TORCH_CHECK(b.has_value(), "b must be given when combine is \"", combine, "\"");
    check_tensor(*b, "b", 2, a.device());
    check_same_dtype(*b, "b", a, "a");
    check_size(*b, "b", 0, shape.rows, "rows, as a");
  }
  for (const auto& [t, name] : {std::pair{&block_starts, "block_starts"},
                                std::pair{&pairs, "pairs"}}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong, name,
                " must be an int64 CPU tensor (the schedule the host reads), got a ",
                t->scalar_type(), " tensor on ", t->device());
  }
  TORCH_CHECK(block_starts.dim() == 1 && block_starts.size(0) >= 2,
              "block_starts must be 1-D with at least 2 entries, got shape ", block_starts.sizes());
  const at::Tensor starts = block_starts.contiguous();
  shape.starts.assign(starts.data_ptr<int64_t>(), starts.data_ptr<int64_t>() + starts.numel());
  const int64_t blocks = static_cast<int64_t>(shape.starts.size()) - 1;
  TORCH_CHECK(shape.starts.front() == 0 && shape.starts.back() == shape.rows &&
                  std::is_sorted(shape.starts.begin(), shape.starts.end()),
              "block_starts must rise from 0 to the ", shape.rows, " rows of a");
  TORCH_CHECK(pairs.dim() == 2 && pairs.size(1) == 3,
              "pairs must have shape (P, 3) (round, i, j), got ", pairs.sizes());
  const at::Tensor list = pairs.contiguous();
  const int64_t* p = list.data_ptr<int64_t>();
  for (int64_t k = 0; k < list.size(0); ++k) {
    const int64_t round = p[3 * k], i = p[3 * k + 1], j = p[3 * k + 2];
    TORCH_CHECK(0 <= i && i <= j && j < blocks, "pairs row ", k, " must hold blocks 0 <= i <= j < ",
                blocks, ", got (", i, ", ", j, ")");
    if (k == 0 || round != p[3 * (k - 1)]) {
      TORCH_CHECK(k == 0 || round > p[3 * (k - 1)], "pairs must be sorted by round");
      shape.round_spans.emplace_back(k, k);
    }
    shape.round_spans.back().second = k + 1;
    shape.pairs.emplace_back(i, j);
  }
  return shape;
}

// The extra inputs of contrastive_backward: grad_losses (2,) and row_lse (2, B).
inline void check_contrastive_backward_args(const at::Tensor& grad_losses,
                                            const at::Tensor& row_lse, const at::Tensor& a) {
  check_tensor(grad_losses, "grad_losses", 1, a.device());
  check_size(grad_losses, "grad_losses", 0, 2, "entries (L_base, L_int)");
  check_tensor(row_lse, "row_lse", 2, a.device());
  check_size(row_lse, "row_lse", 0, 2, "rows (one per term)");
  check_size(row_lse, "row_lse", 1, a.size(0), "columns, one per row of a");
}

}  // namespace icl_msr
