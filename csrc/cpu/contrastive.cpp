// Fused NT-Xent of both terms on the CPU: icl_msr::contrastive_forward / contrastive_backward
// (docs/math.md §2 steps 7-8, §3-4; schemas in csrc/ops.cpp).
//
// Features arrive pre-scaled by 1/sqrt(tau), so a tile's products are the logits themselves:
// base = a_i a_jᵀ and the interventional logits ("concat": base + b_i b_jᵀ, "add": b_i b_jᵀ).
// The logits are only ever held as row-block x column-block tiles: the forward keeps each row's
// running (max, sum of exp) per term and saves the row log-sum-exps; the backward recomputes each
// tile and turns it, in place, into its gradient coefficients, which two BLAS products apply to
// the feature rows.
//
// Square mode (a_cols None, the single-process case) uses the symmetry of the logits: a tile
// (i, j) of row blocks is computed once for the unordered pair {i, j}. Its rows feed the
// statistics of block i and its columns those of block j; in the backward its coefficients are
// G_ij + G_jiᵀ (each row's softmax with its own lse, docs/math.md §3), which give dA_i += T A_j and
// dA_j += Tᵀ A_i. The pairs are visited in rounds in which no block appears twice (a round-robin
// schedule), so the tasks of a round write disjoint rows: no atomics, and every row accumulates
// its contributions in an order fixed by the schedule, not by the threads (bit-identical
// results from run to run).
//
// Rectangular mode (a_cols given: rows on this rank, columns gathered from all ranks, or the
// negatives of a memory bank) has no symmetry to use: the forward and the row gradients sweep row
// blocks over all column blocks, and a second sweep over column blocks produces the column
// gradients, again without atomics. With explicit positive logits (memory-bank mode) no column is
// masked or positive: each row's positive is one extra logit that starts its running
// log-sum-exp, and the gradient of that logit is taken in Python (kernels/ops.py).
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/cpu_common.h"
#include "tile_math.h"

namespace icl_msr::cpu {
namespace {

// Rows per block (at most). The time goes into the tile products (the elementwise passes are
// ~10% of it); larger tiles amortise the BLAS's packing of its operands over more work, up to the
// point where a tile pair no longer fits the caches. Measured single-threaded, forward+backward
// at 8192 rows, D = 128 ("concat"): 128: 1.00 s, 256: 0.88 s, 512: 0.86 s, 1024: 0.89 s.
constexpr int64_t kBlockRows = 512;

// The checked operands of one call in the accumulation dtype. In square mode the columns are the
// rows themselves (a_cols, b_cols alias a, b).
struct Contrastive {
  at::Tensor a, b, a_cols, b_cols;
  at::Tensor positive_logits;  // (2, rows), defined in memory-bank mode
  int64_t rows = 0, cols = 0, row_offset = 0;
  Combine mode = kCombineNone;
  bool square = true;
  bool explicit_positive = false;
  bool has_int() const { return mode != kCombineNone; }
  int64_t terms() const { return has_int() ? 2 : 1; }
};

Contrastive prepare(const at::Tensor& a, const std::optional<at::Tensor>& b,
                    const std::optional<at::Tensor>& a_cols,
                    const std::optional<at::Tensor>& b_cols,
                    const std::optional<at::Tensor>& positive_logits, int64_t row_offset,
                    c10::string_view combine) {
  TORCH_CHECK(a.device().is_cpu(), "a must be a CPU tensor for the CPU kernels, got one on ",
              a.device());
  const ContrastiveShape shape =
      check_contrastive_args(a, b, a_cols, b_cols, positive_logits, row_offset, combine);
  const auto acc = accum_dtype(a.scalar_type());
  Contrastive p;
  p.mode = shape.combine;
  p.rows = shape.rows;
  p.cols = shape.cols;
  p.row_offset = row_offset;
  p.square = shape.square;
  p.explicit_positive = shape.explicit_positive;
  if (p.explicit_positive) p.positive_logits = to_acc(*positive_logits, acc);
  p.a = to_acc(a, acc);
  if (shape.uses_b) p.b = to_acc(*b, acc);
  if (p.square) {
    p.a_cols = p.a;
    p.b_cols = p.b;
  } else {
    p.a_cols = to_acc(*a_cols, acc);
    if (shape.uses_b) p.b_cols = to_acc(*b_cols, acc);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// Tile visiting orders.

// Square mode: the row blocks. Their count is a multiple of 4 (when there is more than one), so
// that every round of the schedule below splits evenly over 2 or 4 threads.
Blocks square_blocks(int64_t rows) {
  const int64_t count = (rows + kBlockRows - 1) / kBlockRows;
  return Blocks(rows, count == 1 ? 1 : (count + 3) / 4 * 4);
}

Blocks blocks_of(int64_t rows) { return Blocks(rows, (rows + kBlockRows - 1) / kBlockRows); }

using Round = std::vector<std::pair<int64_t, int64_t>>;

// Every unordered pair {i, j} of n blocks, i <= j, diagonal included, once, grouped in rounds
// in which no block appears twice (the circle method). With m odd, round r pairs r + k with
// r - k (mod m) for k = 1 .. (m-1)/2 and leaves r alone; r then takes its diagonal tile (n = m)
// or meets the extra block n - 1 (n = m + 1, and a last round holds the diagonal tiles).
std::vector<Round> tile_rounds(int64_t n) {
  const int64_t m = n % 2 == 1 ? n : n - 1;
  std::vector<Round> rounds;
  for (int64_t r = 0; r < m; ++r) {
    Round round;
    round.emplace_back(r, n == m ? r : n - 1);
    for (int64_t k = 1; k <= (m - 1) / 2; ++k) {
      const int64_t i = (r + k) % m, j = (r - k + m) % m;
      round.emplace_back(std::min(i, j), std::max(i, j));
    }
    rounds.push_back(std::move(round));
  }
  if (n != m) {
    Round diagonal;
    for (int64_t i = 0; i < n; ++i) diagonal.emplace_back(i, i);
    rounds.push_back(std::move(diagonal));
  }
  return rounds;
}

// ---------------------------------------------------------------------------------------------
// One tile.

// A thread's tile buffers: the base and interventional logit tiles (rows x cols, row-major),
// overwritten in the backward by their gradient coefficients, and per-row/column scratch.
template <typename T>
struct Tile {
  at::Tensor base, inter;
  T* row_scratch;   // rows
  T* col_scratch;   // cols
  T* col_scratch2;  // cols
};

int64_t tile_scratch_elems(int64_t max_rows, int64_t max_cols) {
  return 2 * max_rows * max_cols + max_rows + 2 * max_cols;
}

template <typename T>
Tile<T> tile_buffers(const at::Tensor& flat, int64_t max_rows, int64_t max_cols, Block ri,
                     Block cj) {
  const int64_t area = max_rows * max_cols;
  T* scratch = flat.data_ptr<T>() + 2 * area;
  return {matrix(flat, 0, ri.size, cj.size), matrix(flat, area, ri.size, cj.size), scratch,
          scratch + max_rows, scratch + max_rows + max_cols};
}

// The logits of rows ri against columns cj: base = a_i a_jᵀ; inter = the interventional logits.
template <typename T>
void compute_logits(const Contrastive& p, Block ri, Block cj, Tile<T>& tile) {
  const auto a_i = p.a.narrow(0, ri.begin, ri.size);
  const auto a_j = p.a_cols.narrow(0, cj.begin, cj.size);
  at::mm_out(tile.base, a_i, a_j.t());
  if (!p.has_int()) return;
  const auto b_i = p.b.narrow(0, ri.begin, ri.size);
  const auto b_j = p.b_cols.narrow(0, cj.begin, cj.size);
  if (p.mode == kCombineConcat) {
    at::addmm_out(tile.inter, tile.base, b_i, b_j.t());
  } else {
    at::mm_out(tile.inter, b_i, b_j.t());
  }
}

// Calls f(r, c, anchor) for each tile entry (local row r, local column c) that is the positive
// logit of some anchor row: row ri.begin + r's positive column and, in square mode, where the
// tile also stands for its transpose, column cj.begin + c's positive row.
template <typename F>
void for_each_positive(const Contrastive& p, Block ri, Block cj, const F& f) {
  if (p.explicit_positive) return;  // the positives are not among the columns
  for (int64_t r = 0; r < ri.size; ++r) {
    const int64_t c = positive_column(ri.begin + r, p.rows, p.row_offset) - cj.begin;
    if (c >= 0 && c < cj.size) f(r, c, ri.begin + r);
  }
  if (!p.square) return;
  for (int64_t c = 0; c < cj.size; ++c) {
    const int64_t r = positive_column(cj.begin + c, p.rows, 0) - ri.begin;
    if (r >= 0 && r < ri.size) f(r, c, cj.begin + c);
  }
}

// Calls f(r, c) for each tile entry that is a row's own (excluded) column.
template <typename F>
void for_each_self(const Contrastive& p, Block ri, Block cj, const F& f) {
  if (p.explicit_positive) return;  // the rows are not among the columns
  for (int64_t r = 0; r < ri.size; ++r) {
    const int64_t c = self_column(ri.begin + r, p.row_offset) - cj.begin;
    if (c >= 0 && c < cj.size) f(r, c);
  }
}

// ---------------------------------------------------------------------------------------------
// One exponential per tile entry.
//
// Both the forward statistics and the square backward coefficients need, for each entry, an
// exponential relative to its row and one relative to its column. Both come from a single
// exp(s - ref) with one reference per tile, scaled per row and column, when the references of
// the rows and columns lie within kShiftRange of ref: then no sum or factor leaves the dtype's
// range, and every term within ~20 (float) of its row's largest stays far above exp's underflow,
// so what is lost is below the dtype's rounding. Otherwise (extreme logit ranges, masked rows,
// NaN or Inf) the tile takes the exact path with two exponentials per entry.
template <typename T>
constexpr T kShiftRange = std::is_same_v<T, float> ? T(64) : T(600);

// Running (max, sum of exp(v - max)) of a block of rows, as lse_merge keeps them.
template <typename T>
struct RunningLse {
  T* max;  // nullptr: not tracked
  T* sum;
};

// Exact path: maxima first, then sums of exp(s - max) per row and per column (cols.max given:
// square mode, whose tile also stands for its transpose). A row or column whose entries are all
// masked (-inf) has max -inf and is left unchanged.
template <typename T>
void merge_stats_exact(const T* s, int64_t rows, int64_t cols, Tile<T>& tile, RunningLse<T> row,
                       RunningLse<T> col) {
  const bool with_cols = col.max != nullptr;
  T* row_max = tile.row_scratch;
  T* col_max = tile.col_scratch;
  T* col_sum = tile.col_scratch2;
  std::fill(col_max, col_max + cols, neg_inf<T>());
  std::fill(col_sum, col_sum + cols, T(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* s_row = s + r * cols;
    T m = neg_inf<T>();
    if (with_cols) {
#pragma omp simd reduction(max : m)
      for (int64_t c = 0; c < cols; ++c) {
        m = std::max(m, s_row[c]);
        col_max[c] = std::max(col_max[c], s_row[c]);
      }
    } else {
#pragma omp simd reduction(max : m)
      for (int64_t c = 0; c < cols; ++c) m = std::max(m, s_row[c]);
    }
    row_max[r] = m;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* s_row = s + r * cols;
    const T m = row_max[r];
    T sum = 0;
    if (with_cols) {
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < cols; ++c) {
        sum += exp_vec(s_row[c] - m);
        col_sum[c] += exp_vec(s_row[c] - col_max[c]);
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < cols; ++c) sum += exp_vec(s_row[c] - m);
    }
    lse_merge(row.max[r], row.sum[r], m, sum);
  }
  if (!with_cols) return;
  for (int64_t c = 0; c < cols; ++c) lse_merge(col.max[c], col.sum[c], col_max[c], col_sum[c]);
}

// Fast path: with `bound` >= every entry (Cauchy-Schwarz on the feature norms), the sums of
// exp(s - bound) per row and column, one pass and one exponential per entry. Merges nothing and
// returns false when some sum is below exp(-kShiftRange) (its entries lie far below the bound,
// or are all masked, or NaN).
template <typename T>
bool merge_stats_bounded(const T* s, int64_t rows, int64_t cols, T bound, Tile<T>& tile,
                         RunningLse<T> row, RunningLse<T> col) {
  const bool with_cols = col.max != nullptr;
  T* row_sum = tile.row_scratch;
  T* col_sum = tile.col_scratch;
  std::fill(col_sum, col_sum + cols, T(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* s_row = s + r * cols;
    T sum = 0;
    if (with_cols) {
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < cols; ++c) {
        const T e = exp_vec(s_row[c] - bound);
        sum += e;
        col_sum[c] += e;
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < cols; ++c) sum += exp_vec(s_row[c] - bound);
    }
    row_sum[r] = sum;
  }
  const T min_sum = std::exp(-kShiftRange<T>);
  auto trusted = [&](const T* sums, int64_t n) {
    return std::all_of(sums, sums + n, [&](T v) { return v >= min_sum; });
  };
  if (!trusted(row_sum, rows) || (with_cols && !trusted(col_sum, cols))) return false;
  for (int64_t r = 0; r < rows; ++r) lse_merge(row.max[r], row.sum[r], bound, row_sum[r]);
  if (with_cols) {
    for (int64_t c = 0; c < cols; ++c) lse_merge(col.max[c], col.sum[c], bound, col_sum[c]);
  }
  return true;
}

// Merges a (rows x cols) logit tile into the running statistics of its rows and, when col.max
// is given, of its columns.
template <typename T>
void merge_tile_stats(const T* s, int64_t rows, int64_t cols, T bound, Tile<T>& tile,
                      RunningLse<T> row, RunningLse<T> col) {
  if (!merge_stats_bounded(s, rows, cols, bound, tile, row, col)) {
    merge_stats_exact(s, rows, cols, tile, row, col);
  }
}

// Turns a logit tile, in place, into its NT-Xent gradient coefficients without the positive and
// self corrections: scale * exp(s - lse_row) (the anchor rows' softmax, docs/math.md §3), plus
// scale * exp(s - lse_col) when kCols (square mode: the transposed tile's softmax), plus add[]
// when kAdd ("concat": the interventional coefficients of the same entries).
template <typename T, bool kCols, bool kAdd>
void coefficients_exact(T* s, int64_t rows, int64_t cols, const T* lse_rows, const T* lse_cols,
                        T scale, const T* add) {
  for (int64_t r = 0; r < rows; ++r) {
    T* s_row = s + r * cols;
    const T* add_row = kAdd ? add + r * cols : nullptr;
    const T lse_r = lse_rows[r];
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      T v = exp_vec(s_row[c] - lse_r);
      if constexpr (kCols) v += exp_vec(s_row[c] - lse_cols[c]);
      v *= scale;
      if constexpr (kAdd) v += add_row[c];
      s_row[c] = v;
    }
  }
}

// The same for kCols with one exponential per entry: exp(s - lse_r) + exp(s - lse_c)
// = exp(s - ref) (u_r + v_c), u_r = exp(ref - lse_r), v_c = exp(ref - lse_c), ref the largest
// lse of the tile's rows and columns (every entry but the self ones is <= its row's and its
// column's lse). Returns false, leaving the tile unchanged, when the lse spread exceeds
// kShiftRange.
template <typename T, bool kAdd>
bool coefficients_shared_exp(T* s, int64_t rows, int64_t cols, const T* lse_rows,
                             const T* lse_cols, T scale, const T* add, Tile<T>& tile) {
  const auto [row_lo, row_hi] = std::minmax_element(lse_rows, lse_rows + rows);
  const auto [col_lo, col_hi] = std::minmax_element(lse_cols, lse_cols + cols);
  const T ref = std::max(*row_hi, *col_hi);
  // Negated so that NaN fails the test.
  if (!(ref - std::min(*row_lo, *col_lo) <= kShiftRange<T>)) return false;
  T* u = tile.row_scratch;
  T* v = tile.col_scratch;
  for (int64_t r = 0; r < rows; ++r) u[r] = scale * std::exp(ref - lse_rows[r]);
  for (int64_t c = 0; c < cols; ++c) v[c] = scale * std::exp(ref - lse_cols[c]);
  for (int64_t r = 0; r < rows; ++r) {
    T* s_row = s + r * cols;
    const T* add_row = kAdd ? add + r * cols : nullptr;
    const T u_r = u[r];
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      T w = exp_vec(s_row[c] - ref) * (u_r + v[c]);
      if constexpr (kAdd) w += add_row[c];
      s_row[c] = w;
    }
  }
  return true;
}

template <typename T, bool kAdd>
void coefficients(T* s, int64_t rows, int64_t cols, const T* lse_rows, const T* lse_cols,
                  T scale, const T* add, Tile<T>& tile) {
  if (lse_cols == nullptr) {
    return coefficients_exact<T, false, kAdd>(s, rows, cols, lse_rows, lse_cols, scale, add);
  }
  if (!coefficients_shared_exp<T, kAdd>(s, rows, cols, lse_rows, lse_cols, scale, add, tile)) {
    coefficients_exact<T, true, kAdd>(s, rows, cols, lse_rows, lse_cols, scale, add);
  }
}

// Gradient coefficients of one term's tile: `coefficients` (adding add[] when given), then the
// self entries (excluded from the softmax) set to 0 and the positive indicator subtracted:
// ntxent_grad_coef of tile_math.h, summed over the tile and its transpose in square mode.
template <typename T>
void term_coefficients(const Contrastive& p, Block ri, Block cj, T* s, const T* lse, T scale,
                       const T* add, Tile<T>& tile) {
  const T* lse_rows = lse + ri.begin;
  const T* lse_cols = p.square ? lse + cj.begin : nullptr;
  if (add != nullptr) {
    coefficients<T, true>(s, ri.size, cj.size, lse_rows, lse_cols, scale, add, tile);
  } else {
    coefficients<T, false>(s, ri.size, cj.size, lse_rows, lse_cols, scale, add, tile);
  }
  for_each_self(p, ri, cj, [&](int64_t r, int64_t c) { s[r * cj.size + c] = T(0); });
  for_each_positive(p, ri, cj,
                    [&](int64_t r, int64_t c, int64_t) { s[r * cj.size + c] -= scale; });
}

// Both terms' coefficient tiles of rows ri x columns cj, from the saved row log-sum-exps
// (2 x rows) and scale[t] = dLoss/dL_t / rows. Afterwards tile.base multiplies the a features
// ("concat": base + interventional coefficients, as both terms' logits contain a·a') and
// tile.inter the b features.
template <typename T>
void gradient_tile(const Contrastive& p, Block ri, Block cj, Tile<T>& tile, const T* row_lse,
                   const T* scale) {
  compute_logits(p, ri, cj, tile);
  T* base = tile.base.template data_ptr<T>();
  T* inter = p.has_int() ? tile.inter.template data_ptr<T>() : nullptr;
  if (p.has_int()) {
    term_coefficients<T>(p, ri, cj, inter, row_lse + p.rows, scale[1], nullptr, tile);
  }
  term_coefficients<T>(p, ri, cj, base, row_lse, scale[0],
                       p.mode == kCombineConcat ? inter : nullptr, tile);
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename T>
void forward_impl(const Contrastive& p, T* losses, T* row_lse) {
  const int64_t rows = p.rows;
  // Per term t (0 base, 1 interventional), entries t * rows + row.
  // The running statistics are the negatives' only: the positive is merged in at the end
  // (ntxent_row_term).
  std::vector<T> run_max(2 * rows, neg_inf<T>()), run_sum(2 * rows, T(0)), pos(2 * rows, T(0));
  if (p.explicit_positive) {
    const T* given = p.positive_logits.data_ptr<T>();
    std::copy(given, given + 2 * rows, pos.begin());
  }

  // A bound on the logits of a tile, from the features' row norms (Cauchy-Schwarz).
  auto norms = [](const at::Tensor& x) {
    return x.defined() ? at::linalg_vector_norm(x, 2, {1}) : at::Tensor();
  };
  const at::Tensor norm_a = norms(p.a), norm_b = norms(p.b);
  const at::Tensor norm_a_cols = p.square ? norm_a : norms(p.a_cols);
  const at::Tensor norm_b_cols = p.square ? norm_b : norms(p.b_cols);
  auto max_norm = [](const at::Tensor& n, Block blk) {
    const T* v = n.data_ptr<T>();
    return *std::max_element(v + blk.begin, v + blk.end());
  };
  auto logit_bound = [&](int64_t term, Block ri, Block cj) {
    const T base = max_norm(norm_a, ri) * max_norm(norm_a_cols, cj);
    if (term == 0) return base;
    const T second = max_norm(norm_b, ri) * max_norm(norm_b_cols, cj);
    return p.mode == kCombineConcat ? base + second : second;
  };

  // Merges tile (ri, cj) into the statistics; with_cols for the square pair tiles i != j.
  auto visit = [&](Block ri, Block cj, Tile<T>& tile, bool with_cols) {
    compute_logits(p, ri, cj, tile);
    for (int64_t t = 0; t < p.terms(); ++t) {
      T* s = (t == 0 ? tile.base : tile.inter).template data_ptr<T>();
      const int64_t o = t * rows;
      // The positive logits are read, then masked out with the self logits. (In square mode an
      // entry is row r's positive exactly when it is column c's, so one mask serves both.)
      for_each_positive(p, ri, cj, [&](int64_t r, int64_t c, int64_t anchor) {
        pos[o + anchor] = s[r * cj.size + c];
      });
      for_each_positive(p, ri, cj, [&](int64_t r, int64_t c, int64_t) {
        s[r * cj.size + c] = neg_inf<T>();
      });
      for_each_self(p, ri, cj, [&](int64_t r, int64_t c) { s[r * cj.size + c] = neg_inf<T>(); });
      const RunningLse<T> row_stats{&run_max[o + ri.begin], &run_sum[o + ri.begin]};
      const RunningLse<T> col_stats{with_cols ? &run_max[o + cj.begin] : nullptr,
                                    with_cols ? &run_sum[o + cj.begin] : nullptr};
      merge_tile_stats(s, ri.size, cj.size, logit_bound(t, ri, cj), tile, row_stats, col_stats);
    }
  };

  if (p.square) {
    const Blocks blocks = square_blocks(rows);
    const int64_t bmax = blocks.max_size();
    ThreadScratch scratch(tile_scratch_elems(bmax, bmax), p.a.scalar_type());
    for (const Round& round : tile_rounds(blocks.count())) {
      parallel_tasks(static_cast<int64_t>(round.size()), [&](int64_t t) {
        const auto [i, j] = round[t];
        auto tile = tile_buffers<T>(scratch.get(), bmax, bmax, blocks[i], blocks[j]);
        visit(blocks[i], blocks[j], tile, i != j);
      });
    }
  } else {
    const Blocks row_blocks = blocks_of(rows), col_blocks = blocks_of(p.cols);
    const int64_t rmax = row_blocks.max_size(), cmax = col_blocks.max_size();
    ThreadScratch scratch(tile_scratch_elems(rmax, cmax), p.a.scalar_type());
    parallel_tasks(row_blocks.count(), [&](int64_t i) {
      for (int64_t j = 0; j < col_blocks.count(); ++j) {
        auto tile = tile_buffers<T>(scratch.get(), rmax, cmax, row_blocks[i], col_blocks[j]);
        visit(row_blocks[i], col_blocks[j], tile, false);
      }
    });
  }

  // L_t = mean over rows of (lse - positive logit), summed in float64 in row order.
  for (int64_t t = 0; t < p.terms(); ++t) {
    double total = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = t * rows + r;
      const T term = ntxent_row_term(lse_finish(run_max[i], run_sum[i]), pos[i]);
      row_lse[i] = pos[i] + term;
      total += static_cast<double>(term);
    }
    losses[t] = static_cast<T>(total / static_cast<double>(rows));
  }
}

std::tuple<at::Tensor, at::Tensor> contrastive_forward(
    const at::Tensor& a, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& a_cols, const std::optional<at::Tensor>& b_cols,
    const std::optional<at::Tensor>& positive_logits, int64_t row_offset,
    c10::string_view combine) {
  const Contrastive p = prepare(a, b, a_cols, b_cols, positive_logits, row_offset, combine);
  const auto opts = p.a.options();
  // Zeros: the interventional entries stay 0 when combine is "none".
  at::Tensor losses = at::zeros({2}, opts), row_lse = at::zeros({2, p.rows}, opts);
  AT_DISPATCH_FLOATING_TYPES(p.a.scalar_type(), "icl_msr::contrastive_forward", [&] {
    forward_impl<scalar_t>(p, losses.data_ptr<scalar_t>(), row_lse.data_ptr<scalar_t>());
  });
  return {losses, row_lse};
}

// ---------------------------------------------------------------------------------------------
// Backward.

// Accumulates the gradients of the a and b features (rows, or columns with `transposed`) of one
// coefficient tile: grad_x[rows ri] += T x[cols cj], or grad_x[cols cj] += Tᵀ x[rows ri].
template <typename T>
void apply_tile(const Contrastive& p, Block ri, Block cj, const Tile<T>& tile, bool transposed,
                at::Tensor& grad_a, at::Tensor& grad_b) {
  auto apply = [&](const at::Tensor& coef, const at::Tensor& rows_x, const at::Tensor& cols_x,
                   at::Tensor& grad) {
    if (transposed) {
      grad.narrow(0, cj.begin, cj.size).addmm_(coef.t(), rows_x.narrow(0, ri.begin, ri.size));
    } else {
      grad.narrow(0, ri.begin, ri.size).addmm_(coef, cols_x.narrow(0, cj.begin, cj.size));
    }
  };
  apply(tile.base, p.a, p.a_cols, grad_a);
  if (p.has_int()) apply(tile.inter, p.b, p.b_cols, grad_b);
}

template <typename T>
void backward_impl(const Contrastive& p, const T* row_lse, const T* scale, at::Tensor& grad_a,
                   at::Tensor& grad_b, at::Tensor& grad_a_cols, at::Tensor& grad_b_cols) {
  if (p.square) {
    const Blocks blocks = square_blocks(p.rows);
    const int64_t bmax = blocks.max_size();
    ThreadScratch scratch(tile_scratch_elems(bmax, bmax), p.a.scalar_type());
    for (const Round& round : tile_rounds(blocks.count())) {
      parallel_tasks(static_cast<int64_t>(round.size()), [&](int64_t t) {
        const auto [i, j] = round[t];
        auto tile = tile_buffers<T>(scratch.get(), bmax, bmax, blocks[i], blocks[j]);
        gradient_tile(p, blocks[i], blocks[j], tile, row_lse, scale);
        apply_tile(p, blocks[i], blocks[j], tile, false, grad_a, grad_b);
        // The tile also stands for tile (j, i) = its transpose (G + Gᵀ is symmetric).
        if (i != j) apply_tile(p, blocks[i], blocks[j], tile, true, grad_a, grad_b);
      });
    }
    return;
  }
  const Blocks row_blocks = blocks_of(p.rows), col_blocks = blocks_of(p.cols);
  const int64_t rmax = row_blocks.max_size(), cmax = col_blocks.max_size();
  ThreadScratch scratch(tile_scratch_elems(rmax, cmax), p.a.scalar_type());
  // Each row block owns its gradient rows...
  parallel_tasks(row_blocks.count(), [&](int64_t i) {
    for (int64_t j = 0; j < col_blocks.count(); ++j) {
      auto tile = tile_buffers<T>(scratch.get(), rmax, cmax, row_blocks[i], col_blocks[j]);
      gradient_tile(p, row_blocks[i], col_blocks[j], tile, row_lse, scale);
      apply_tile(p, row_blocks[i], col_blocks[j], tile, false, grad_a, grad_b);
    }
  });
  // ...and each column block its gradient columns: the tiles are recomputed rather than the
  // two sweeps writing the same rows.
  parallel_tasks(col_blocks.count(), [&](int64_t j) {
    for (int64_t i = 0; i < row_blocks.count(); ++i) {
      auto tile = tile_buffers<T>(scratch.get(), rmax, cmax, row_blocks[i], col_blocks[j]);
      gradient_tile(p, row_blocks[i], col_blocks[j], tile, row_lse, scale);
      apply_tile(p, row_blocks[i], col_blocks[j], tile, true, grad_a_cols, grad_b_cols);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_backward(
    const at::Tensor& grad_losses, const at::Tensor& a, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& a_cols, const std::optional<at::Tensor>& b_cols,
    const std::optional<at::Tensor>& positive_logits, const at::Tensor& row_lse,
    int64_t row_offset, c10::string_view combine) {
  const Contrastive p = prepare(a, b, a_cols, b_cols, positive_logits, row_offset, combine);
  const auto acc = p.a.scalar_type();
  check_contrastive_backward_args(grad_losses, row_lse, a);
  const at::Tensor lse = to_acc(row_lse, acc);
  const at::Tensor g = to_acc(grad_losses, acc);

  auto zeros_like_acc = [&](const at::Tensor& t) {
    return t.defined() ? at::zeros_like(t) : at::Tensor();
  };
  at::Tensor grad_a = at::zeros_like(p.a), grad_b = zeros_like_acc(p.b);
  at::Tensor grad_a_cols = p.square ? at::Tensor() : zeros_like_acc(p.a_cols);
  at::Tensor grad_b_cols = p.square ? at::Tensor() : zeros_like_acc(p.b_cols);
  AT_DISPATCH_FLOATING_TYPES(acc, "icl_msr::contrastive_backward", [&] {
    const scalar_t inv_rows = scalar_t(1) / static_cast<scalar_t>(p.rows);
    const scalar_t scale[2] = {g.data_ptr<scalar_t>()[0] * inv_rows,
                               g.data_ptr<scalar_t>()[1] * inv_rows};
    backward_impl<scalar_t>(p, lse.data_ptr<scalar_t>(), scale, grad_a, grad_b, grad_a_cols,
                            grad_b_cols);
  });

  // In the inputs' dtypes; an input that was None gets an empty gradient, one that was given
  // but not read (b with combine "none") a zero gradient.
  auto result = [&](const at::Tensor& grad, const std::optional<at::Tensor>& input) {
    if (!input.has_value()) return at::empty({0}, a.options());
    return grad.defined() ? like_input(grad, *input) : at::zeros_like(*input);
  };
  return {like_input(grad_a, a), result(grad_b, b), result(grad_a_cols, a_cols),
          result(grad_b_cols, b_cols)};
}

}  // namespace

TORCH_LIBRARY_IMPL(icl_msr, CPU, m) {
  m.impl("contrastive_forward", &contrastive_forward);
  m.impl("contrastive_backward", &contrastive_backward);
}

}  // namespace icl_msr::cpu
