// Prototype attention on the CPU: icl_msr::attention_forward / attention_backward (docs/math.md
// §2 steps 4-6 and §3; schemas in csrc/ops.cpp).
//
// A flash-attention with the rows of x as queries and the K prototypes as keys and values, over
// row blocks that each hold their (rows x K) scores (K is at most a few thousand): one BLAS
// product for the scores, one pass for the softmax with the prior, one product for C = W P.
// The backward recomputes the weights from the saved row log-sum-exps and uses
// dE = W (dC·P - <dC, C>) (tile_math.h). The prototype and prior gradients are sums over all
// rows: each task adds up those of a fixed group of row blocks, and the groups' partial sums are
// added in group order, so that the result does not depend on the thread count (which a BLAS
// product over all rows, or an ATen reduction, would let change its summation order). The
// per-entry math is tile_math.h's, shared with the CUDA kernels.
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "cpu/cpu_common.h"
#include "tile_math.h"

namespace icl_msr::cpu {
namespace {

// The checked operands in the accumulation dtype.
struct Attention {
  at::Tensor x, prototypes, log_prior;
  int64_t rows = 0, num_prototypes = 0;
  PriorMode mode = kPriorLogit;
  double inv_temperature = 1.0;

  // Row blocks of about 64K score entries (256 KB in float32), 16 to 256 rows each.
  Blocks blocks() const {
    const int64_t block_rows = std::clamp<int64_t>((int64_t{1} << 16) / num_prototypes, 16, 256);
    return Blocks(rows, (rows + block_rows - 1) / block_rows);
  }
};

Attention prepare(const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& log_prior,
                  double inv_attn_temperature, c10::string_view prior_mode) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernels, got one on ",
              x.device());
  const PriorMode mode =
      check_attention_args(x, prototypes, log_prior, inv_attn_temperature, prior_mode);
  const auto acc = accum_dtype(x.scalar_type());
  return {to_acc(x, acc),        to_acc(prototypes, acc),
          to_acc(log_prior, acc), x.size(0),
          prototypes.size(0),    mode,
          inv_attn_temperature};
}

template <typename T>
void forward_impl(const Attention& p, at::Tensor& c, T* row_lse) {
  const Blocks blocks = p.blocks();
  const int64_t k_count = p.num_prototypes;
  ThreadScratch scratch(blocks.max_size() * k_count, p.x.scalar_type());
  const T* log_prior = p.log_prior.data_ptr<T>();
  const T inv_t = static_cast<T>(p.inv_temperature);
  // "logit": the softmax runs over E + log pi; "mult": over E alone, the prior multiplying the
  // weights afterwards. attention_weight covers both given the matching row_lse.
  const bool prior_in_softmax = p.mode == kPriorLogit;
  parallel_tasks(blocks.count(), [&](int64_t i) {
    const Block bi = blocks[i];
    at::Tensor weights = matrix(scratch.get(), 0, bi.size, k_count);
    at::mm_out(weights, p.x.narrow(0, bi.begin, bi.size), p.prototypes.t());
    for (int64_t r = 0; r < bi.size; ++r) {
      T* row = weights.data_ptr<T>() + r * k_count;  // x_a·P_k, then E, then W
      T m = neg_inf<T>();
      for (int64_t k = 0; k < k_count; ++k) {
        row[k] *= inv_t;
        m = std::max(m, row[k] + (prior_in_softmax ? log_prior[k] : T(0)));
      }
      T sum = 0;
      for (int64_t k = 0; k < k_count; ++k) {
        sum += fast_exp(row[k] + (prior_in_softmax ? log_prior[k] : T(0)) - m);
      }
      const T lse = lse_finish(m, sum);
      row_lse[bi.begin + r] = lse;
      for (int64_t k = 0; k < k_count; ++k) row[k] = attention_weight(row[k], log_prior[k], lse);
    }
    at::Tensor c_i = c.narrow(0, bi.begin, bi.size);
    at::mm_out(c_i, weights, p.prototypes);
  });
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& x,
                                                     const at::Tensor& prototypes,
                                                     const at::Tensor& log_prior,
                                                     double inv_attn_temperature,
                                                     c10::string_view prior_mode) {
  const Attention p = prepare(x, prototypes, log_prior, inv_attn_temperature, prior_mode);
  at::Tensor c = at::empty_like(p.x);
  at::Tensor row_lse = at::empty({p.rows}, p.x.options());
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "icl_msr::attention_forward", [&] {
    forward_impl<scalar_t>(p, c, row_lse.data_ptr<scalar_t>());
  });
  return {like_input(c, x), row_lse};
}

// One row block of the backward: its rows of W and dS (dL/d(x_a·P_k)) into weights and
// score_grads, its rows of grad_x, and its terms of dL/dlog_prior added to prior_partial.
template <typename T>
void backward_block(const Attention& p, Block bi, const at::Tensor& grad_c, const at::Tensor& c,
                    const T* row_lse, at::Tensor& weights, at::Tensor& score_grads,
                    at::Tensor& grad_x, T* prior_partial) {
  const int64_t k_count = p.num_prototypes, dim = p.x.size(1);
  const T* log_prior = p.log_prior.data_ptr<T>();
  const T inv_t = static_cast<T>(p.inv_temperature);
  at::Tensor w = weights.narrow(0, bi.begin, bi.size);
  at::Tensor ds = score_grads.narrow(0, bi.begin, bi.size);
  const at::Tensor grad_c_i = grad_c.narrow(0, bi.begin, bi.size);
  at::mm_out(w, p.x.narrow(0, bi.begin, bi.size), p.prototypes.t());  // x_a·P_k
  at::mm_out(ds, grad_c_i, p.prototypes.t());                           // dW = dC_a·P_k
  for (int64_t r = 0; r < bi.size; ++r) {
    const int64_t a = bi.begin + r;
    const T* dc_row = grad_c.data_ptr<T>() + a * dim;
    const T* c_row = c.data_ptr<T>() + a * dim;
    T delta = 0;  // <dC_a, C_a> = sum_k W_ak dW_ak (the flash-attention identity)
    for (int64_t d = 0; d < dim; ++d) delta += dc_row[d] * c_row[d];
    T* w_row = w.data_ptr<T>() + r * k_count;
    T* ds_row = ds.data_ptr<T>() + r * k_count;
    for (int64_t k = 0; k < k_count; ++k) {
      const T score = w_row[k] * inv_t, dweight = ds_row[k];
      const T weight = attention_weight(score, log_prior[k], row_lse[a]);
      const T score_grad =
          attention_score_grad(score, weight, dweight, row_lse[a], delta, int64_t{p.mode});
      prior_partial[k] += attention_prior_grad(score_grad, weight, dweight, int64_t{p.mode});
      w_row[k] = weight;
      ds_row[k] = score_grad * inv_t;
    }
  }
  at::Tensor grad_x_i = grad_x.narrow(0, bi.begin, bi.size);
  at::mm_out(grad_x_i, ds, p.prototypes);
}

// The backward's reduction groups: consecutive row blocks (Blocks over block indices), one task
// each. Their partial prototype gradients (groups x K x D) take no more memory than W itself
// (rows x K): at most rows / D groups.
Blocks reduction_groups(const Attention& p, const Blocks& blocks) {
  const int64_t dim = std::max<int64_t>(1, p.x.size(1));
  return Blocks(blocks.count(), std::max<int64_t>(1, p.rows / dim));
}

// Rows [begin of block first, end of block last) of t.
at::Tensor group_rows(const at::Tensor& t, const Blocks& blocks, Block group) {
  const int64_t begin = blocks[group.begin].begin;
  return t.narrow(0, begin, blocks[group.end() - 1].end() - begin);
}

template <typename T>
void backward_impl(const Attention& p, const at::Tensor& grad_c, const at::Tensor& c,
                   const T* row_lse, at::Tensor& grad_x, at::Tensor& grad_prototypes,
                   at::Tensor& grad_log_prior) {
  const Blocks blocks = p.blocks();
  const Blocks groups = reduction_groups(p, blocks);
  const int64_t k_count = p.num_prototypes, dim = p.x.size(1);
  at::Tensor weights = at::empty({p.rows, k_count}, p.x.options());       // W
  at::Tensor score_grads = at::empty({p.rows, k_count}, p.x.options());   // dL/d(x_a·P_k)
  // Each group's contributions to dL/dP and dL/dlog_prior.
  at::Tensor prototype_partials = at::empty({groups.count(), k_count, dim}, p.x.options());
  at::Tensor prior_partials = at::zeros({groups.count(), k_count}, p.x.options());
  parallel_tasks(groups.count(), [&](int64_t g) {
    for (int64_t i = groups[g].begin; i < groups[g].end(); ++i) {
      backward_block(p, blocks[i], grad_c, c, row_lse, weights, score_grads, grad_x,
                     prior_partials.data_ptr<T>() + g * k_count);
    }
    // dP_g = dSᵀ x + Wᵀ dC over the group's rows.
    at::Tensor dp = prototype_partials[g];
    at::mm_out(dp, group_rows(score_grads, blocks, groups[g]).t(),
               group_rows(p.x, blocks, groups[g]));
    dp.addmm_(group_rows(weights, blocks, groups[g]).t(), group_rows(grad_c, blocks, groups[g]));
  });
  // The groups' sums in group order (elementwise additions: the same whatever the threads).
  grad_prototypes.copy_(prototype_partials[0]);
  for (int64_t g = 1; g < groups.count(); ++g) grad_prototypes.add_(prototype_partials[g]);
  T* prior = grad_log_prior.data_ptr<T>();
  const T* partials = prior_partials.data_ptr<T>();
  std::copy(partials, partials + k_count, prior);
  for (int64_t g = 1; g < groups.count(); ++g) {
    for (int64_t k = 0; k < k_count; ++k) prior[k] += partials[g * k_count + k];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_c, const at::Tensor& x, const at::Tensor& prototypes,
    const at::Tensor& log_prior, const at::Tensor& c, const at::Tensor& row_lse,
    double inv_attn_temperature, c10::string_view prior_mode) {
  const Attention p = prepare(x, prototypes, log_prior, inv_attn_temperature, prior_mode);
  check_attention_backward_args(grad_c, c, row_lse, x);
  const auto acc = p.x.scalar_type();
  const at::Tensor grad_c_acc = to_acc(grad_c, acc), c_acc = to_acc(c, acc);
  const at::Tensor lse = to_acc(row_lse, acc);
  at::Tensor grad_x = at::empty_like(p.x), grad_prototypes = at::empty_like(p.prototypes);
  at::Tensor grad_log_prior = at::empty_like(p.log_prior);
  AT_DISPATCH_FLOATING_TYPES(acc, "icl_msr::attention_backward", [&] {
    backward_impl<scalar_t>(p, grad_c_acc, c_acc, lse.data_ptr<scalar_t>(), grad_x,
                            grad_prototypes, grad_log_prior);
  });
  return {like_input(grad_x, x), like_input(grad_prototypes, prototypes),
          like_input(grad_log_prior, log_prior)};
}

}  // namespace

TORCH_LIBRARY_IMPL(icl_msr, CPU, m) {
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_backward", &attention_backward);
}

}  // namespace icl_msr::cpu
