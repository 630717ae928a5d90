// Tile math shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels: the roles of the columns,
// the online log-sum-exp update and the NT-Xent gradient coefficient. Written once so that the
// CPU tests exercise exactly what the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define ICL_MSR_HD __host__ __device__ __forceinline__
#else
#define ICL_MSR_HD inline
#endif

namespace icl_msr {

// How the interventional logits are formed from the features (a, b) of a row and a column,
// matching `combine` of the contrastive ops: no interventional term (plain NT-Xent),
// "concat": a·a' + b·b', "add": b·b' (b = rownorm(x + gamma c) / sqrt(tau) built in Python).
enum Combine : int64_t { kCombineNone = 0, kCombineConcat = 1, kCombineAdd = 2 };

// How the prior enters the prototype attention, matching `prior_mode`. In both modes the
// weights are W = exp(E + log_prior - row_lse); row_lse is the log-sum-exp of E + log_prior
// ("logit") or of E alone ("mult").
enum PriorMode : int64_t { kPriorLogit = 0, kPriorMult = 1 };

// Local row `row` of `rows` (the two views stacked) sits in global column row_offset + row;
// its positive is the same sample in the other view.
ICL_MSR_HD int64_t self_column(int64_t row, int64_t row_offset) { return row_offset + row; }
ICL_MSR_HD int64_t positive_column(int64_t row, int64_t rows, int64_t row_offset) {
  return row_offset + (row + rows / 2) % rows;
}
// The same when the rows come in groups of group_rows, each a rank's two views stacked (the
// split distributed sweep): row g's positive is the other view of its sample, in its group.
ICL_MSR_HD int64_t group_positive(int64_t row, int64_t group_rows) {
  return row / group_rows * group_rows + positive_column(row % group_rows, group_rows, 0);
}

ICL_MSR_HD float fast_exp(float v) {
#if defined(__CUDA_ARCH__)
  return __expf(v);
#else
  return std::exp(v);
#endif
}
ICL_MSR_HD double fast_exp(double v) { return exp(v); }
ICL_MSR_HD float fast_log(float v) { return logf(v); }
ICL_MSR_HD double fast_log(double v) { return log(v); }

template <typename T>
ICL_MSR_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Running (max, sum of exp(v - max)) of a row, merged with a block's (max, sum). A block with
// max -inf (all masked) leaves it unchanged; the first block replaces the initial (-inf, 0).
template <typename T>
ICL_MSR_HD void lse_merge(T& run_max, T& run_sum, T block_max, T block_sum) {
  if (block_max == neg_inf<T>()) return;
  if (block_max > run_max) {
    run_sum = run_sum * fast_exp(run_max - block_max) + block_sum;
    run_max = block_max;
  } else {
    run_sum += block_sum * fast_exp(block_max - run_max);
  }
}

template <typename T>
ICL_MSR_HD T lse_finish(T run_max, T run_sum) {
  return run_max + fast_log(run_sum);
}

// log(1 + exp(v)) without overflow; exactly 0 at v = -inf, NaN stays NaN.
template <typename T>
ICL_MSR_HD T softplus(T v) {
  return v > T(0) ? v + log1p(exp(-v)) : log1p(exp(v));
}

// A row's NT-Xent term from the log-sum-exp of its negatives and its positive logit:
// lse - positive = log(1 + exp(negatives_lse - positive)). Written this way it is >= 0 and exactly
// 0 when the row has no negative (negatives_lse = -inf), whatever the rounding of the sums.
template <typename T>
ICL_MSR_HD T ntxent_row_term(T negatives_lse, T positive) {
  return softplus(negatives_lse - positive);
}

// d(mean over `rows` anchors of NT-Xent)/d(logit) for one (anchor, column) pair:
// (softmax probability - [column is the positive]) / rows. The self column has coefficient 0.
template <typename T>
ICL_MSR_HD T ntxent_grad_coef(T logit, T row_lse, bool is_positive, T inv_rows) {
  return (fast_exp(logit - row_lse) - (is_positive ? T(1) : T(0))) * inv_rows;
}

}  // namespace icl_msr

namespace icl_msr {

// Prototype attention (docs/math.md §2 steps 4-6) of one (row a, prototype k) pair, E = x_a·P_k / tau_a:
// the weight W = exp(E + log_prior_k - row_lse_a) that both prior modes use (see PriorMode).
template <typename T>
ICL_MSR_HD T attention_weight(T score, T log_prior, T row_lse) {
  return fast_exp(score + log_prior - row_lse);
}

// dL/dE of one pair, from its weight, dweight = dC_a·P_k and delta = <dC_a, C_a> (docs/math.md §3):
// "logit": W (dweight - delta); "mult": W dweight - S delta with S = exp(E - row_lse), the
// attention before the prior multiplies it in.
template <typename T>
ICL_MSR_HD T attention_score_grad(T score, T weight, T dweight, T row_lse, T delta,
                                  int64_t prior_mode) {
  if (prior_mode == kPriorLogit) return weight * (dweight - delta);
  return weight * dweight - fast_exp(score - row_lse) * delta;
}

// The pair's contribution to dL/dlog_prior_k: dL/dE itself in "logit" mode (the prior is added
// to E), W dweight in "mult" mode (the prior multiplies the weights after the softmax).
template <typename T>
ICL_MSR_HD T attention_prior_grad(T score_grad, T weight, T dweight, int64_t prior_mode) {
  return prior_mode == kPriorLogit ? score_grad : weight * dweight;
}

}  // namespace icl_msr
