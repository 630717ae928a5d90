// The split distributed sweep on CUDA: icl_msr::contrastive_pairs_forward / _backward (schemas
// in csrc/ops.cpp; docs/math.md §6). The M rows (every rank's, in groups of group_rows: a rank's
// two views) are cut into blocks, and the host launches one kernel per round of the schedule:
// one CTA per block pair (i, j) of the round. No block appears twice in a round, so a CTA may
// read-modify-write the statistics and gradient rows of both its blocks without atomics, and
// every row receives its contributions in the schedule's order: deterministic.
//
// A CTA walks its pair in kTile x kTile sub-tiles (the upper triangle of a diagonal pair), each
// logit tile computed once (tile_kernels.cuh): the forward folds it into the negatives'
// (max, sum) of its rows and, off the diagonal, of its columns; the backward turns it into
// coefficients T = s_r exp(l - lse_r) + s_c exp(l - lse_c) on the negatives and adds T A_cols to
// the rows' gradients and, off the diagonal, Tᵀ A_rows to the columns'.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/ops_cuda.h"
#include "cuda/tile_kernels.cuh"

namespace icl_msr::cuda {
namespace {

// Whether (row, col) of the logits is a negative of row (and so, by symmetry, of col).
__device__ inline bool is_negative(int64_t row, int64_t col, int64_t group_rows) {
  return col != row && col != group_positive(row, group_rows);
}

// Reads a (max, sum) of global statistics, merges (m, s) into it and writes it back.
template <typename A>
__device__ void merge_into(A* run_max, A* run_sum, int64_t index, A m, A s) {
  A old_max = run_max[index], old_sum = run_sum[index];
  lse_merge(old_max, old_sum, m, s);
  run_max[index] = old_max;
  run_sum[index] = old_sum;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) pairs_forward_kernel(
    const T* __restrict__ a, const T* __restrict__ b, int64_t dim_a, int64_t dim_b,
    const int64_t* __restrict__ starts, const int64_t* __restrict__ pairs, int64_t group_rows,
    int64_t combine, accum_t<T>* run_max, accum_t<T>* run_sum, int64_t rows_total) {
  using A = accum_t<T>;
  using L = TileLayout<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const TileSmem<T> sm(smem, L::kSweepBytes);
  const int64_t i = pairs[2 * blockIdx.x], j = pairs[2 * blockIdx.x + 1];
  const int64_t i0 = starts[i], i1 = starts[i + 1], j0 = starts[j], j1 = starts[j + 1];
  const int terms = combine == kCombineNone ? 1 : 2;
  const int p = tile_row();

  for (int64_t r0 = i0; r0 < i1; r0 += kTile) {
    const int64_t row = r0 + p;
    A row_max[2] = {neg_inf<A>(), neg_inf<A>()}, row_sum[2] = {A(0), A(0)};
    for (int64_t c0 = (i == j ? r0 : j0); c0 < j1; c0 += kTile) {
      // Bounded by the blocks' ends: rows and columns past them load as zeros.
      contrastive_logits(sm, a, b, i1, r0, a, b, j1, c0, dim_a, dim_b, combine);
      __syncthreads();
      // Unrolled over both terms, so that the per-term statistics stay in registers.
#pragma unroll
      for (int term = 0; term < 2; ++term) {
        if (term >= terms) break;
        const A* logit = sm.logits[term];
        if (row < i1)
          fold_tile_row(row_max[term], row_sum[term], [&](int q) { return logit[p * L::kLdTile + q]; },
                        [&](int q) { return c0 + q < j1 && is_negative(row, c0 + q, group_rows); });
        if (c0 != r0) {  // the tile's transpose: thread row p now stands for column c0 + p
          const int64_t col = c0 + p;
          A col_max = neg_inf<A>(), col_sum = 0;
          if (col < j1)
            fold_tile_row(col_max, col_sum, [&](int q) { return logit[q * L::kLdTile + p]; },
                          [&](int q) { return r0 + q < i1 && is_negative(col, r0 + q, group_rows); });
          merge_lanes(col_max, col_sum);
          if (col < j1 && tile_lane() == 0)
            merge_into(run_max, run_sum, term * rows_total + col, col_max, col_sum);
        }
      }
      __syncthreads();  // the next tile overwrites the logits; the column statistics are out
    }
#pragma unroll
    for (int term = 0; term < 2; ++term) {
      merge_lanes(row_max[term], row_sum[term]);
      if (term < terms && row < i1 && tile_lane() == 0)
        merge_into(run_max, run_sum, term * rows_total + row, row_max[term], row_sum[term]);
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) pairs_backward_kernel(
    const T* __restrict__ a, const T* __restrict__ b, int64_t dim_a, int64_t dim_b,
    const int64_t* __restrict__ starts, const int64_t* __restrict__ pairs, int64_t group_rows,
    int64_t combine, const accum_t<T>* __restrict__ row_lse,
    const accum_t<T>* __restrict__ row_scale, int64_t rows_total, accum_t<T>* grad_a,
    accum_t<T>* grad_b) {
  using A = accum_t<T>;
  using L = TileLayout<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const TileSmem<T> sm(smem, L::kBytes);
  const int64_t i = pairs[2 * blockIdx.x], j = pairs[2 * blockIdx.x + 1];
  const int64_t i0 = starts[i], i1 = starts[i + 1], j0 = starts[j], j1 = starts[j + 1];
  const int terms = combine == kCombineNone ? 1 : 2;
  const int p = tile_row();

  for (int64_t r0 = i0; r0 < i1; r0 += kTile) {
    const int64_t row = r0 + p;
    for (int64_t c0 = (i == j ? r0 : j0); c0 < j1; c0 += kTile) {
      contrastive_logits(sm, a, b, i1, r0, a, b, j1, c0, dim_a, dim_b, combine);
      __syncthreads();
      // This thread's coefficients, kept to write them transposed afterwards.
      A coef_a[kColsPerLane], coef_b[kColsPerLane];
#pragma unroll
      for (int m = 0; m < kColsPerLane; ++m) {
        const int q = tile_col(m);
        const int64_t col = c0 + q;
        A coef[2] = {A(0), A(0)};
        if (row < i1 && col < j1 && is_negative(row, col, group_rows)) {
#pragma unroll
          for (int term = 0; term < 2; ++term) {
            if (term >= terms) break;
            const A logit = sm.logits[term][p * L::kLdTile + q];
            const A* lse = row_lse + term * rows_total;
            const A* scale = row_scale + term * rows_total;
            coef[term] = scale[row] * fast_exp(logit - lse[row]) +
                         scale[col] * fast_exp(logit - lse[col]);
          }
        }
        // a enters the base logits and, with "concat", the interventional ones; b the latter.
        coef_a[m] = combine == kCombineConcat ? coef[0] + coef[1] : coef[0];
        coef_b[m] = coef[1];
        sm.coef[0][p * L::kLdCoef + q] = static_cast<T>(coef_a[m]);
        sm.coef[1][p * L::kLdCoef + q] = static_cast<T>(coef_b[m]);
      }
      // Rows: grad[r0..] += T a[c0..]. Stores stop at the blocks' ends: the rows past them
      // belong to other CTAs of the round.
      tile_accumulate(sm, grad_a, i1, r0, dim_a, j1, c0, sm.coef[0], a);
      if (combine != kCombineNone) tile_accumulate(sm, grad_b, i1, r0, dim_b, j1, c0, sm.coef[1], b);
      if (c0 != r0) {  // columns: grad[c0..] += Tᵀ a[r0..]
        __syncthreads();
#pragma unroll
        for (int m = 0; m < kColsPerLane; ++m) {
          const int q = tile_col(m);
          sm.coef[0][q * L::kLdCoef + p] = static_cast<T>(coef_a[m]);
          sm.coef[1][q * L::kLdCoef + p] = static_cast<T>(coef_b[m]);
        }
        tile_accumulate(sm, grad_a, j1, c0, dim_a, i1, r0, sm.coef[0], a);
        if (combine != kCombineNone)
          tile_accumulate(sm, grad_b, j1, c0, dim_b, i1, r0, sm.coef[1], b);
      }
      __syncthreads();  // the next tile overwrites the logits and coefficients
    }
  }
}

// The schedule on the device, and the rounds the host launches one by one.
struct DeviceSchedule {
  at::Tensor starts, pairs;  // (nb + 1,), (P, 2) int64 on the device
};

DeviceSchedule to_device(const PairsShape& shape, const at::Device& device) {
  std::vector<int64_t> flat;
  flat.reserve(2 * shape.pairs.size());
  for (const auto& [i, j] : shape.pairs) {
    flat.push_back(i);
    flat.push_back(j);
  }
  const auto cpu = at::TensorOptions().dtype(at::kLong);
  const int64_t count = static_cast<int64_t>(shape.pairs.size());
  return {at::tensor(shape.starts, cpu).to(device),
          at::tensor(flat, cpu).reshape({count, 2}).to(device)};
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> contrastive_pairs_forward(
    const at::Tensor& a_in, const std::optional<at::Tensor>& b_in,
    const at::Tensor& block_starts, const at::Tensor& pairs, int64_t group_rows,
    c10::string_view combine) {
  TORCH_CHECK(a_in.is_cuda(), "a must be a CUDA tensor for the CUDA kernels, got one on ",
              a_in.device());
  const PairsShape shape = check_pairs_args(a_in, b_in, block_starts, pairs, group_rows, combine);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = vector_ready(a_in);
  const at::Tensor b = shape.uses_b ? vector_ready(*b_in) : at::Tensor();
  const auto acc_options = a.options().dtype(accum_dtype(a.scalar_type()));
  at::Tensor run_max = at::full({2, shape.rows}, -std::numeric_limits<double>::infinity(),
                                acc_options);
  at::Tensor run_sum = at::zeros({2, shape.rows}, acc_options);
  const DeviceSchedule schedule = to_device(shape, a.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.scalar_type(), "icl_msr contrastive_pairs_forward (CUDA)", [&] {
        using A = accum_t<scalar_t>;
        auto* kernel = pairs_forward_kernel<scalar_t>;
        constexpr size_t smem = kernel_bytes<scalar_t>(TileLayout<scalar_t>::kSweepBytes);
        allow_shared_memory(kernel, smem);
        for (const auto& [begin, end] : shape.round_spans) {
          kernel<<<dim3(end - begin), kThreads, smem, stream>>>(
              a.data_ptr<scalar_t>(), static_cast<const scalar_t*>(data_or_null(b)), a.size(1),
              shape.uses_b ? b.size(1) : 0, schedule.starts.data_ptr<int64_t>(),
              schedule.pairs.data_ptr<int64_t>() + 2 * begin, group_rows, shape.combine,
              run_max.data_ptr<A>(), run_sum.data_ptr<A>(), shape.rows);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return {run_max, run_sum};
}

std::tuple<at::Tensor, at::Tensor> contrastive_pairs_backward(
    const at::Tensor& a_in, const std::optional<at::Tensor>& b_in,
    const at::Tensor& block_starts, const at::Tensor& pairs, const at::Tensor& row_lse_in,
    const at::Tensor& row_scale_in, int64_t group_rows, c10::string_view combine) {
  TORCH_CHECK(a_in.is_cuda(), "a must be a CUDA tensor for the CUDA kernels, got one on ",
              a_in.device());
  const PairsShape shape = check_pairs_args(a_in, b_in, block_starts, pairs, group_rows, combine);
  for (const auto& [t, name] : {std::pair{&row_lse_in, "row_lse"},
                                std::pair{&row_scale_in, "row_scale"}}) {
    check_tensor(*t, name, 2, a_in.device());
    check_size(*t, name, 0, 2, "rows (one per term)");
    check_size(*t, name, 1, shape.rows, "columns, one per row of a");
  }
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = vector_ready(a_in);
  const at::Tensor b = shape.uses_b ? vector_ready(*b_in) : at::Tensor();
  const auto acc = accum_dtype(a.scalar_type());
  const auto acc_options = a.options().dtype(acc);
  const at::Tensor row_lse = row_lse_in.to(acc).contiguous();
  // Scale before casting down: the coefficients become half-precision operands, so the scales
  // are divided by their largest magnitude (a power of two: exact) and the result multiplied back.
  const at::Tensor largest = pow2_at_least(
      row_scale_in.to(acc).abs().amax().clamp_min(std::numeric_limits<float>::min()));
  const at::Tensor row_scale = (row_scale_in.to(acc) / largest).contiguous();
  at::Tensor grad_a = at::zeros({shape.rows, a.size(1)}, acc_options);
  at::Tensor grad_b = shape.uses_b ? at::zeros({shape.rows, b.size(1)}, acc_options)
                                   : at::empty({0}, acc_options);
  const DeviceSchedule schedule = to_device(shape, a.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.scalar_type(), "icl_msr contrastive_pairs_backward (CUDA)", [&] {
        using A = accum_t<scalar_t>;
        auto* kernel = pairs_backward_kernel<scalar_t>;
        constexpr size_t smem = kernel_bytes<scalar_t>(TileLayout<scalar_t>::kBytes);
        allow_shared_memory(kernel, smem);
        for (const auto& [begin, end] : shape.round_spans) {
          kernel<<<dim3(end - begin), kThreads, smem, stream>>>(
              a.data_ptr<scalar_t>(), static_cast<const scalar_t*>(data_or_null(b)), a.size(1),
              shape.uses_b ? b.size(1) : 0, schedule.starts.data_ptr<int64_t>(),
              schedule.pairs.data_ptr<int64_t>() + 2 * begin, group_rows, shape.combine,
              row_lse.data_ptr<A>(), row_scale.data_ptr<A>(), shape.rows, grad_a.data_ptr<A>(),
              shape.uses_b ? grad_b.data_ptr<A>() : nullptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  grad_a = first_features(grad_a.mul_(largest), a_in.size(1));
  if (shape.uses_b) grad_b = first_features(grad_b.mul_(largest), b_in->size(1));
  return {grad_a, grad_b};
}

}  // namespace icl_msr::cuda
