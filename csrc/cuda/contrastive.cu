// Fused NT-Xent of both terms (docs/math.md §2 steps 7-8, §3) on CUDA: icl_msr::contrastive_forward
// and icl_msr::contrastive_backward. See tile_kernels.cuh for the tiling; no B x M matrix is ever
// stored, the forward saves two log-sum-exps per row, and the backward recomputes the tiles.
// With explicit positive logits (memory-bank mode) no column is the row's own or its positive:
// the positive is one extra logit per row, merged into its log-sum-exp by the finishing kernel.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/ops_cuda.h"
#include "cuda/tile_kernels.cuh"

namespace icl_msr::cuda {
namespace {

// Forward: CTA (row block, split) folds the column tiles of its split into each row's running
// (max, sum) per term, skipping the self column, and records the positive's logit.
// Writes part_max/part_sum (splits, 2, rows) and pos_logit (2, rows).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) contrastive_forward_kernel(
    const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ a_cols,
    const T* __restrict__ b_cols, int64_t rows, int64_t cols, int64_t dim_a, int64_t dim_b,
    int64_t row_offset, int64_t combine, bool explicit_positive, int64_t tiles_per_split,
    bool resident_rows, accum_t<T>* part_max, accum_t<T>* part_sum, accum_t<T>* pos_logit) {
  using A = accum_t<T>;
  using L = TileLayout<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const TileSmem<T> sm(smem);
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const ResidentRows<T> resident = ResidentRows<T>::stage(
      resident_rows, smem + L::kSweepBytes, a, dim_a, b, combine == kCombineNone ? 0 : dim_b,
      rows, row0);
  const int64_t split = blockIdx.y;
  const int64_t first_tile = split * tiles_per_split;
  const int64_t end_tile = std::min(ceil_div(cols, kTile), first_tile + tiles_per_split);
  const int terms = combine == kCombineNone ? 1 : 2;

  const int p = tile_row();
  const int64_t row = row0 + p;
  // -1 matches no column: in memory-bank mode every column is a negative.
  const int64_t self = explicit_positive ? -1 : self_column(row, row_offset);
  const int64_t positive = explicit_positive ? -1 : positive_column(row, rows, row_offset);
  A run_max[2] = {neg_inf<A>(), neg_inf<A>()};
  A run_sum[2] = {A(0), A(0)};

  for (int64_t tile = first_tile; tile < end_tile; ++tile) {
    const int64_t col0 = tile * kTile;
    contrastive_logits(sm, a, b, rows, row0, a_cols, b_cols, cols, col0, dim_a, dim_b, combine,
                       resident);
    __syncthreads();
    if (row < rows) {
      // The negatives: the positive is merged in by the finishing kernel.
      const auto candidate = [&](int q) {
        return col0 + q < cols && col0 + q != self && col0 + q != positive;
      };
#pragma unroll
      for (int term = 0; term < 2; ++term) {
        if (term >= terms) break;
        const A* logit = sm.logits[term] + p * L::kLdTile;
        fold_tile_row(run_max[term], run_sum[term], [&](int q) { return logit[q]; }, candidate);
        const int64_t q = positive - col0;
        if (q >= 0 && q < kTile && q % kLanesPerRow == tile_lane())
          pos_logit[term * rows + row] = logit[q];
      }
    }
    __syncthreads();  // the next tile overwrites the logits
  }

#pragma unroll
  for (int term = 0; term < 2; ++term) {
    merge_lanes(run_max[term], run_sum[term]);
    if (term < terms && row < rows && tile_lane() == 0) {
      part_max[(split * 2 + term) * rows + row] = run_max[term];
      part_sum[(split * 2 + term) * rows + row] = run_sum[term];
    }
  }
}

// Merges the splits' partial (max, sum) of each row's negatives in split order, then its positive
// logit: row_lse (2, rows) and the row's loss term lse - positive logit (2, rows); both zero for
// the absent int term.
template <typename A>
__global__ void contrastive_finish_kernel(const A* part_max, const A* part_sum,
                                          const A* pos_logit, int64_t rows, int64_t splits,
                                          int terms, A* row_lse, A* row_loss) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  for (int term = 0; term < 2; ++term) {
    A lse = 0, loss = 0;
    if (term < terms) {
      A run_max = neg_inf<A>(), run_sum = 0;
      for (int64_t s = 0; s < splits; ++s)
        lse_merge(run_max, run_sum, part_max[(s * 2 + term) * rows + row],
                  part_sum[(s * 2 + term) * rows + row]);
      const A positive = pos_logit[term * rows + row];
      loss = ntxent_row_term(lse_finish(run_max, run_sum), positive);
      lse = positive + loss;
    }
    row_lse[term * rows + row] = lse;
    row_loss[term * rows + row] = loss;
  }
}

// Who owns what in a backward sweep.
enum class Sweep : int {
  kSymmetric,  // columns are the rows: row block i owns grad rows i from G_ij + G_ji (docs/math.md §3)
  kRowsOwned,  // rectangular, row-owned: grad of the local rows from G_ic over the columns
  kColsOwned,  // rectangular, column-owned: grad of the columns from G_ic over the local rows
};

// Who an owned row or column of a backward tile is, for the coefficient phase.
struct BackwardRoles {
  int64_t rows, row_offset, combine;
  bool explicit_positive, rows_owned;
  Sweep sweep;
};

// The coefficient phase of one backward tile: thread (p, lane) turns its entries' logits into
// upstream-weighted NT-Xent gradient coefficients (zero for a row's own column) and stores them
// in sm.coef: [0] for the a features (base, plus interventional with "concat"), [1] for b.
// own_lse: the owned entity's log-sum-exps when it is an anchor row; the swept ones' are staged
// in sm.stats.
template <typename T>
__device__ void store_tile_coefficients(const TileSmem<T>& sm, const BackwardRoles& roles,
                                        int64_t own, int64_t n_own, int64_t swept0,
                                        int64_t n_swept, const accum_t<T>* own_lse,
                                        const accum_t<T>* grad, int terms) {
  using A = accum_t<T>;
  using L = TileLayout<T>;
  const int p = tile_row();
#pragma unroll 4
  for (int m = 0; m < kColsPerLane; ++m) {
    const int q = tile_col(m);
    const int64_t swept = swept0 + q;
    A coef[2] = {A(0), A(0)};
    if (own < n_own && swept < n_swept) {
      const int64_t row = roles.rows_owned ? own : swept;  // local anchor row of the pair
      const int64_t col = roles.rows_owned ? swept : own;  // its global column
      if (roles.explicit_positive || col != self_column(row, roles.row_offset)) {
        const bool positive = !roles.explicit_positive &&
                              col == positive_column(row, roles.rows, roles.row_offset);
#pragma unroll
        for (int term = 0; term < 2; ++term) {
          if (term >= terms) break;
          const A logit = sm.logits[term][p * L::kLdTile + q];
          const A swept_lse = sm.stats[term * kTile + q];
          A c = ntxent_grad_coef(logit, roles.rows_owned ? own_lse[term] : swept_lse, positive,
                                 A(1));
          // G_ji of the transposed pair: column j's own softmax of the same (symmetric) logit;
          // j is i's positive exactly when i is j's.
          if (roles.sweep == Sweep::kSymmetric)
            c += ntxent_grad_coef(logit, swept_lse, positive, A(1));
          coef[term] = grad[term] * c;
        }
      }
    }
    // a enters the base logits and, with "concat", the interventional ones; b only the latter.
    // (In place over the logits when T is the accumulation type: same element, read first.)
    sm.coef[0][p * L::kLdCoef + q] =
        static_cast<T>(roles.combine == kCombineConcat ? coef[0] + coef[1] : coef[0]);
    sm.coef[1][p * L::kLdCoef + q] = static_cast<T>(coef[1]);
  }
}

// Backward: CTA (owned block, split, feature group) recomputes the logit tiles of its split,
// turns them into gradient coefficients (tile_math.h's ntxent_grad_coef, without the 1/rows
// factor, which the host applies to the summed slabs so that float16 coefficients keep their
// precision) and accumulates coef · swept features of its group (kGradChunks<T> * kTile features
// from blockIdx.z times that; one group up to D = 256, 128 in float64) in registers over the
// sweep, then writes them once to its rows of slab_a / slab_b (splits, n_own, dim).
// grad_losses arrives divided by a power of two >= its largest entry (contrastive_backward), so
// the coefficients stored in T are at most 2 (4 summed for "concat") in magnitude.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) contrastive_backward_kernel(
    const T* __restrict__ own_a, const T* __restrict__ own_b, int64_t n_own,
    const T* __restrict__ swept_a, const T* __restrict__ swept_b, int64_t n_swept, int64_t dim_a,
    int64_t dim_b, int64_t rows, int64_t row_offset, int64_t combine, bool explicit_positive,
    Sweep sweep,
    const accum_t<T>* __restrict__ row_lse, const accum_t<T>* __restrict__ grad_losses,
    int64_t tiles_per_split, bool resident_rows, accum_t<T>* slab_a, accum_t<T>* slab_b) {
  using A = accum_t<T>;
  using L = TileLayout<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const TileSmem<T> sm(smem);
  const int64_t own0 = int64_t(blockIdx.x) * kTile;
  const ResidentRows<T> resident = ResidentRows<T>::stage(
      resident_rows, smem + L::kBytes, own_a, dim_a, own_b,
      combine == kCombineNone ? 0 : dim_b, n_own, own0);
  const int64_t split = blockIdx.y;
  const int64_t first_tile = split * tiles_per_split;
  const int64_t end_tile = std::min(ceil_div(n_swept, kTile), first_tile + tiles_per_split);
  const int terms = combine == kCombineNone ? 1 : 2;
  // Whose softmax a coefficient needs: the owned entity's when it is an anchor row, the swept
  // one's (staged per tile in sm.stats) when that is; the symmetric sweep needs both.
  const bool rows_owned = sweep != Sweep::kColsOwned;
  const bool rows_swept = sweep != Sweep::kRowsOwned;
  slab_a += split * n_own * dim_a;
  slab_b += split * n_own * dim_b;
  const int64_t d0 = int64_t(blockIdx.z) * kGradChunks<T> * kTile;
  RowGradients<T> grads;
  grads.zero();
  // The swept features step 3 multiplies; the tile's first row is set per tile.
  typename RowGradients<T>::Swept swept_features(swept_a, dim_a, swept_b, dim_b,
                                                 combine != kCombineNone, n_swept, 0, d0);

  const int p = tile_row();
  const int64_t own = own0 + p;
  A own_lse[2] = {A(0), A(0)};
#pragma unroll
  for (int term = 0; term < 2; ++term)
    if (rows_owned && own < n_own && term < terms) own_lse[term] = row_lse[term * rows + own];
  const A upstream[2] = {grad_losses[0], combine == kCombineNone ? A(0) : grad_losses[1]};
  const BackwardRoles roles{rows, row_offset, combine, explicit_positive, rows_owned, sweep};

  for (int64_t tile = first_tile; tile < end_tile; ++tile) {
    const int64_t swept0 = tile * kTile;
    if (rows_swept)
      for (int i = threadIdx.x; i < 2 * kTile; i += kThreads) {
        const int term = i / kTile;
        const int64_t swept = swept0 + i % kTile;
        sm.stats[i] = term < terms && swept < n_swept ? row_lse[term * rows + swept] : A(0);
      }
    contrastive_logits(sm, own_a, own_b, n_own, own0, swept_a, swept_b, n_swept, swept0, dim_a,
                       dim_b, combine, resident);
    __syncthreads();

    swept_features.swept0 = swept0;
    RowGradients<T>::begin(sm, swept_features);
    store_tile_coefficients(sm, roles, own, n_own, swept0, n_swept, own_lse, upstream, terms);
    const T* const coef[2] = {sm.coef[0], sm.coef[1]};
    grads.accumulate(sm, coef, swept_features);
    __syncthreads();  // the next tile overwrites the statistics, logits and coefficients
  }
  accum_t<T>* const slabs[2] = {slab_a, slab_b};
  grads.store(sm, slabs, n_own, own0, swept_features);
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

template <typename T>
const T* ptr(const at::Tensor& t) {
  return static_cast<const T*>(data_or_null(t));
}

// One backward sweep: the gradients of the owned entities' a and b features, summed over the
// splits and scaled by grad_scale / rows, in the features' dtype (b's undefined when combine is
// "none"). The kernel reads grad_unit = grad_losses / grad_scale (see contrastive_backward).
std::pair<at::Tensor, at::Tensor> backward_sweep(Sweep sweep, const at::Tensor& own_a,
                                                 const at::Tensor& own_b,
                                                 const at::Tensor& swept_a,
                                                 const at::Tensor& swept_b,
                                                 const ContrastiveInputs& in, int64_t row_offset,
                                                 int64_t combine, const at::Tensor& row_lse,
                                                 const at::Tensor& grad_unit,
                                                 const at::Tensor& grad_scale) {
  const int64_t n_own = own_a.size(0), n_swept = swept_a.size(0);
  const int64_t owned_blocks = ceil_div(n_own, kTile);
  const SweepSplit split = split_sweep(owned_blocks, ceil_div(n_swept, kTile), n_own);
  const auto acc_options = own_a.options().dtype(accum_dtype(own_a.scalar_type()));
  at::Tensor slab_a = at::zeros({split.splits, n_own, in.dim_a}, acc_options);
  at::Tensor slab_b = at::zeros({split.splits, n_own, in.dim_b}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, own_a.scalar_type(), "icl_msr contrastive_backward (CUDA)", [&] {
        using A = accum_t<scalar_t>;
        auto* kernel = contrastive_backward_kernel<scalar_t>;
        constexpr size_t base = TileLayout<scalar_t>::kBytes;
        const size_t resident = ResidentRows<scalar_t>::extra_bytes(
            base, in.dim_a, combine == kCombineNone ? 0 : in.dim_b);
        const size_t smem = base + resident;
        allow_shared_memory(kernel, smem);
        const int64_t groups =
            ceil_div(std::max(in.dim_a, in.dim_b), kGradChunks<scalar_t> * kTile);
        kernel<<<dim3(owned_blocks, split.splits, groups), kThreads, smem,
                 c10::cuda::getCurrentCUDAStream()>>>(
            ptr<scalar_t>(own_a), ptr<scalar_t>(own_b), n_own, ptr<scalar_t>(swept_a),
            ptr<scalar_t>(swept_b), n_swept, in.dim_a, in.dim_b, in.rows, row_offset, combine,
            in.positive_logits.defined(), sweep, row_lse.data_ptr<A>(), grad_unit.data_ptr<A>(),
            split.tiles_per_split, resident > 0, slab_a.data_ptr<A>(), slab_b.data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  // grad_scale / rows as a 0-d device tensor: a power of two times 1/rows, so multiplying by it
  // rounds exactly as multiplying by 1/rows alone did.
  const at::Tensor scale = grad_scale * (1.0 / static_cast<double>(in.rows));
  at::Tensor grad_a =
      first_features(slab_a.sum(0).mul_(scale), in.in_dim_a).to(own_a.scalar_type());
  at::Tensor grad_b;
  if (combine != kCombineNone)
    grad_b = first_features(slab_b.sum(0).mul_(scale), in.in_dim_b).to(own_a.scalar_type());
  return {grad_a, grad_b};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> contrastive_forward(
    const at::Tensor& a_in, const std::optional<at::Tensor>& b_in,
    const std::optional<at::Tensor>& a_cols_in, const std::optional<at::Tensor>& b_cols_in,
    const std::optional<at::Tensor>& positive_logits_in, int64_t row_offset,
    c10::string_view combine_name) {
  const ContrastiveInputs in = check_contrastive(a_in, b_in, a_cols_in, b_cols_in,
                                                 positive_logits_in, row_offset, combine_name);
  const int64_t combine = in.combine;
  const bool explicit_positive = in.positive_logits.defined();
  const c10::cuda::CUDAGuard guard(in.a.device());
  const at::Tensor& a_cols = in.has_cols ? in.a_cols : in.a;
  const at::Tensor& b_cols = in.has_cols ? in.b_cols : in.b;
  const int64_t row_blocks = ceil_div(in.rows, kTile);
  const SweepSplit split = split_sweep(row_blocks, ceil_div(in.cols, kTile), in.rows);
  const auto acc_options = in.a.options().dtype(accum_dtype(in.a.scalar_type()));
  at::Tensor part_max = at::empty({split.splits, 2, in.rows}, acc_options);
  at::Tensor part_sum = at::empty({split.splits, 2, in.rows}, acc_options);
  // The kernel records the positives found among the columns; explicit ones are given.
  at::Tensor pos_logit =
      explicit_positive ? in.positive_logits.clone() : at::zeros({2, in.rows}, acc_options);
  at::Tensor row_lse = at::empty({2, in.rows}, acc_options);
  at::Tensor row_loss = at::empty({2, in.rows}, acc_options);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.a.scalar_type(), "icl_msr contrastive_forward (CUDA)", [&] {
        using A = accum_t<scalar_t>;
        auto* kernel = contrastive_forward_kernel<scalar_t>;
        constexpr size_t base = TileLayout<scalar_t>::kSweepBytes;
        const size_t resident = ResidentRows<scalar_t>::extra_bytes(
            base, in.dim_a, combine == kCombineNone ? 0 : in.dim_b);
        const size_t smem = base + resident;
        allow_shared_memory(kernel, smem);
        kernel<<<dim3(row_blocks, split.splits), kThreads, smem, stream>>>(
            ptr<scalar_t>(in.a), ptr<scalar_t>(in.b), ptr<scalar_t>(a_cols),
            ptr<scalar_t>(b_cols), in.rows, in.cols, in.dim_a, in.dim_b, row_offset, combine,
            explicit_positive, split.tiles_per_split, resident > 0, part_max.data_ptr<A>(),
            part_sum.data_ptr<A>(), pos_logit.data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        contrastive_finish_kernel<A><<<dim3(ceil_div(in.rows, kThreads)), kThreads, 0, stream>>>(
            part_max.data_ptr<A>(), part_sum.data_ptr<A>(), pos_logit.data_ptr<A>(), in.rows,
            split.splits, combine == kCombineNone ? 1 : 2, row_lse.data_ptr<A>(),
            row_loss.data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  // Mean over the rows; torch's reduction is deterministic (no atomics).
  at::Tensor losses = row_loss.sum(1).div_(static_cast<double>(in.rows));
  return {losses, row_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_backward(
    const at::Tensor& grad_losses_in, const at::Tensor& a_in, const std::optional<at::Tensor>& b_in,
    const std::optional<at::Tensor>& a_cols_in, const std::optional<at::Tensor>& b_cols_in,
    const std::optional<at::Tensor>& positive_logits_in, const at::Tensor& row_lse_in,
    int64_t row_offset, c10::string_view combine_name, bool column_grads) {
  const ContrastiveInputs in = check_contrastive(a_in, b_in, a_cols_in, b_cols_in,
                                                 positive_logits_in, row_offset, combine_name);
  const int64_t combine = in.combine;
  check_contrastive_backward_args(grad_losses_in, row_lse_in, a_in);
  const c10::cuda::CUDAGuard guard(in.a.device());
  const auto acc = accum_dtype(in.a.scalar_type());
  const at::Tensor grad_losses = grad_losses_in.to(acc).contiguous();
  const at::Tensor row_lse = row_lse_in.to(acc).contiguous();
  // Scale before casting down: the kernel stores grad_losses[term] * (softmax - indicator) as a
  // float16/bfloat16 operand of the tensor cores, and a loss scaler's 2^16 would overflow float16
  // there. It reads grad_unit = grad_losses / grad_scale instead, grad_scale the power of two at
  // or above max |grad_losses| of the terms used, so that every stored coefficient is at most 2
  // (4 for "concat"'s sum); the sweeps multiply the summed slabs by grad_scale. The floor keeps
  // all-zero gradients finite (zero coefficients) and is itself a power of two.
  const int64_t terms = combine == kCombineNone ? 1 : 2;
  const at::Tensor grad_scale = pow2_at_least(
      grad_losses.narrow(0, 0, terms).abs().amax().clamp_min(std::numeric_limits<float>::min()));
  const at::Tensor grad_unit = grad_losses / grad_scale;

  // A tensor that was None gets an empty gradient; a b that combine "none" does not read, zeros.
  const auto none = [&] { return at::empty({0}, in.a.options()); };
  at::Tensor grad_a, grad_b, grad_a_cols = none(), grad_b_cols = none();
  if (!in.has_cols) {
    std::tie(grad_a, grad_b) = backward_sweep(Sweep::kSymmetric, in.a, in.b, in.a, in.b, in,
                                              row_offset, combine, row_lse, grad_unit, grad_scale);
  } else {
    std::tie(grad_a, grad_b) =
        backward_sweep(Sweep::kRowsOwned, in.a, in.b, in.a_cols, in.b_cols, in, row_offset,
                       combine, row_lse, grad_unit, grad_scale);
    if (column_grads)  // skipped for a constant memory bank
      std::tie(grad_a_cols, grad_b_cols) =
          backward_sweep(Sweep::kColsOwned, in.a_cols, in.b_cols, in.a, in.b, in, row_offset,
                         combine, row_lse, grad_unit, grad_scale);
  }
  if (!grad_b.defined()) grad_b = b_in.has_value() ? at::zeros_like(*b_in) : none();
  if (!grad_b_cols.defined())
    grad_b_cols = b_cols_in.has_value() && column_grads ? at::zeros_like(*b_cols_in) : none();
  return {grad_a, grad_b, grad_a_cols, grad_b_cols};
}

}  // namespace icl_msr::cuda
