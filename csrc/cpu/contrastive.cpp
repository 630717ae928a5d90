// Fused NT-Xent of both terms on the CPU: icl_msr::contrastive_forward / contrastive_backward
// (docs/math.md §2 steps 7-8, §3-4; schemas in csrc/ops.cpp).
//
// Features arrive pre-scaled by 1/sqrt(tau), so a tile's products are the logits themselves:
// base = a_i a_jᵀ and the interventional logits ("concat": base + b_i b_jᵀ, "add": b_i b_jᵀ).
// The logits are only ever held as row-block x column-block tiles: the forward keeps each row's
// running (max, sum of exp) per term and saves the row log-sum-exps; the backward recomputes each
// tile and turns it, in place, into its gradient coefficients, which two BLAS products apply to
// the feature rows. The elementwise passes over a tile are tile_passes.h's, compiled for AVX2 and
// for the baseline and chosen at run time.
//
// Both modes visit their tiles through one schedule (TileSchedule): rounds run one after the
// other, the tasks of a round in parallel, each task's tiles in order, and no two tasks of a round
// write the same rows. Each visit accumulates into its rows and/or its columns. So there are no
// atomics, and every row accumulates its contributions in an order fixed by the schedule, which
// depends on the sizes only (and the BLAS runs single-threaded inside the tasks, parallel_tasks):
// results are bit-identical from run to run and for any thread count.
//
// Square mode (a_cols None, the single-process case) uses the symmetry of the logits: a tile
// (i, j) of row blocks is computed once for the unordered pair {i, j}. Its rows feed the
// statistics of block i and its columns those of block j; in the backward its coefficients are
// G_ij + G_jiᵀ (each row's softmax with its own lse, docs/math.md §3), which give dA_i += T A_j and
// dA_j += Tᵀ A_i. The pairs are visited in rounds in which no block appears twice (a round-robin
// schedule), so the tasks of a round write disjoint rows.
//
// Rectangular mode (a_cols given: rows on this rank, columns gathered from all ranks, or the
// negatives of a memory bank) has no symmetry to use: the forward and the row gradients sweep row
// blocks over all column blocks, and a second sweep over column blocks produces the column
// gradients, again without atomics. With explicit positive logits (memory-bank mode) no column is
// masked or positive: each row's positive is one extra logit that starts its running
// log-sum-exp, and the gradient of that logit is taken in Python (kernels/ops.py).
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/tile_passes.h"
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
  // Rows come in groups of the two views stacked (all the rows, or one rank's in the split
  // sweep): row r's positive is the other view of its sample, in its group.
  int64_t group_rows = 0;
  Combine mode = kCombineNone;
  bool square = true;
  bool explicit_positive = false;
  // The split sweep's pair tiles: positive entries are masked like the self ones and get no
  // coefficient (the rank that owns a row adds its positive's gradient).
  bool positives_elsewhere = false;
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
  p.group_rows = shape.rows;
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
// The tile schedule.

// Square mode: the row blocks. Their count is a multiple of 4 (when there is more than one), so
// that every round of the schedule below splits evenly over 2 or 4 threads.
Blocks square_blocks(int64_t rows) {
  const int64_t count = (rows + kBlockRows - 1) / kBlockRows;
  return Blocks(rows, count == 1 ? 1 : (count + 3) / 4 * 4);
}

Blocks blocks_of(int64_t rows) { return Blocks(rows, (rows + kBlockRows - 1) / kBlockRows); }

// One tile visit: the rows of row block i against the columns of column block j, accumulated
// into the statistics or gradients of its rows (to_rows) and of its columns (to_cols: in square
// mode a pair tile i != j, which also stands for its transpose, the tile of block j's rows; in
// rectangular mode the column sweep, which gives the column gradients).
struct TileVisit {
  int64_t i, j;
  bool to_rows, to_cols;
};
using Task = std::vector<TileVisit>;  // visited in order, on one thread
using Round = std::vector<Task>;      // tasks that run in parallel, writing disjoint rows

// Every unordered pair {i, j} of n blocks, i <= j, diagonal included, once, grouped in rounds
// in which no block appears twice (the circle method): one task per pair. With m odd, round r
// pairs r + k with r - k (mod m) for k = 1 .. (m-1)/2 and leaves r alone; r then takes its
// diagonal tile (n = m) or meets the extra block n - 1 (n = m + 1, and a last round holds the
// diagonal tiles).
std::vector<Round> square_rounds(int64_t n) {
  auto pair = [](int64_t i, int64_t j) {
    return Task{{std::min(i, j), std::max(i, j), true, i != j}};
  };
  const int64_t m = n % 2 == 1 ? n : n - 1;
  std::vector<Round> rounds;
  for (int64_t r = 0; r < m; ++r) {
    Round round{pair(r, n == m ? r : n - 1)};
    for (int64_t k = 1; k <= (m - 1) / 2; ++k) round.push_back(pair((r + k) % m, (r - k + m) % m));
    rounds.push_back(std::move(round));
  }
  if (n != m) {
    Round diagonal;
    for (int64_t i = 0; i < n; ++i) diagonal.push_back(pair(i, i));
    rounds.push_back(std::move(diagonal));
  }
  return rounds;
}

enum class Sweep { kRows, kRowsThenColumns, kColumns };

// Rectangular mode: a row sweep (one task per row block, over all column blocks) and, for the
// column gradients, a column sweep (one task per column block, over all row blocks) that
// recomputes the tiles rather than two tasks writing the same rows.
std::vector<Round> sweep_rounds(int64_t row_count, int64_t col_count, Sweep sweep) {
  std::vector<Round> rounds;
  if (sweep != Sweep::kColumns) {
    Round rows(row_count);
    for (int64_t i = 0; i < row_count; ++i) {
      for (int64_t j = 0; j < col_count; ++j) rows[i].push_back({i, j, true, false});
    }
    rounds.push_back(std::move(rows));
  }
  if (sweep == Sweep::kRows) return rounds;
  Round cols(col_count);
  for (int64_t j = 0; j < col_count; ++j) {
    for (int64_t i = 0; i < row_count; ++i) cols[j].push_back({i, j, false, true});
  }
  rounds.push_back(std::move(cols));
  return rounds;
}

// The blocks and rounds of one call. Square mode ignores `sweep`: its pair tiles serve both
// their rows and their columns.
struct TileSchedule {
  Blocks row_blocks, col_blocks;
  std::vector<Round> rounds;

  TileSchedule(const Contrastive& p, Sweep sweep)
      : row_blocks(p.square ? square_blocks(p.rows) : blocks_of(p.rows)),
        col_blocks(p.square ? row_blocks : blocks_of(p.cols)),
        rounds(p.square ? square_rounds(row_blocks.count())
                        : sweep_rounds(row_blocks.count(), col_blocks.count(), sweep)) {}

  // The split sweep's share: the caller's blocks and rounds of pair tiles.
  explicit TileSchedule(const PairsShape& shape)
      : row_blocks(shape.starts), col_blocks(shape.starts) {
    for (const auto& [begin, end] : shape.round_spans) {
      Round round;
      for (int64_t k = begin; k < end; ++k) {
        const auto [i, j] = shape.pairs[k];
        round.push_back(Task{{i, j, true, i != j}});
      }
      rounds.push_back(std::move(round));
    }
  }
};

// ---------------------------------------------------------------------------------------------
// One tile.

// A thread's tile buffers: the base and interventional logit tiles (rows x cols, row-major),
// overwritten in the backward by their gradient coefficients, and per-row/column scratch.
template <typename T>
struct Tile {
  at::Tensor base, inter;
  TileScratch<T> scratch;
};

int64_t tile_scratch_elems(int64_t max_rows, int64_t max_cols) {
  return 2 * max_rows * max_cols + max_rows + 2 * max_cols;
}

template <typename T>
Tile<T> tile_buffers(const at::Tensor& flat, int64_t max_rows, int64_t max_cols, Block ri,
                     Block cj) {
  const int64_t area = max_rows * max_cols;
  T* scratch = flat.data_ptr<T>() + 2 * area;
  return {matrix(flat, 0, ri.size, cj.size), matrix(flat, area, ri.size, cj.size),
          {scratch, scratch + max_rows, scratch + max_rows + max_cols}};
}

// Runs visit(v, rows, cols, tile) for every tile of the schedule, in its order, with the tile
// buffers of the thread that runs it.
template <typename T, typename F>
void for_each_tile(const Contrastive& p, const TileSchedule& schedule, const F& visit) {
  const int64_t rmax = schedule.row_blocks.max_size(), cmax = schedule.col_blocks.max_size();
  ThreadScratch scratch(tile_scratch_elems(rmax, cmax), p.a.scalar_type());
  for (const Round& round : schedule.rounds) {
    parallel_tasks(static_cast<int64_t>(round.size()), [&](int64_t t) {
      for (const TileVisit& v : round[t]) {
        const Block ri = schedule.row_blocks[v.i], cj = schedule.col_blocks[v.j];
        Tile<T> tile = tile_buffers<T>(scratch.get(), rmax, cmax, ri, cj);
        visit(v, ri, cj, tile);
      }
    });
  }
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
  auto positive = [&p](int64_t row) { return group_positive(row, p.group_rows); };
  for (int64_t r = 0; r < ri.size; ++r) {
    const int64_t c = p.row_offset + positive(ri.begin + r) - cj.begin;
    if (c >= 0 && c < cj.size) f(r, c, ri.begin + r);
  }
  if (!p.square) return;
  for (int64_t c = 0; c < cj.size; ++c) {
    const int64_t r = positive(cj.begin + c) - ri.begin;
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
// Forward.

// The largest Euclidean row norm of x in each block, summed in row order (an ATen reduction's
// order may depend on the thread count). Empty for an undefined x.
template <typename T>
std::vector<T> max_row_norms(const at::Tensor& x, const Blocks& blocks) {
  if (!x.defined()) return {};
  const int64_t dim = x.size(1);
  const T* v = x.data_ptr<T>();
  std::vector<T> out(blocks.count(), T(0));
  for (int64_t k = 0; k < blocks.count(); ++k) {
    for (int64_t r = blocks[k].begin; r < blocks[k].end(); ++r) {
      T sq = 0;
      for (int64_t d = 0; d < dim; ++d) sq += v[r * dim + d] * v[r * dim + d];
      out[k] = std::max(out[k], std::sqrt(sq));
    }
  }
  return out;
}

// Upper bounds on the logits of a tile, from the largest feature row norms of its row and column
// blocks (Cauchy-Schwarz): the reference of the one-exponential statistics pass
// (tile_passes_impl.h).
template <typename T>
class LogitBounds {
 public:
  LogitBounds(const Contrastive& p, const TileSchedule& s)
      : mode_(p.mode),
        a_(max_row_norms<T>(p.a, s.row_blocks)),
        b_(max_row_norms<T>(p.b, s.row_blocks)),
        a_cols_(p.square ? a_ : max_row_norms<T>(p.a_cols, s.col_blocks)),
        b_cols_(p.square ? b_ : max_row_norms<T>(p.b_cols, s.col_blocks)) {}

  // Term 0 (base) or 1 (interventional) of the tile of row block i and column block j.
  T operator()(int64_t term, int64_t i, int64_t j) const {
    const T base = a_[i] * a_cols_[j];
    if (term == 0) return base;
    const T second = b_[i] * b_cols_[j];
    return mode_ == kCombineConcat ? base + second : second;
  }

  // The largest a and b feature norm over all the columns.
  T max_a_col() const { return *std::max_element(a_cols_.begin(), a_cols_.end()); }
  T max_b_col() const { return *std::max_element(b_cols_.begin(), b_cols_.end()); }

 private:
  Combine mode_;
  std::vector<T> a_, b_, a_cols_, b_cols_;
};

// Per term t (0 base, 1 interventional), entries t * rows + row: the running (max, sum of exp) of
// the row's negatives, and its positive logit, merged in at the end (ntxent_row_term).
template <typename T>
struct RowStats {
  std::vector<T> max, sum, pos;

  explicit RowStats(const Contrastive& p)
      : max(2 * p.rows, neg_inf<T>()), sum(2 * p.rows, T(0)), pos(2 * p.rows, T(0)) {
    if (p.explicit_positive) {
      const T* given = p.positive_logits.data_ptr<T>();
      std::copy(given, given + 2 * p.rows, pos.begin());
    }
  }
  RunningLse<T> running(int64_t offset, Block b) {
    return {&max[offset + b.begin], &sum[offset + b.begin]};
  }
};

// Merges one tile's logits into the statistics of its rows and, for a visit to_cols (square pair
// tiles), of its columns.
template <typename T>
void merge_tile(const Contrastive& p, const LogitBounds<T>& bounds, const TileVisit& v, Block ri,
                Block cj, Tile<T>& tile, RowStats<T>& stats) {
  compute_logits(p, ri, cj, tile);
  for (int64_t t = 0; t < p.terms(); ++t) {
    T* s = (t == 0 ? tile.base : tile.inter).template data_ptr<T>();
    const int64_t o = t * p.rows;
    // The positive logits are read, then masked out with the self logits. (In square mode an
    // entry is row r's positive exactly when it is column c's, so one mask serves both.)
    for_each_positive(p, ri, cj, [&](int64_t r, int64_t c, int64_t anchor) {
      stats.pos[o + anchor] = s[r * cj.size + c];
    });
    for_each_positive(p, ri, cj,
                      [&](int64_t r, int64_t c, int64_t) { s[r * cj.size + c] = neg_inf<T>(); });
    for_each_self(p, ri, cj, [&](int64_t r, int64_t c) { s[r * cj.size + c] = neg_inf<T>(); });
    const RunningLse<T> cols = v.to_cols ? stats.running(o, cj) : RunningLse<T>{nullptr, nullptr};
    tile_passes<T>().merge_stats(s, ri.size, cj.size, bounds(t, v.i, v.j), tile.scratch,
                                 stats.running(o, ri), cols);
  }
}

// L_t = mean over rows of (lse - positive logit), summed in float64 in row order; row_lse gets
// each row's log-sum-exp over its positive and negatives.
template <typename T>
void finish_forward(const Contrastive& p, const RowStats<T>& stats, T* losses, T* row_lse) {
  for (int64_t t = 0; t < p.terms(); ++t) {
    double total = 0;
    for (int64_t r = 0; r < p.rows; ++r) {
      const int64_t i = t * p.rows + r;
      const T term = ntxent_row_term(lse_finish(stats.max[i], stats.sum[i]), stats.pos[i]);
      row_lse[i] = stats.pos[i] + term;
      total += static_cast<double>(term);
    }
    losses[t] = static_cast<T>(total / static_cast<double>(p.rows));
  }
}

template <typename T>
void forward_impl(const Contrastive& p, T* losses, T* row_lse) {
  // Rectangular mode needs no column sweep: the columns are no anchors here.
  const TileSchedule schedule(p, Sweep::kRows);
  const LogitBounds<T> bounds(p, schedule);
  RowStats<T> stats(p);
  for_each_tile<T>(p, schedule, [&](const TileVisit& v, Block ri, Block cj, Tile<T>& tile) {
    merge_tile(p, bounds, v, ri, cj, tile, stats);
  });
  finish_forward(p, stats, losses, row_lse);
}

std::tuple<at::Tensor, at::Tensor> contrastive_forward(
    const at::Tensor& a, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& a_cols, const std::optional<at::Tensor>& b_cols,
    const std::optional<at::Tensor>& positive_logits, int64_t row_offset,
    c10::string_view combine, bool /*symmetric: the CPU sweep always pairs the tiles*/) {
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

// Gradient coefficients of one term's tile: tile_passes' coefficients (adding add[] when given),
// then the self entries (excluded from the softmax) set to 0 and the positive indicator
// subtracted: ntxent_grad_coef of tile_math.h, summed over the tile and its transpose in square
// mode.
// With row_scale (the split sweep), each row's and column's own weight replaces `scale`, and the
// positive entries get 0: their gradient is added by the rank that owns the row.
template <typename T>
void term_coefficients(const Contrastive& p, Block ri, Block cj, T* s, const T* lse, T scale,
                       const T* row_scale, const T* add, Tile<T>& tile) {
  const T* lse_rows = lse + ri.begin;
  const T* lse_cols = p.square ? lse + cj.begin : nullptr;
  const T* scale_rows = row_scale ? row_scale + ri.begin : nullptr;
  const T* scale_cols = row_scale ? row_scale + cj.begin : nullptr;
  tile_passes<T>().coefficients(s, ri.size, cj.size, lse_rows, lse_cols, scale, scale_rows,
                                scale_cols, add, tile.scratch);
  for_each_self(p, ri, cj, [&](int64_t r, int64_t c) { s[r * cj.size + c] = T(0); });
  if (p.positives_elsewhere) {
    for_each_positive(p, ri, cj,
                      [&](int64_t r, int64_t c, int64_t) { s[r * cj.size + c] = T(0); });
  } else {
    for_each_positive(p, ri, cj,
                      [&](int64_t r, int64_t c, int64_t) { s[r * cj.size + c] -= scale; });
  }
}

// Both terms' coefficient tiles of rows ri x columns cj, from the saved row log-sum-exps
// (2 x rows) and scale[t] = dLoss/dL_t / rows. Afterwards tile.base multiplies the a features
// ("concat": base + interventional coefficients, as both terms' logits contain a·a') and
// tile.inter the b features.
template <typename T>
void gradient_tile(const Contrastive& p, Block ri, Block cj, Tile<T>& tile, const T* row_lse,
                   const T* scale, const T* row_scale = nullptr) {
  compute_logits(p, ri, cj, tile);
  T* base = tile.base.template data_ptr<T>();
  T* inter = p.has_int() ? tile.inter.template data_ptr<T>() : nullptr;
  if (p.has_int()) {
    term_coefficients<T>(p, ri, cj, inter, row_lse + p.rows, scale[1],
                         row_scale ? row_scale + p.rows : nullptr, nullptr, tile);
  }
  term_coefficients<T>(p, ri, cj, base, row_lse, scale[0], row_scale,
                       p.mode == kCombineConcat ? inter : nullptr, tile);
}

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

// The gradients of the sweep's rows and/or columns (square mode: one symmetric sweep, `sweep`
// ignored), from the saved row log-sum-exps and scale[t] = dLoss/dL_t / rows.
template <typename T>
void backward_impl(const Contrastive& p, const T* row_lse, const T* scale, Sweep sweep,
                   at::Tensor& grad_a, at::Tensor& grad_b, at::Tensor& grad_a_cols,
                   at::Tensor& grad_b_cols) {
  // In square mode the columns are the rows: a pair tile's transpose adds to the row gradients
  // of its column block (G + Gᵀ is symmetric).
  at::Tensor& col_grad_a = p.square ? grad_a : grad_a_cols;
  at::Tensor& col_grad_b = p.square ? grad_b : grad_b_cols;
  const TileSchedule schedule(p, sweep);
  for_each_tile<T>(p, schedule, [&](const TileVisit& v, Block ri, Block cj, Tile<T>& tile) {
    gradient_tile(p, ri, cj, tile, row_lse, scale);
    if (v.to_rows) apply_tile(p, ri, cj, tile, false, grad_a, grad_b);
    if (v.to_cols) apply_tile(p, ri, cj, tile, true, col_grad_a, col_grad_b);
  });
}

// scale[t] = grad_losses[t] / rows (a contiguous tensor in the accumulation dtype T).
template <typename T>
std::array<T, 2> term_scales(const at::Tensor& grad_losses, int64_t rows) {
  const T inv_rows = T(1) / static_cast<T>(rows);
  const T* g = grad_losses.data_ptr<T>();
  return {g[0] * inv_rows, g[1] * inv_rows};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_backward(
    const at::Tensor& grad_losses, const at::Tensor& a, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& a_cols, const std::optional<at::Tensor>& b_cols,
    const std::optional<at::Tensor>& positive_logits, const at::Tensor& row_lse,
    int64_t row_offset, c10::string_view combine, bool column_grads,
    bool /*symmetric: the CPU sweep always pairs the tiles*/) {
  const Contrastive p = prepare(a, b, a_cols, b_cols, positive_logits, row_offset, combine);
  column_grads = column_grads && !p.square;
  const auto acc = p.a.scalar_type();
  check_contrastive_backward_args(grad_losses, row_lse, a);
  const at::Tensor lse = to_acc(row_lse, acc);
  const at::Tensor g = to_acc(grad_losses, acc);

  auto zeros_like_acc = [&](const at::Tensor& t) {
    return t.defined() ? at::zeros_like(t) : at::Tensor();
  };
  at::Tensor grad_a = at::zeros_like(p.a), grad_b = zeros_like_acc(p.b);
  at::Tensor grad_a_cols = column_grads ? zeros_like_acc(p.a_cols) : at::Tensor();
  at::Tensor grad_b_cols = column_grads ? zeros_like_acc(p.b_cols) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "icl_msr::contrastive_backward", [&] {
    const auto scale = term_scales<scalar_t>(g, p.rows);
    backward_impl<scalar_t>(p, lse.data_ptr<scalar_t>(), scale.data(),
                            column_grads ? Sweep::kRowsThenColumns : Sweep::kRows, grad_a,
                            grad_b, grad_a_cols, grad_b_cols);
  });

  // In the inputs' dtypes; an input that was None gets an empty gradient, one that was given
  // but not read (b with combine "none") a zero gradient.
  auto result = [&](const at::Tensor& grad, const std::optional<at::Tensor>& input,
                    bool wanted = true) {
    if (!input.has_value() || !wanted) return at::empty({0}, a.options());
    return grad.defined() ? like_input(grad, *input) : at::zeros_like(*input);
  };
  return {like_input(grad_a, a), result(grad_b, b), result(grad_a_cols, a_cols, column_grads),
          result(grad_b_cols, b_cols, column_grads)};
}

// ---------------------------------------------------------------------------------------------
// Memory-bank forward with the row gradients: contrastive_rows_forward / contrastive_rows_backward.
//
// With explicit positives a row's gradient is, per term, a softmax-weighted sum of the column
// features, like an attention output (docs/math.md §3): dL_t/da_r = s_t sum_c P_t[r, c] a'_c
// (and the same over b'_c for the interventional term, and in "concat" over a'_c too, whose
// logits contain a·a'), with s_t = dLoss/dL_t / rows. This forward accumulates those sums with
// the row statistics, flash-attention style, and the backward only scales them: one logit
// product and one apply per term, where forward_impl and backward_impl's row sweep need three
// (the backward recomputes the logits). Columns that need gradients (the prototypes reach the
// bank's interventional features) still get backward_impl's column sweep.
//
// Every row and term has a fixed reference, the Cauchy-Schwarz bound of its logits
// ref_r = |a_r| max_c |a'_c| (plus |b_r| max_c |b'_c|), so the sweep needs no running max and
// never rescales: it accumulates exp(s - ref) and their products with the column features, and
// the end multiplies by exp(ref - lse). A row block in which some row's sum ends below
// exp(-kRowShiftRange) (its logits lie far below the bound, or are NaN or Inf) is redone with
// exact statistics, whose maxima are then its references.

// Entries lost to underflow are below exp(-87) (float) each, so with a row sum of at least
// exp(-range) over at most 2^31 columns they change it by less than 2^31 exp(range - 87), 2e-8
// relative at range 48; float64's limit is exp(-708).
template <typename T>
constexpr T kRowShiftRange = std::is_same_v<T, float> ? T(48) : T(560);

// The row gradient sums of one call in the accumulation dtype: a (1 or 2, rows, D) per term over
// the a columns (term 1 in "concat" only), b (rows, Db) term 1's over the b columns (0 elements
// for "none").
struct RowGradients {
  at::Tensor a, b;

  explicit RowGradients(const Contrastive& p)
      : a(at::zeros({p.mode == kCombineConcat ? 2 : 1, p.rows, p.a.size(1)}, p.a.options())),
        b(p.has_int() ? at::zeros_like(p.b) : at::empty({0}, p.a.options())) {}

  // rows ri += the tile's coefficients (tile.base for term 0, tile.inter for term 1) times the
  // column features of cj.
  template <typename T>
  void accumulate(const Contrastive& p, Block ri, Block cj, const Tile<T>& tile) {
    const auto a_cols = p.a_cols.narrow(0, cj.begin, cj.size);
    a[0].narrow(0, ri.begin, ri.size).addmm_(tile.base, a_cols);
    if (!p.has_int()) return;
    if (p.mode == kCombineConcat) a[1].narrow(0, ri.begin, ri.size).addmm_(tile.inter, a_cols);
    b.narrow(0, ri.begin, ri.size).addmm_(tile.inter, p.b_cols.narrow(0, cj.begin, cj.size));
  }

  // Zeroes rows ri (before an exact redo).
  void clear(Block ri) {
    a.narrow(1, ri.begin, ri.size).zero_();
    if (b.numel() > 0) b.narrow(0, ri.begin, ri.size).zero_();
  }
};

// ref (2 x rows): the bound of each row's logits per term (see above), with the column norms
// the tile bounds already hold.
template <typename T>
std::vector<T> row_references(const Contrastive& p, const LogitBounds<T>& bounds) {
  const Blocks each_row(p.rows, p.rows);
  const std::vector<T> a = max_row_norms<T>(p.a, each_row);
  const T a_cols = bounds.max_a_col();
  std::vector<T> ref(2 * p.rows, T(0));
  for (int64_t r = 0; r < p.rows; ++r) ref[r] = a[r] * a_cols;
  if (!p.has_int()) return ref;
  const std::vector<T> b = max_row_norms<T>(p.b, each_row);
  const T b_cols = bounds.max_b_col();
  for (int64_t r = 0; r < p.rows; ++r) {
    const T second = b[r] * b_cols;
    ref[p.rows + r] = p.mode == kCombineConcat ? ref[r] + second : second;
  }
  return ref;
}

// Row block ri against every column block: each tile's logits, turned per term in place by
// exponentials(t, s, tile, cols) into its rows' softmax numerators, applied to the columns'
// features and added into grads.
template <typename T, typename F>
void row_gradient_sweep(const Contrastive& p, const Blocks& col_blocks, Block ri,
                        const at::Tensor& flat, int64_t rmax, int64_t cmax, RowGradients& grads,
                        const F& exponentials) {
  for (int64_t j = 0; j < col_blocks.count(); ++j) {
    const Block cj = col_blocks[j];
    Tile<T> tile = tile_buffers<T>(flat, rmax, cmax, ri, cj);
    compute_logits(p, ri, cj, tile);
    for (int64_t t = 0; t < p.terms(); ++t) {
      exponentials(t, (t == 0 ? tile.base : tile.inter).template data_ptr<T>(), tile, cj.size);
    }
    grads.accumulate(p, ri, cj, tile);
  }
}

// Row block ri with the fixed references. Returns false when some row's sum fell too low,
// leaving `stats` unchanged for those rows (grads must then be cleared).
template <typename T>
bool bounded_row_sweep(const Contrastive& p, const Blocks& col_blocks, Block ri,
                       const std::vector<T>& ref, const at::Tensor& flat, int64_t rmax,
                       int64_t cmax, RowStats<T>& stats, RowGradients& grads) {
  std::vector<T> sums(2 * ri.size, T(0));
  row_gradient_sweep<T>(p, col_blocks, ri, flat, rmax, cmax, grads,
                        [&](int64_t t, T* s, Tile<T>&, int64_t cols) {
                          tile_passes<T>().shifted_exp(s, ri.size, cols,
                                                       &ref[t * p.rows + ri.begin],
                                                       &sums[t * ri.size]);
                        });
  const T min_sum = std::exp(-kRowShiftRange<T>);
  for (int64_t k = 0; k < p.terms() * ri.size; ++k) {
    if (!(sums[k] >= min_sum)) return false;  // negated: NaN fails
  }
  for (int64_t t = 0; t < p.terms(); ++t) {
    for (int64_t r = 0; r < ri.size; ++r) {
      stats.max[t * p.rows + ri.begin + r] = ref[t * p.rows + ri.begin + r];
      stats.sum[t * p.rows + ri.begin + r] = sums[t * ri.size + r];
    }
  }
  return true;
}

// Row block ri exactly: the statistics as forward_impl takes them, then exp(s - max) per tile.
template <typename T>
void exact_row_sweep(const Contrastive& p, const TileSchedule& schedule,
                     const LogitBounds<T>& bounds, int64_t i, const at::Tensor& flat,
                     int64_t rmax, int64_t cmax, RowStats<T>& stats, RowGradients& grads) {
  const Block ri = schedule.row_blocks[i];
  const Blocks& col_blocks = schedule.col_blocks;
  grads.clear(ri);
  for (int64_t j = 0; j < col_blocks.count(); ++j) {
    Tile<T> tile = tile_buffers<T>(flat, rmax, cmax, ri, col_blocks[j]);
    merge_tile(p, bounds, TileVisit{i, j, true, false}, ri, col_blocks[j], tile, stats);
  }
  row_gradient_sweep<T>(p, col_blocks, ri, flat, rmax, cmax, grads,
                        [&](int64_t t, T* s, Tile<T>& tile, int64_t cols) {
                          tile_passes<T>().coefficients(s, ri.size, cols,
                                                        &stats.max[t * p.rows + ri.begin],
                                                        nullptr, T(1), nullptr, nullptr,
                                                        nullptr, tile.scratch);
                        });
}

template <typename T>
void rows_forward_impl(const Contrastive& p, T* losses, T* row_lse, RowGradients& grads) {
  const TileSchedule schedule(p, Sweep::kRows);
  const LogitBounds<T> bounds(p, schedule);
  const std::vector<T> ref = row_references<T>(p, bounds);
  RowStats<T> stats(p);
  const int64_t rmax = schedule.row_blocks.max_size(), cmax = schedule.col_blocks.max_size();
  ThreadScratch scratch(tile_scratch_elems(rmax, cmax), p.a.scalar_type());
  // One task per row block: its rows, statistics and sums are its own.
  parallel_tasks(schedule.row_blocks.count(), [&](int64_t i) {
    const at::Tensor flat = scratch.get();
    if (!bounded_row_sweep(p, schedule.col_blocks, schedule.row_blocks[i], ref, flat, rmax, cmax,
                           stats, grads)) {
      exact_row_sweep(p, schedule, bounds, i, flat, rmax, cmax, stats, grads);
    }
  });
  finish_forward(p, stats, losses, row_lse);
  // The sums were taken against the references (stats.max): scale them into softmax weights.
  at::Tensor factor = at::empty({2, p.rows}, p.a.options());
  T* f = factor.data_ptr<T>();
  for (int64_t k = 0; k < p.terms() * p.rows; ++k) f[k] = std::exp(stats.max[k] - row_lse[k]);
  grads.a.mul_(factor.narrow(0, 0, grads.a.size(0)).unsqueeze(2));
  if (p.has_int()) grads.b.mul_(factor[1].unsqueeze(1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_rows_forward(
    const at::Tensor& a, const std::optional<at::Tensor>& b, const at::Tensor& a_cols,
    const std::optional<at::Tensor>& b_cols, const at::Tensor& positive_logits,
    c10::string_view combine) {
  const Contrastive p = prepare(a, b, a_cols, b_cols, positive_logits, 0, combine);
  const auto opts = p.a.options();
  at::Tensor losses = at::zeros({2}, opts), row_lse = at::zeros({2, p.rows}, opts);
  RowGradients grads(p);
  AT_DISPATCH_FLOATING_TYPES(p.a.scalar_type(), "icl_msr::contrastive_rows_forward", [&] {
    rows_forward_impl<scalar_t>(p, losses.data_ptr<scalar_t>(), row_lse.data_ptr<scalar_t>(),
                                grads);
  });
  return {losses, row_lse, grads.a, grads.b};
}

// grad_a = sum_t s_t a_rows[t], grad_b = s_1 b_rows, s_t = grad_losses[t] / rows; with
// column_grads, the columns' gradients from a column sweep over the tiles (recomputed).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_rows_backward(
    const at::Tensor& grad_losses, const at::Tensor& a_rows, const at::Tensor& b_rows,
    const at::Tensor& a, const std::optional<at::Tensor>& b, const at::Tensor& a_cols,
    const std::optional<at::Tensor>& b_cols, const at::Tensor& positive_logits,
    const at::Tensor& row_lse, c10::string_view combine, bool column_grads) {
  const Contrastive p = prepare(a, b, a_cols, b_cols, positive_logits, 0, combine);
  check_contrastive_backward_args(grad_losses, row_lse, a);
  const auto acc = p.a.scalar_type();
  check_tensor(a_rows, "a_rows", 3, a.device());
  check_size(a_rows, "a_rows", 0, p.mode == kCombineConcat ? 2 : 1,
             "terms (2 for \"concat\", else 1)");
  check_size(a_rows, "a_rows", 1, p.rows, "rows, as a");
  TORCH_CHECK(a_rows.scalar_type() == acc, "a_rows must be ", acc, ", got ",
              a_rows.scalar_type());
  const at::Tensor g = to_acc(grad_losses, acc);
  const at::Tensor scale = g / static_cast<double>(p.rows);
  at::Tensor grad_a = a_rows[0] * scale[0];
  if (p.mode == kCombineConcat) grad_a.add_(a_rows[1] * scale[1]);
  at::Tensor grad_b = at::empty({0}, p.a.options());
  if (p.has_int()) {
    check_tensor(b_rows, "b_rows", 2, a.device());
    check_size(b_rows, "b_rows", 0, p.rows, "rows, as a");
    grad_b = b_rows * scale[1];
  }
  at::Tensor grad_a_cols = at::empty({0}, p.a.options()), grad_b_cols = grad_a_cols.clone();
  if (column_grads) {
    grad_a_cols = at::zeros_like(p.a_cols);
    if (p.has_int()) grad_b_cols = at::zeros_like(p.b_cols);
    const at::Tensor lse = to_acc(row_lse, acc);
    at::Tensor unused_a, unused_b;  // the rows' gradients came from the forward
    AT_DISPATCH_FLOATING_TYPES(acc, "icl_msr::contrastive_rows_backward", [&] {
      const auto scales = term_scales<scalar_t>(g, p.rows);
      backward_impl<scalar_t>(p, lse.data_ptr<scalar_t>(), scales.data(), Sweep::kColumns,
                              unused_a, unused_b, grad_a_cols, grad_b_cols);
    });
  }
  return {grad_a, grad_b, grad_a_cols, grad_b_cols};
}

// ---------------------------------------------------------------------------------------------
// The split distributed sweep: the caller's share of the job's pair tiles over all ranks' rows
// (docs/math.md §6). The same pair tiles as square mode, with the positives left to their owners.

Contrastive prepare_pairs(const at::Tensor& a, const std::optional<at::Tensor>& b,
                          const PairsShape& shape) {
  TORCH_CHECK(a.device().is_cpu(), "a must be a CPU tensor for the CPU kernels, got one on ",
              a.device());
  const auto acc = accum_dtype(a.scalar_type());
  Contrastive p;
  p.mode = shape.combine;
  p.rows = p.cols = shape.rows;
  p.group_rows = shape.group_rows;
  p.positives_elsewhere = true;
  p.a = p.a_cols = to_acc(a, acc);
  if (shape.uses_b) p.b = p.b_cols = to_acc(*b, acc);
  return p;
}

std::tuple<at::Tensor, at::Tensor> contrastive_pairs_forward(
    const at::Tensor& a, const std::optional<at::Tensor>& b, const at::Tensor& block_starts,
    const at::Tensor& pairs, int64_t group_rows, c10::string_view combine) {
  const PairsShape shape = check_pairs_args(a, b, block_starts, pairs, group_rows, combine);
  const Contrastive p = prepare_pairs(a, b, shape);
  at::Tensor neg_max = at::full({2, p.rows}, -std::numeric_limits<double>::infinity(),
                                p.a.options());
  at::Tensor neg_sum = at::zeros({2, p.rows}, p.a.options());
  AT_DISPATCH_FLOATING_TYPES(p.a.scalar_type(), "icl_msr::contrastive_pairs_forward", [&] {
    using T = scalar_t;
    const TileSchedule schedule(shape);
    const LogitBounds<T> bounds(p, schedule);
    RowStats<T> stats(p);  // its positive logits go unused: the owners compute them
    for_each_tile<T>(p, schedule, [&](const TileVisit& v, Block ri, Block cj, Tile<T>& tile) {
      merge_tile(p, bounds, v, ri, cj, tile, stats);
    });
    std::copy(stats.max.begin(), stats.max.end(), neg_max.data_ptr<T>());
    std::copy(stats.sum.begin(), stats.sum.end(), neg_sum.data_ptr<T>());
  });
  return {neg_max, neg_sum};
}

std::tuple<at::Tensor, at::Tensor> contrastive_pairs_backward(
    const at::Tensor& a, const std::optional<at::Tensor>& b, const at::Tensor& block_starts,
    const at::Tensor& pairs, const at::Tensor& row_lse, const at::Tensor& row_scale,
    int64_t group_rows, c10::string_view combine) {
  const PairsShape shape = check_pairs_args(a, b, block_starts, pairs, group_rows, combine);
  const Contrastive p = prepare_pairs(a, b, shape);
  for (const auto& [t, name] : {std::pair{&row_lse, "row_lse"}, std::pair{&row_scale, "row_scale"}}) {
    check_tensor(*t, name, 2, a.device());
    check_size(*t, name, 0, 2, "rows (one per term)");
    check_size(*t, name, 1, p.rows, "columns, one per row of a");
  }
  const auto acc = p.a.scalar_type();
  const at::Tensor lse = to_acc(row_lse, acc), scales = to_acc(row_scale, acc);
  at::Tensor grad_a = at::zeros_like(p.a);
  at::Tensor grad_b = p.has_int() ? at::zeros_like(p.b) : at::empty({0}, p.a.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "icl_msr::contrastive_pairs_backward", [&] {
    using T = scalar_t;
    const T unused[2] = {T(0), T(0)};  // the per-row scales replace the per-term ones
    const TileSchedule schedule(shape);
    for_each_tile<T>(p, schedule, [&](const TileVisit& v, Block ri, Block cj, Tile<T>& tile) {
      gradient_tile(p, ri, cj, tile, lse.data_ptr<T>(), unused, scales.data_ptr<T>());
      apply_tile(p, ri, cj, tile, false, grad_a, grad_b);
      if (v.to_cols) apply_tile(p, ri, cj, tile, true, grad_a, grad_b);
    });
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(icl_msr, CPU, m) {
  m.impl("contrastive_forward", &contrastive_forward);
  m.impl("contrastive_backward", &contrastive_backward);
  m.impl("contrastive_rows_forward", &contrastive_rows_forward);
  m.impl("contrastive_rows_backward", &contrastive_rows_backward);
  m.impl("contrastive_pairs_forward", &contrastive_pairs_forward);
  m.impl("contrastive_pairs_backward", &contrastive_pairs_backward);
}

}  // namespace icl_msr::cpu
