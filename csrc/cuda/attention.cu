// Prototype attention (docs/math.md §2 steps 4-6, §3) on CUDA: icl_msr::attention_forward and
// icl_msr::attention_backward, a flash attention with the B rows of x as queries and the K
// prototypes as keys = values, tiled over K (see tile_kernels.cuh). No B x K matrix is stored:
// the forward saves each row's log-sum-exp and the backward recomputes the score tiles.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/ops_cuda.h"
#include "cuda/tile_kernels.cuh"

namespace icl_msr::cuda {
namespace {

// Stages log_prior[k0 : k0 + kTile] (zero past K) into prior[0 : kTile]; the product that follows
// it ends with a barrier that publishes it.
template <typename A>
__device__ void stage_prior(A* prior, const A* log_prior, int64_t num_prototypes, int64_t k0) {
  for (int q = threadIdx.x; q < kTile; q += kThreads)
    prior[q] = k0 + q < num_prototypes ? log_prior[k0 + q] : A(0);
}

// Forward: CTA per row block. Two sweeps over the prototype tiles: the first finds each row's
// log-sum-exp, the second adds W P to the slab with the final weights. Recomputing the scores
// costs one extra x·Pᵀ product (K is small next to the batch), and in exchange the output never
// needs the running rescaling of a one-pass flash attention, which would rewrite the whole
// (row block x D) slab on every tile.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) attention_forward_kernel(
    const T* __restrict__ x, const T* __restrict__ prototypes,
    const accum_t<T>* __restrict__ log_prior, int64_t rows, int64_t num_prototypes, int64_t dim,
    accum_t<T> inv_temperature, int64_t prior_mode, accum_t<T>* row_lse, accum_t<T>* slab_c) {
  using A = accum_t<T>;
  using L = TileLayout<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const TileSmem<T> sm(smem, L::kBytes);
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const int64_t k_tiles = ceil_div(num_prototypes, kTile);
  const int p = tile_row();
  const int64_t row = row0 + p;
  const A* score_row = sm.logits[0] + p * L::kLdTile;
  const A* prior = sm.stats;

  const auto scores = [&](int64_t k0) {
    stage_prior(sm.stats, log_prior, num_prototypes, k0);
    TileAcc<T> acc;
    acc.zero();
    tile_product(acc, sm, x, rows, row0, prototypes, num_prototypes, k0, dim);
    acc.store(sm.logits[0], L::kLdTile);
    __syncthreads();
  };

  A run_max = neg_inf<A>(), run_sum = 0;
  for (int64_t tile = 0; tile < k_tiles; ++tile) {
    const int64_t k0 = tile * kTile;
    scores(k0);
    if (row < rows) {
      // The row_lse normalises E + log_prior ("logit") or E alone ("mult"), see PriorMode.
      const bool prior_in_lse = prior_mode == kPriorLogit;
      fold_tile_row(
          run_max, run_sum,
          [&](int q) {
            const A score = inv_temperature * score_row[q];
            return prior_in_lse ? score + prior[q] : score;
          },
          [&](int q) { return k0 + q < num_prototypes; });
    }
    __syncthreads();
  }
  merge_lanes(run_max, run_sum);
  const A lse = lse_finish(run_max, run_sum);
  if (row < rows && tile_lane() == 0) row_lse[row] = lse;

  for (int64_t tile = 0; tile < k_tiles; ++tile) {
    const int64_t k0 = tile * kTile;
    scores(k0);
#pragma unroll 4
    for (int m = 0; m < kColsPerLane; ++m) {
      const int q = tile_col(m);
      A weight = 0;
      if (row < rows && k0 + q < num_prototypes)
        weight = attention_weight(inv_temperature * score_row[q], prior[q], lse);
      sm.coef[0][p * L::kLdCoef + q] = static_cast<T>(weight);
    }
    tile_accumulate(sm, slab_c, rows, row0, dim, num_prototypes, k0, sm.coef[0], prototypes);
    __syncthreads();
  }
}

// The pieces of a backward score tile shared by both sweeps: x·P_kᵀ and dC_a·P_kᵀ of the pair
// into sm.logits[0] and [1], in the sweep's orientation (owned x swept).
template <typename T>
__device__ void backward_products(const TileSmem<T>& sm, const T* own, const T* own_grad,
                                  int64_t n_own, int64_t own0, const T* swept,
                                  const T* swept_grad, int64_t n_swept, int64_t swept0,
                                  int64_t dim, bool rows_owned) {
  using L = TileLayout<T>;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    // rows owned: (x | dC) · Pᵀ; prototypes owned: P · (x | dC)ᵀ
    TileAcc<T> acc;
    acc.zero();
    if (rows_owned)
      tile_product(acc, sm, i == 0 ? own : own_grad, n_own, own0, swept, n_swept, swept0, dim);
    else
      tile_product(acc, sm, own, n_own, own0, i == 0 ? swept : swept_grad, n_swept, swept0, dim);
    acc.store(sm.logits[i], L::kLdTile);
  }
  __syncthreads();
}

// Backward, row-owned: CTA (row block, split of the prototype tiles) adds dE P / tau_a of its
// tiles to its rows of slab_x (splits, rows, dim).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) attention_backward_rows_kernel(
    const T* __restrict__ grad_c, const T* __restrict__ x, const T* __restrict__ prototypes,
    const accum_t<T>* __restrict__ log_prior, const accum_t<T>* __restrict__ row_lse,
    const accum_t<T>* __restrict__ delta, int64_t rows, int64_t num_prototypes, int64_t dim,
    accum_t<T> inv_temperature, int64_t prior_mode, int64_t tiles_per_split,
    accum_t<T>* slab_x) {
  using A = accum_t<T>;
  using L = TileLayout<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const TileSmem<T> sm(smem, L::kBytes);
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const int64_t split = blockIdx.y;
  const int64_t first_tile = split * tiles_per_split;
  const int64_t end_tile = std::min(ceil_div(num_prototypes, kTile), first_tile + tiles_per_split);
  slab_x += split * rows * dim;

  const int p = tile_row();
  const int64_t row = row0 + p;
  const A lse = row < rows ? row_lse[row] : A(0);
  const A row_delta = row < rows ? delta[row] : A(0);
  const A* prior = sm.stats;

  for (int64_t tile = first_tile; tile < end_tile; ++tile) {
    const int64_t k0 = tile * kTile;
    stage_prior(sm.stats, log_prior, num_prototypes, k0);
    backward_products(sm, x, grad_c, rows, row0, prototypes, prototypes, num_prototypes, k0, dim,
                      /*rows_owned=*/true);
#pragma unroll 4
    for (int m = 0; m < kColsPerLane; ++m) {
      const int q = tile_col(m);
      A coef = 0;
      if (row < rows && k0 + q < num_prototypes) {
        const A score = inv_temperature * sm.logits[0][p * L::kLdTile + q];
        const A dweight = sm.logits[1][p * L::kLdTile + q];
        const A weight = attention_weight(score, prior[q], lse);
        coef = inv_temperature *
               attention_score_grad(score, weight, dweight, lse, row_delta, prior_mode);
      }
      sm.coef[0][p * L::kLdCoef + q] = static_cast<T>(coef);
    }
    tile_accumulate(sm, slab_x, rows, row0, dim, num_prototypes, k0, sm.coef[0], prototypes);
    __syncthreads();
  }
}

// Backward, prototype-owned: CTA (prototype block, split of the row tiles) adds
// dEᵀ x / tau_a + Wᵀ dC of its tiles to its rows of slab_p (splits, K, dim), and its rows' sum
// of the log-prior gradient to slab_prior (splits, K).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) attention_backward_prototypes_kernel(
    const T* __restrict__ grad_c, const T* __restrict__ x, const T* __restrict__ prototypes,
    const accum_t<T>* __restrict__ log_prior, const accum_t<T>* __restrict__ row_lse,
    const accum_t<T>* __restrict__ delta, int64_t rows, int64_t num_prototypes, int64_t dim,
    accum_t<T> inv_temperature, int64_t prior_mode, int64_t tiles_per_split, accum_t<T>* slab_p,
    accum_t<T>* slab_prior) {
  using A = accum_t<T>;
  using L = TileLayout<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const TileSmem<T> sm(smem, L::kBytes);
  const int64_t k0 = int64_t(blockIdx.x) * kTile;
  const int64_t split = blockIdx.y;
  const int64_t first_tile = split * tiles_per_split;
  const int64_t end_tile = std::min(ceil_div(rows, kTile), first_tile + tiles_per_split);
  slab_p += split * num_prototypes * dim;

  const int p = tile_row();
  const int64_t k = k0 + p;
  const A prior = k < num_prototypes ? log_prior[k] : A(0);
  const A* swept_lse = sm.stats;
  const A* swept_delta = sm.stats + kTile;
  A prior_grad = 0;  // this thread's share of sum_a dL/dlog_prior_k

  for (int64_t tile = first_tile; tile < end_tile; ++tile) {
    const int64_t row0 = tile * kTile;
    for (int q = threadIdx.x; q < kTile; q += kThreads) {
      sm.stats[q] = row0 + q < rows ? row_lse[row0 + q] : A(0);
      sm.stats[kTile + q] = row0 + q < rows ? delta[row0 + q] : A(0);
    }
    backward_products(sm, prototypes, prototypes, num_prototypes, k0, x, grad_c, rows, row0, dim,
                      /*rows_owned=*/false);
#pragma unroll 4
    for (int m = 0; m < kColsPerLane; ++m) {
      const int q = tile_col(m);
      A score_coef = 0, weight = 0;
      if (k < num_prototypes && row0 + q < rows) {
        const A score = inv_temperature * sm.logits[0][p * L::kLdTile + q];
        const A dweight = sm.logits[1][p * L::kLdTile + q];
        weight = attention_weight(score, prior, swept_lse[q]);
        const A dscore =
            attention_score_grad(score, weight, dweight, swept_lse[q], swept_delta[q], prior_mode);
        prior_grad += attention_prior_grad(dscore, weight, dweight, prior_mode);
        score_coef = inv_temperature * dscore;
      }
      sm.coef[0][p * L::kLdCoef + q] = static_cast<T>(score_coef);
      sm.coef[1][p * L::kLdCoef + q] = static_cast<T>(weight);
    }
    tile_accumulate(sm, slab_p, num_prototypes, k0, dim, rows, row0, sm.coef[0], x, sm.coef[1],
                    grad_c);
    __syncthreads();
  }
  prior_grad = sum_lanes(prior_grad);
  if (k < num_prototypes && tile_lane() == 0) slab_prior[split * num_prototypes + k] = prior_grad;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& x_in,
                                                     const at::Tensor& prototypes_in,
                                                     const at::Tensor& log_prior_in,
                                                     double inv_attn_temperature,
                                                     c10::string_view prior_mode_name) {
  const AttentionInputs in =
      check_attention(x_in, prototypes_in, log_prior_in, inv_attn_temperature, prior_mode_name);
  const int64_t prior_mode = in.prior_mode;
  const c10::cuda::CUDAGuard guard(in.x.device());
  const auto acc_options = in.x.options().dtype(accum_dtype(in.x.scalar_type()));
  at::Tensor row_lse = at::empty({in.rows}, acc_options);
  at::Tensor slab_c = at::zeros({in.rows, in.dim}, acc_options);
  if (in.rows > 0) {
    const at::Tensor log_prior = in.log_prior.to(acc_options.dtype()).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, in.x.scalar_type(), "icl_msr attention_forward (CUDA)", [&] {
          using A = accum_t<scalar_t>;
          auto* kernel = attention_forward_kernel<scalar_t>;
          constexpr size_t smem = kernel_bytes<scalar_t>(TileLayout<scalar_t>::kBytes);
          allow_shared_memory(kernel, smem);
          const auto stream = c10::cuda::getCurrentCUDAStream();
          kernel<<<dim3(ceil_div(in.rows, kTile)), kThreads, smem, stream>>>(
              in.x.data_ptr<scalar_t>(), in.prototypes.data_ptr<scalar_t>(),
              log_prior.data_ptr<A>(), in.rows, in.num_prototypes, in.dim,
              static_cast<A>(inv_attn_temperature), prior_mode, row_lse.data_ptr<A>(),
              slab_c.data_ptr<A>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return {first_features(slab_c, in.in_dim).to(in.x.scalar_type()), row_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_c_in, const at::Tensor& x_in, const at::Tensor& prototypes_in,
    const at::Tensor& log_prior_in, const at::Tensor& c_in, const at::Tensor& row_lse_in,
    double inv_attn_temperature, c10::string_view prior_mode_name) {
  const AttentionInputs in =
      check_attention(x_in, prototypes_in, log_prior_in, inv_attn_temperature, prior_mode_name);
  const int64_t prior_mode = in.prior_mode;
  check_attention_backward_args(grad_c_in, c_in, row_lse_in, x_in);
  const c10::cuda::CUDAGuard guard(in.x.device());
  const auto acc = accum_dtype(in.x.scalar_type());
  const auto acc_options = in.x.options().dtype(acc);
  const int64_t rows = in.rows, num_prototypes = in.num_prototypes, dim = in.dim;
  if (rows == 0)
    return {at::zeros_like(x_in), at::zeros_like(prototypes_in), at::zeros_like(log_prior_in)};

  // The kernels read features as stored (x's dtype) and statistics in the accumulation dtype.
  // Scale before casting down: a loss scaler's 2^16 in dC would overflow float16 here and in the
  // dE coefficients the kernels store in x's dtype. They get dC / grad_scale instead, grad_scale
  // the power of two at or above max |dC|, so that |dC| <= 1 and the coefficients inv_t dE they
  // store stay within inv_t 2 sqrt(D) max|P_k| (W <= 1, |dC_a| <= sqrt(D)); every output is
  // linear in dC (delta too, computed from the same scaled dC) and is multiplied back by
  // grad_scale. A power of two scales exactly, so float32/float64 results are unchanged; the
  // floor keeps dC = 0 finite.
  const at::Tensor grad_c_acc = grad_c_in.to(acc);
  const at::Tensor grad_scale = pow2_at_least(
      (grad_c_acc.numel() > 0 ? grad_c_acc.abs().amax() : at::ones({}, acc_options))
          .clamp_min(std::numeric_limits<float>::min()));
  const at::Tensor grad_c_unit = grad_c_acc / grad_scale;
  const at::Tensor grad_c = vector_ready(grad_c_unit.to(in.x.scalar_type()));
  const at::Tensor log_prior = in.log_prior.to(acc).contiguous();
  const at::Tensor row_lse = row_lse_in.to(acc).contiguous();
  // delta_a = <dC_a, C_a> / grad_scale, the softmax-backward term of every row.
  const at::Tensor delta = (grad_c_unit * c_in.to(acc)).sum(1).contiguous();

  const int64_t row_blocks = ceil_div(rows, kTile), k_tiles = ceil_div(num_prototypes, kTile);
  const SweepSplit rows_split = split_sweep(row_blocks, k_tiles, rows);
  const SweepSplit protos_split = split_sweep(k_tiles, row_blocks, num_prototypes);
  at::Tensor slab_x = at::zeros({rows_split.splits, rows, dim}, acc_options);
  at::Tensor slab_p = at::zeros({protos_split.splits, num_prototypes, dim}, acc_options);
  at::Tensor slab_prior = at::zeros({protos_split.splits, num_prototypes}, acc_options);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.x.scalar_type(), "icl_msr attention_backward (CUDA)", [&] {
        using A = accum_t<scalar_t>;
        constexpr size_t smem = kernel_bytes<scalar_t>(TileLayout<scalar_t>::kBytes);
        const A inv_t = static_cast<A>(inv_attn_temperature);
        auto* rows_kernel = attention_backward_rows_kernel<scalar_t>;
        allow_shared_memory(rows_kernel, smem);
        rows_kernel<<<dim3(row_blocks, rows_split.splits), kThreads, smem, stream>>>(
            grad_c.data_ptr<scalar_t>(), in.x.data_ptr<scalar_t>(),
            in.prototypes.data_ptr<scalar_t>(), log_prior.data_ptr<A>(), row_lse.data_ptr<A>(),
            delta.data_ptr<A>(), rows, num_prototypes, dim, inv_t, prior_mode,
            rows_split.tiles_per_split, slab_x.data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        auto* protos_kernel = attention_backward_prototypes_kernel<scalar_t>;
        allow_shared_memory(protos_kernel, smem);
        protos_kernel<<<dim3(k_tiles, protos_split.splits), kThreads, smem, stream>>>(
            grad_c.data_ptr<scalar_t>(), in.x.data_ptr<scalar_t>(),
            in.prototypes.data_ptr<scalar_t>(), log_prior.data_ptr<A>(), row_lse.data_ptr<A>(),
            delta.data_ptr<A>(), rows, num_prototypes, dim, inv_t, prior_mode,
            protos_split.tiles_per_split, slab_p.data_ptr<A>(), slab_prior.data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  // The splits' slabs, summed in a fixed order (torch's reductions use no atomics), and the
  // gradient scale multiplied back before casting to the inputs' dtypes.
  return {first_features(slab_x.sum(0).mul_(grad_scale), in.in_dim).to(x_in.scalar_type()),
          first_features(slab_p.sum(0).mul_(grad_scale), in.in_dim)
              .to(prototypes_in.scalar_type()),
          slab_prior.sum(0).mul_(grad_scale).to(log_prior_in.scalar_type())};
}

}  // namespace icl_msr::cuda
