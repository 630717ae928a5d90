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

// Thread (p, lane)'s share of a tile's negatives for its row `row` (tile row p): folded into the
// row's running (max, sum) per term, skipping the row's own column `self` and its `positive`
// (-1: none among the columns) and the columns past `cols`; the positive, merged in by the
// finishing kernel, has its logit recorded in pos_logit (2, rows) where the tile holds it.
template <typename T>
__device__ __forceinline__ void fold_row_negatives(const TileSmem<T>& sm, int64_t rows,
                                                   int64_t row, int64_t cols, int64_t col0,
                                                   int64_t self, int64_t positive, int terms,
                                                   accum_t<T> (&run_max)[2],
                                                   accum_t<T> (&run_sum)[2],
                                                   accum_t<T>* pos_logit) {
  using A = accum_t<T>;
  using L = TileLayout<T>;
  const auto candidate = [&](int q) {
    return col0 + q < cols && col0 + q != self && col0 + q != positive;
  };
#pragma unroll
  for (int term = 0; term < 2; ++term) {
    if (term >= terms) break;
    const A* logit = sm.logits[term] + tile_row() * L::kLdTile;
    fold_tile_row(run_max[term], run_sum[term], [&](int q) { return logit[q]; }, candidate);
    const int64_t q = positive - col0;
    if (q >= 0 && q < kTile && q % kLanesPerRow == tile_lane())
      pos_logit[term * rows + row] = logit[q];
  }
}

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
  const TileSmem<T> sm(smem, L::kSweepBytes);
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
    if (row < rows)
      fold_row_negatives(sm, rows, row, cols, col0, self, positive, terms, run_max, run_sum,
                         pos_logit);
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
  const TileSmem<T> sm(smem, L::kBytes);
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

// ---------------------------------------------------------------------------------------------
// The symmetric sweep (one process: the columns are the rows themselves). The logits are
// symmetric, so a tile of row blocks (i, j), i < j, computed once serves block i's rows as they
// are and block j's rows through its columns: half the products and exponentials of the sweeps
// above. A CTA takes row block i and one segment of its distances k = j - i (at most
// segment_tiles tiles); the column sides of its tiles go to buffers that CTAs add to in a fixed
// order, by distance, handed on by a turn counter per block: the tile at distance k waits until
// the counter reads k - 1 and then sets it to k, so results are bit-identical run to run. A
// CTA's work follows from a ticket it takes when it starts (segment-major, row blocks from the
// last), and it only waits for tiles of smaller tickets, CTAs that started before it and so are
// running or done: every wait ends (the ordering argument of decoupled look-back scans). Within
// a segment, the tile (i + 1, j) a CTA waits for is the one its predecessor computed one step
// earlier, so CTAs that start together do not wait on each other.
//
// counters (int32): [0] the ticket, then a column turn per block, then (backward) a row turn
// per block, all zero at launch.

struct PairWork {
  int64_t n_blocks;                // row blocks of the rows
  int64_t block, segment, k0, k1;  // row block i, its segment, distances [k0, k1)
};

// The work of the ticket this CTA takes, broadcast through the third statistics row of sm (the
// backward stages the swept block's log-sum-exps in the first two).
template <typename T>
__device__ PairWork take_pair_work(int* counters, const TileSmem<T>& sm, int64_t rows,
                                   int64_t segment_tiles) {
  int* const slot = reinterpret_cast<int*>(sm.stats + 2 * kTile);
  if (threadIdx.x == 0) *slot = atomicAdd(counters, 1);
  __syncthreads();
  const int64_t ticket = *slot;
  PairWork w;
  w.n_blocks = ceil_div(rows, kTile);
  w.segment = ticket / w.n_blocks;
  w.block = w.n_blocks - 1 - ticket % w.n_blocks;
  w.k0 = w.segment * segment_tiles;
  w.k1 = std::min(w.k0 + segment_tiles, w.n_blocks - w.block);
  return w;
}

// Waits until *counter reads `turn`: one thread polls with acquire loads, and the barrier after
// it orders every thread's reads of the buffer after the acquire (CUTLASS's semaphore pattern).
__device__ void wait_turn(const int* counter, int turn) {
  if (threadIdx.x == 0) {
    int seen;
    do {
#if __CUDA_ARCH__ >= 700
      asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
#else
      seen = *reinterpret_cast<const volatile int*>(counter);
      __threadfence();
#endif
    } while (seen != turn);
  }
  __syncthreads();
}

// Sets *counter to `turn` once every thread's writes are done: a barrier, then a release store.
__device__ void pass_turn(int* counter, int turn) {
  __syncthreads();
  if (threadIdx.x == 0) {
#if __CUDA_ARCH__ >= 700
    asm volatile("st.release.gpu.global.b32 [%0], %1;" : : "l"(counter), "r"(turn) : "memory");
#else
    __threadfence();
    *reinterpret_cast<volatile int*>(counter) = turn;
#endif
  }
}

// How far below the tile's maximum a row's or column's own maximum may lie for the shared
// shift. The exponential of s - top is good to about |s - top| * 2^-23 relative (the rounding
// of the argument, then of its product with log2(e) in __expf), so a row 16 below costs its
// log-sum-exp ~3e-6, the accuracy the per-row shifts get from entries ~16 below their own
// maximum; rows farther below take the per-row and per-column shifts.
constexpr float kSharedShiftSpan = 16.0f;

// One off-diagonal tile (row block at row0, column block at col0, distinct) of the symmetric
// forward: every negative folded into its row's running (max, sum) and its column's (max, sum)
// of this tile, with one exponential per entry shifted by the tile's maximum unless some row or
// column lies more than kSharedShiftSpan below it (then with a shift per row and per column).
// Thread (p, lane) holds row p's running state, its share, and returns column p's statistics
// (lanes merged). A positive entry is a negative of neither; its logit is written for both its
// row and its column (it lies in this tile only). Writes over the logits (the exponentials).
template <typename T>
__device__ __forceinline__ void fold_pair_tile(const TileSmem<T>& sm, int64_t rows, int64_t row0,
                                               int64_t col0, int terms, accum_t<T> (&run_max)[2],
                                               accum_t<T> (&run_sum)[2],
                                               accum_t<T> (&col_max)[2],
                                               accum_t<T> (&col_sum)[2],
                                               accum_t<T>* pos_logit) {
  using A = accum_t<T>;
  using L = TileLayout<T>;
  const int p = tile_row();
  const int64_t row = row0 + p, col = col0 + p;
  const int64_t row_positive = positive_column(row, rows, 0);
  const int64_t col_positive = positive_column(col, rows, 0);
  // Entry (p, q) of row p; entry (r, p) of column p (the relation is symmetric).
  const auto in_row = [&](int q) {
    return row < rows && col0 + q < rows && col0 + q != row_positive;
  };
  const auto in_col = [&](int r) {
    return col < rows && row0 + r < rows && row0 + r != col_positive;
  };
  A* const scratch = sm.stats;  // the per-warp maxima (the forward has no statistics to stage)
  A row_max[2], top[2];
  bool far = false;
#pragma unroll
  for (int term = 0; term < 2; ++term) {
    if (term >= terms) break;
    const A* logit = sm.logits[term];
    A m = neg_inf<A>(), c = neg_inf<A>();
#pragma unroll
    for (int n = 0; n < kColsPerLane; ++n) {
      const int q = tile_col(n);
      if (in_row(q)) m = nan_max(m, logit[p * L::kLdTile + q]);
      if (in_col(q)) c = nan_max(c, logit[q * L::kLdTile + p]);
    }
    row_max[term] = max_lanes(m);
    col_max[term] = max_lanes(c);
    const int64_t q = row_positive - col0;
    if (row < rows && q >= 0 && q < kTile && q % kLanesPerRow == tile_lane()) {
      const A v = logit[p * L::kLdTile + q];
      pos_logit[term * rows + row] = v;
      pos_logit[term * rows + row_positive] = v;
    }
    A w = row_max[term];  // the warp's maximum, then the tile's
#pragma unroll
    for (int offset = kLanesPerRow; offset < 32; offset *= 2)
      w = nan_max(w, __shfl_xor_sync(0xffffffffu, w, offset));
    if (threadIdx.x % 32 == 0) scratch[term * (kThreads / 32) + threadIdx.x / 32] = w;
  }
  __syncthreads();
#pragma unroll
  for (int term = 0; term < 2; ++term) {
    if (term >= terms) break;
    A t = neg_inf<A>();
    for (int w = 0; w < kThreads / 32; ++w) t = nan_max(t, scratch[term * (kThreads / 32) + w]);
    top[term] = t;
    const A floor = t - A(kSharedShiftSpan);
    far |= (row_max[term] != neg_inf<A>() && row_max[term] < floor) ||
           (col_max[term] != neg_inf<A>() && col_max[term] < floor);
  }
  if (!__syncthreads_or(far)) {
    // One exponential per entry, shifted by the tile's maximum: the row sums from registers,
    // the exponentials written over the logits (zero for the entries that are no negative) for
    // the column sums. The barrier above ends every read of the logits.
#pragma unroll
    for (int term = 0; term < 2; ++term) {
      if (term >= terms) break;
      A* logit = sm.logits[term];
      A sum = 0;
#pragma unroll
      for (int n = 0; n < kColsPerLane; ++n) {
        const int q = tile_col(n);
        A e = 0;
        if (in_row(q)) e = fast_exp(logit[p * L::kLdTile + q] - top[term]);
        logit[p * L::kLdTile + q] = e;
        sum += e;
      }
      if (row_max[term] != neg_inf<A>()) lse_merge(run_max[term], run_sum[term], top[term], sum);
    }
    __syncthreads();
#pragma unroll
    for (int term = 0; term < 2; ++term) {
      if (term >= terms) break;
      const A* e = sm.logits[term];
      A sum = 0;
#pragma unroll
      for (int n = 0; n < kColsPerLane; ++n) sum += e[tile_col(n) * L::kLdTile + p];
      col_sum[term] = sum_lanes(sum);
      if (col_max[term] != neg_inf<A>()) col_max[term] = top[term];
    }
  } else {
#pragma unroll
    for (int term = 0; term < 2; ++term) {
      if (term >= terms) break;
      const A* logit = sm.logits[term];
      fold_tile_row(run_max[term], run_sum[term],
                    [&](int q) { return logit[p * L::kLdTile + q]; }, in_row);
      A m = neg_inf<A>(), sum = A(0);
      fold_tile_row(m, sum, [&](int r) { return logit[r * L::kLdTile + p]; }, in_col);
      merge_lanes(m, sum);
      col_max[term] = m;
      col_sum[term] = sum;
    }
  }
}

// Symmetric forward: the rows' (max, sum) of their negatives over the CTA's segment go to split
// `segment` of part_max/part_sum (splits, 2, rows); the column sides are merged, in turn, into
// split col_split; each positive logit is written once to pos_logit (2, rows), by its tile.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) contrastive_symmetric_forward_kernel(
    const T* __restrict__ a, const T* __restrict__ b, int64_t rows, int64_t dim_a, int64_t dim_b,
    int64_t combine, int64_t segment_tiles, int64_t col_split, int* counters,
    accum_t<T>* part_max, accum_t<T>* part_sum, accum_t<T>* pos_logit) {
  using A = accum_t<T>;
  using L = TileLayout<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const TileSmem<T> sm(smem, L::kSweepBytes);
  const PairWork work = take_pair_work(counters, sm, rows, segment_tiles);
  if (work.k0 >= work.k1) return;
  const bool with_b = combine != kCombineNone;
  const int terms = with_b ? 2 : 1;
  const int64_t row0 = work.block * kTile;
  const ResidentRows<T> resident = ResidentRows<T>::stage(
      true, smem + L::kSweepBytes, a, dim_a, b, with_b ? dim_b : 0, rows, row0, kTile);

  const int p = tile_row();
  const int64_t row = row0 + p;
  const int64_t positive = positive_column(row, rows, 0);
  A run_max[2] = {neg_inf<A>(), neg_inf<A>()};
  A run_sum[2] = {A(0), A(0)};
  for (int64_t k = work.k0; k < work.k1; ++k) {
    const int64_t j = work.block + k, col0 = j * kTile;
    contrastive_logits(sm, a, b, rows, row0, a, b, rows, col0, dim_a, dim_b, combine, resident);
    __syncthreads();
    if (k == 0) {  // the diagonal tile holds both orientations of its pairs: its rows only
      if (row < rows)
        fold_row_negatives(sm, rows, row, rows, col0, row, positive, terms, run_max, run_sum,
                           pos_logit);
    } else {
      A col_max[2] = {neg_inf<A>(), neg_inf<A>()};
      A col_sum[2] = {A(0), A(0)};
      fold_pair_tile(sm, rows, row0, col0, terms, run_max, run_sum, col_max, col_sum, pos_logit);
      int* const turn = counters + 1 + j;
      wait_turn(turn, static_cast<int>(k - 1));
      const int64_t col = col0 + p;
      if (tile_lane() == 0 && col < rows) {
#pragma unroll
        for (int term = 0; term < 2; ++term) {
          if (term >= terms) break;
          const int64_t at = (col_split * 2 + term) * rows + col;
          A m = __ldcg(part_max + at), sum = __ldcg(part_sum + at);
          lse_merge(m, sum, col_max[term], col_sum[term]);
          part_max[at] = m;
          part_sum[at] = sum;
        }
      }
      pass_turn(turn, static_cast<int>(k));
    }
    __syncthreads();  // the next tile overwrites the logits
  }

#pragma unroll
  for (int term = 0; term < 2; ++term) {
    merge_lanes(run_max[term], run_sum[term]);
    if (term < terms && row < rows && tile_lane() == 0) {
      part_max[(work.segment * 2 + term) * rows + row] = run_max[term];
      part_sum[(work.segment * 2 + term) * rows + row] = run_sum[term];
    }
  }
}

// The symmetric backward keeps its rows' gradients of D <= 128 in registers (two kTile-wide
// chunks each for a and b): with the column side's product accumulators beside them, four
// chunks would spill.
constexpr int kSymmetricChunks = 2;

// Symmetric backward: per tile, the coefficients of the pair both ways (G_ij + G_ji, as the
// full sweep's Sweep::kSymmetric); the row side, coefficients · F_j, accumulates in registers
// over the segment (RowGradients) and is added to row_grad_a/b (rows, dim) under the block's
// row turn, in segment order; the column side of an off-diagonal tile, coefficientsᵀ · F_i with
// F_i the resident rows, is added to col_grad_a/b under the column block's turn, in distance
// order. The host adds the two buffers and scales them as the full sweep's slabs.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) contrastive_symmetric_backward_kernel(
    const T* __restrict__ a, const T* __restrict__ b, int64_t rows, int64_t dim_a, int64_t dim_b,
    int64_t combine, const accum_t<T>* __restrict__ row_lse,
    const accum_t<T>* __restrict__ grad_losses, int64_t segment_tiles, int* counters,
    accum_t<T>* row_grad_a, accum_t<T>* row_grad_b, accum_t<T>* col_grad_a,
    accum_t<T>* col_grad_b) {
  using A = accum_t<T>;
  using L = TileLayout<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const TileSmem<T> sm(smem, L::kBytes);
  const PairWork work = take_pair_work(counters, sm, rows, segment_tiles);
  if (work.k0 >= work.k1) return;  // (later segments are empty too: nobody waits for this one)
  const bool with_b = combine != kCombineNone;
  const int terms = with_b ? 2 : 1;
  const int64_t own0 = work.block * kTile;
  const ResidentRows<T> resident = ResidentRows<T>::stage(
      true, smem + L::kBytes, a, dim_a, b, with_b ? dim_b : 0, rows, own0, kTile);
  using Gradients = RowGradients<T, kSymmetricChunks>;
  Gradients grads;
  grads.zero();
  typename Gradients::Swept swept_features(a, dim_a, b, dim_b, with_b, rows, 0, 0);

  const int p = tile_row();
  const int64_t own = own0 + p;
  A own_lse[2] = {A(0), A(0)};
#pragma unroll
  for (int term = 0; term < 2; ++term)
    if (own < rows && term < terms) own_lse[term] = row_lse[term * rows + own];
  const A upstream[2] = {grad_losses[0], with_b ? grad_losses[1] : A(0)};
  const BackwardRoles roles{rows, 0, combine, false, true, Sweep::kSymmetric};
  const T* const coef[2] = {sm.coef[0], sm.coef[1]};

  for (int64_t k = work.k0; k < work.k1; ++k) {
    const int64_t j = work.block + k, swept0 = j * kTile;
    for (int i = threadIdx.x; i < 2 * kTile; i += kThreads) {
      const int term = i / kTile;
      const int64_t swept = swept0 + i % kTile;
      sm.stats[i] = term < terms && swept < rows ? row_lse[term * rows + swept] : A(0);
    }
    contrastive_logits(sm, a, b, rows, own0, a, b, rows, swept0, dim_a, dim_b, combine,
                       resident);
    __syncthreads();
    swept_features.swept0 = swept0;
    Gradients::begin(sm, swept_features);
    store_tile_coefficients(sm, roles, own, rows, swept0, rows, own_lse, upstream, terms);
    grads.accumulate(sm, coef, swept_features);  // ends with a barrier: the stage is free
    if (k > 0) {
      // The transposed tile: block j's rows get coefficientsᵀ · block i's (resident, padded to
      // whole kTile-wide chunks) features, kTile at a time through the stage, under block j's
      // turn. (Taken before the products rather than before the first add: a polling loop
      // inside the product loop would keep it from being straight-line code.)
      int* const turn = counters + 1 + j;
      wait_turn(turn, static_cast<int>(k - 1));
#pragma unroll
      for (int g = 0; g < 2; ++g) {
        if (g == 1 && !with_b) break;
        const int64_t dim = g == 0 ? dim_a : dim_b;
        for (int64_t d0 = 0; d0 < dim; d0 += kTile) {
          TileAcc<T> acc;
          acc.zero();
          acc.template mma</*kBTransposed=*/false, /*kATransposed=*/true>(
              coef[g], L::kLdCoef, (g == 0 ? resident.a : resident.b) + d0,
              g == 0 ? resident.ld_a : resident.ld_b, kTile);
          acc.store(sm.stage, L::kLdTile);
          __syncthreads();
          add_tile<kTile, kTile, L::kLdTile>(g == 0 ? col_grad_a : col_grad_b, rows, dim,
                                             swept0, d0, sm.stage);
          __syncthreads();
        }
      }
      pass_turn(turn, static_cast<int>(k));
    }
    __syncthreads();  // the next tile overwrites the statistics, logits and coefficients
  }
  int* const row_turn = counters + 1 + work.n_blocks + work.block;
  wait_turn(row_turn, static_cast<int>(work.segment));
  accum_t<T>* const buffers[2] = {row_grad_a, row_grad_b};
  grads.store(sm, buffers, rows, own0, swept_features, /*add=*/true);
  pass_turn(row_turn, static_cast<int>(work.segment + 1));
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

template <typename T>
const T* ptr(const at::Tensor& t) {
  return static_cast<const T*>(data_or_null(t));
}

// The forward's last step: each row's splits merged in split order, then its positive logit.
// (losses (2,), row_lse (2, rows)) from part_max/part_sum (splits, 2, rows), pos_logit (2, rows).
std::tuple<at::Tensor, at::Tensor> finish_forward(const at::Tensor& part_max,
                                                  const at::Tensor& part_sum,
                                                  const at::Tensor& pos_logit, int terms) {
  const int64_t splits = part_max.size(0), rows = part_max.size(2);
  at::Tensor row_lse = at::empty({2, rows}, part_max.options());
  at::Tensor row_loss = at::empty({2, rows}, part_max.options());
  AT_DISPATCH_FLOATING_TYPES(part_max.scalar_type(), "icl_msr contrastive_finish (CUDA)", [&] {
    contrastive_finish_kernel<scalar_t>
        <<<dim3(ceil_div(rows, kThreads)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            part_max.data_ptr<scalar_t>(), part_sum.data_ptr<scalar_t>(),
            pos_logit.data_ptr<scalar_t>(), rows, splits, terms, row_lse.data_ptr<scalar_t>(),
            row_loss.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Mean over the rows; torch's reduction is deterministic (no atomics).
  at::Tensor losses = row_loss.sum(1).div_(static_cast<double>(rows));
  return {losses, row_lse};
}

// A gradient from the float sum of its slabs: times grad_scale / rows (a 0-d device tensor: a
// power of two times 1/rows, so it rounds exactly as multiplying by 1/rows alone did), the
// padding features dropped, in `dtype`.
at::Tensor scaled_gradient(at::Tensor sum, const at::Tensor& grad_scale, int64_t rows,
                           int64_t in_dim, at::ScalarType dtype) {
  const at::Tensor scale = grad_scale * (1.0 / static_cast<double>(rows));
  return first_features(sum.mul_(scale), in_dim).to(dtype);
}

// The symmetric sweep's types: it holds the owned rows resident, which float64 never does.
template <typename F>
void dispatch_symmetric(at::ScalarType type, const F& f) {
  switch (type) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK(false, "icl_msr symmetric contrastive sweep (CUDA): no kernel for ", type);
  }
}

// Whether a single-process problem can take the symmetric sweep: its owned rows must stay
// resident in both kernels (they are the column side's operand) and its gradients fit the
// backward's registers (D <= 128); otherwise it takes the full sweep.
bool symmetric_fits(at::ScalarType type, int64_t dim_a, int64_t dim_b) {
  if (type != at::kFloat && type != at::kHalf && type != at::kBFloat16) return false;
  bool fits = false;
  dispatch_symmetric(type, [&](auto tag) {
    using T = decltype(tag);
    fits = std::max(dim_a, dim_b) <= kSymmetricChunks * kTile &&
           ResidentRows<T>::extra_bytes(TileLayout<T>::kBytes, dim_a, dim_b, kTile) > 0;
  });
  return fits;
}

// Whether the problem takes the symmetric sweep when asked to: one process (the columns are
// the rows, the positives among them) and features that fit it.
bool takes_symmetric_sweep(const ContrastiveInputs& in, int64_t row_offset) {
  return !in.has_cols && !in.positive_logits.defined() && row_offset == 0 &&
         symmetric_fits(in.a.scalar_type(), in.dim_a, in.combine == kCombineNone ? 0 : in.dim_b);
}

// (row blocks, tiles per segment, segments) of the symmetric sweep over `rows` rows: segments
// of about an eighth of a CTA's share of the pairs were they spread over kTargetCtas, so that
// the last CTAs to start end close together.
struct PairLayout {
  int64_t n_blocks, segment_tiles, segments;
};
PairLayout pair_layout(int64_t rows) {
  const int64_t n_blocks = ceil_div(rows, kTile);
  const int64_t pairs = n_blocks * (n_blocks + 1) / 2;
  const int64_t segment_tiles =
      std::max<int64_t>(1, std::min(n_blocks, ceil_div(pairs, 8 * kTargetCtas)));
  return {n_blocks, segment_tiles, ceil_div(n_blocks, segment_tiles)};
}

// Launches a symmetric-sweep kernel whose layout ends at `base`: a CTA a (segment, block)
// ticket, the owned rows resident in the tail (symmetric_fits has checked that they fit).
template <typename T, typename Kernel, typename... Args>
void launch_symmetric(Kernel* kernel, size_t base, const ContrastiveInputs& in, int64_t dim_b,
                      const PairLayout& layout, Args... args) {
  const size_t smem =
      kernel_bytes<T>(base, ResidentRows<T>::extra_bytes(base, in.dim_a, dim_b, kTile));
  allow_shared_memory(kernel, smem);
  kernel<<<dim3(layout.segments * layout.n_blocks), kThreads, smem,
           c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> symmetric_forward(const ContrastiveInputs& in) {
  const int64_t combine = in.combine;
  const int64_t dim_b = combine == kCombineNone ? 0 : in.dim_b;
  const PairLayout layout = pair_layout(in.rows);
  const auto acc_options = in.a.options().dtype(accum_dtype(in.a.scalar_type()));
  // One split per segment for the row sides, the last one for the column sides.
  at::Tensor part_max = at::full({layout.segments + 1, 2, in.rows},
                                 -std::numeric_limits<double>::infinity(), acc_options);
  at::Tensor part_sum = at::zeros({layout.segments + 1, 2, in.rows}, acc_options);
  at::Tensor pos_logit = at::zeros({2, in.rows}, acc_options);
  at::Tensor counters = at::zeros({1 + layout.n_blocks}, in.a.options().dtype(at::kInt));
  dispatch_symmetric(in.a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = accum_t<T>;
    launch_symmetric<T>(contrastive_symmetric_forward_kernel<T>, TileLayout<T>::kSweepBytes, in,
                        dim_b, layout, ptr<T>(in.a), ptr<T>(in.b), in.rows, in.dim_a, dim_b,
                        combine, layout.segment_tiles, layout.segments,
                        counters.data_ptr<int>(), part_max.data_ptr<A>(),
                        part_sum.data_ptr<A>(), pos_logit.data_ptr<A>());
  });
  return finish_forward(part_max, part_sum, pos_logit, combine == kCombineNone ? 1 : 2);
}

std::pair<at::Tensor, at::Tensor> symmetric_backward(const ContrastiveInputs& in,
                                                     const at::Tensor& row_lse,
                                                     const at::Tensor& grad_unit,
                                                     const at::Tensor& grad_scale) {
  const int64_t combine = in.combine;
  const bool with_b = combine != kCombineNone;
  const int64_t dim_b = with_b ? in.dim_b : 0;
  const PairLayout layout = pair_layout(in.rows);
  const auto acc_options = in.a.options().dtype(accum_dtype(in.a.scalar_type()));
  // Separate buffers for the row and the column sides: each is added to in its own order.
  at::Tensor row_a = at::zeros({in.rows, in.dim_a}, acc_options);
  at::Tensor col_a = at::zeros({in.rows, in.dim_a}, acc_options);
  at::Tensor row_b = at::zeros({with_b ? in.rows : 0, dim_b}, acc_options);
  at::Tensor col_b = at::zeros({with_b ? in.rows : 0, dim_b}, acc_options);
  at::Tensor counters = at::zeros({1 + 2 * layout.n_blocks}, in.a.options().dtype(at::kInt));
  dispatch_symmetric(in.a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = accum_t<T>;
    launch_symmetric<T>(contrastive_symmetric_backward_kernel<T>, TileLayout<T>::kBytes, in,
                        dim_b, layout, ptr<T>(in.a), ptr<T>(in.b), in.rows, in.dim_a, dim_b,
                        combine, row_lse.data_ptr<A>(), grad_unit.data_ptr<A>(),
                        layout.segment_tiles, counters.data_ptr<int>(), row_a.data_ptr<A>(),
                        row_b.data_ptr<A>(), col_a.data_ptr<A>(), col_b.data_ptr<A>());
  });
  const auto dtype = in.a.scalar_type();
  at::Tensor grad_a = scaled_gradient(row_a.add_(col_a), grad_scale, in.rows, in.in_dim_a, dtype);
  at::Tensor grad_b;
  if (with_b)
    grad_b = scaled_gradient(row_b.add_(col_b), grad_scale, in.rows, in.in_dim_b, dtype);
  return {grad_a, grad_b};
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
        const size_t smem = kernel_bytes<scalar_t>(base, resident);
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
  const auto dtype = own_a.scalar_type();
  at::Tensor grad_a = scaled_gradient(slab_a.sum(0), grad_scale, in.rows, in.in_dim_a, dtype);
  at::Tensor grad_b;
  if (combine != kCombineNone)
    grad_b = scaled_gradient(slab_b.sum(0), grad_scale, in.rows, in.in_dim_b, dtype);
  return {grad_a, grad_b};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> contrastive_forward(
    const at::Tensor& a_in, const std::optional<at::Tensor>& b_in,
    const std::optional<at::Tensor>& a_cols_in, const std::optional<at::Tensor>& b_cols_in,
    const std::optional<at::Tensor>& positive_logits_in, int64_t row_offset,
    c10::string_view combine_name, bool symmetric) {
  const ContrastiveInputs in = check_contrastive(a_in, b_in, a_cols_in, b_cols_in,
                                                 positive_logits_in, row_offset, combine_name);
  const int64_t combine = in.combine;
  const bool explicit_positive = in.positive_logits.defined();
  const c10::cuda::CUDAGuard guard(in.a.device());
  if (symmetric && takes_symmetric_sweep(in, row_offset)) return symmetric_forward(in);
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
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.a.scalar_type(), "icl_msr contrastive_forward (CUDA)", [&] {
        using A = accum_t<scalar_t>;
        auto* kernel = contrastive_forward_kernel<scalar_t>;
        constexpr size_t base = TileLayout<scalar_t>::kSweepBytes;
        const size_t resident = ResidentRows<scalar_t>::extra_bytes(
            base, in.dim_a, combine == kCombineNone ? 0 : in.dim_b);
        const size_t smem = kernel_bytes<scalar_t>(base, resident);
        allow_shared_memory(kernel, smem);
        kernel<<<dim3(row_blocks, split.splits), kThreads, smem, stream>>>(
            ptr<scalar_t>(in.a), ptr<scalar_t>(in.b), ptr<scalar_t>(a_cols),
            ptr<scalar_t>(b_cols), in.rows, in.cols, in.dim_a, in.dim_b, row_offset, combine,
            explicit_positive, split.tiles_per_split, resident > 0, part_max.data_ptr<A>(),
            part_sum.data_ptr<A>(), pos_logit.data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return finish_forward(part_max, part_sum, pos_logit, combine == kCombineNone ? 1 : 2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_backward(
    const at::Tensor& grad_losses_in, const at::Tensor& a_in, const std::optional<at::Tensor>& b_in,
    const std::optional<at::Tensor>& a_cols_in, const std::optional<at::Tensor>& b_cols_in,
    const std::optional<at::Tensor>& positive_logits_in, const at::Tensor& row_lse_in,
    int64_t row_offset, c10::string_view combine_name, bool column_grads, bool symmetric) {
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
  if (symmetric && takes_symmetric_sweep(in, row_offset)) {
    std::tie(grad_a, grad_b) = symmetric_backward(in, row_lse, grad_unit, grad_scale);
  } else if (!in.has_cols) {
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
