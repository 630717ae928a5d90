// The tile passes of tile_passes.h, compiled once per instruction set: a translation unit
// defines ICL_MSR_ISA (the namespace, one per instruction set) and includes this file once, after
// any target pragma, having included the headers below before it. Their inline functions and
// templates are then compiled for the baseline in every unit (gcc takes a template's target from
// where it is defined), and everything defined here is local to its unit (an anonymous
// namespace) or named by its instruction set: the linker never has two differently compiled
// copies of one function to choose from. Nothing from ATen here.
//
// The loops are written for gcc to vectorise under `#pragma omp simd` (with
// -fno-trapping-math, so that it if-converts the clamps), and exp_vec is always inlined into
// them: a call inside a loop stops vectorisation.
#ifndef ICL_MSR_ISA
#error "define ICL_MSR_ISA (the instruction set's namespace) before including tile_passes_impl.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/tile_passes.h"
#include "tile_math.h"

#define ICL_MSR_STRINGIFY_(x) #x
#define ICL_MSR_STRINGIFY(x) ICL_MSR_STRINGIFY_(x)

namespace icl_msr::cpu::ICL_MSR_ISA {
namespace {

#if defined(_MSC_VER)
#define ICL_MSR_ALWAYS_INLINE __forceinline
#else
#define ICL_MSR_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

// ---------------------------------------------------------------------------------------------
// exp in a form gcc vectorises (no libm call): Cephes' expf, range reduction x = n ln2 + r,
// |r| <= ln2/2, then a degree-6 polynomial (relative error about 1 ulp). Exact at the limits the
// kernels rely on: exp(-inf) = 0, NaN stays NaN. Results below FLT_MIN flush to 0 and arguments
// above 88 give +inf; the kernels only evaluate it at arguments <= 0 up to rounding (a logit
// minus a bound, max or log-sum-exp of its row), or at the self logits they then discard.
// float64 uses libm's exp.

// std::bit_cast is C++20; torch < 2.13 builds extensions as C++17, and memcpy compiles to the
// same register move.
template <typename To, typename From>
ICL_MSR_ALWAYS_INLINE To bits_as(From from) {
  static_assert(sizeof(To) == sizeof(From), "bits_as needs types of one size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

template <typename T>
ICL_MSR_ALWAYS_INLINE T exp_vec(T x) {
  return std::exp(x);
}

template <>
ICL_MSR_ALWAYS_INLINE float exp_vec<float>(float x) {
  constexpr float kLo = -87.33654f, kHi = 88.0f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  // Adding 1.5 * 2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
  constexpr float kRound = 12582912.0f;
  const float xc = std::min(std::max(x, kLo), kHi);  // NaN passes through both
  const float shifted = xc * kLog2e + kRound;
  const float n = shifted - kRound;
  const int32_t ni = bits_as<int32_t>(shifted) - bits_as<int32_t>(kRound);
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  const float result = p * bits_as<float>((ni + 127) << 23);
  const float low = x < kLo ? 0.0f : result;
  return x > kHi ? std::numeric_limits<float>::infinity() : low;
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

template <typename T>
void fill(T* v, int64_t n, T value) {
  for (int64_t i = 0; i < n; ++i) v[i] = value;
}

// Whether every sum is >= lo (false for NaN).
template <typename T>
bool all_at_least(const T* sums, int64_t n, T lo) {
  for (int64_t i = 0; i < n; ++i) {
    if (!(sums[i] >= lo)) return false;
  }
  return true;
}

// Exact path: maxima first, then sums of exp(s - max) per row and per column (col.max given:
// square mode, whose tile also stands for its transpose). A row or column whose entries are all
// masked (-inf) has max -inf and is left unchanged.
template <typename T>
void merge_stats_exact(const T* s, int64_t rows, int64_t cols, TileScratch<T> scratch,
                       RunningLse<T> row, RunningLse<T> col) {
  const bool with_cols = col.max != nullptr;
  T* row_max = scratch.rows;
  T* col_max = scratch.cols;
  T* col_sum = scratch.cols2;
  fill(col_max, cols, neg_inf<T>());
  fill(col_sum, cols, T(0));
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
bool merge_stats_bounded(const T* s, int64_t rows, int64_t cols, T bound, TileScratch<T> scratch,
                         RunningLse<T> row, RunningLse<T> col) {
  const bool with_cols = col.max != nullptr;
  T* row_sum = scratch.rows;
  T* col_sum = scratch.cols;
  fill(col_sum, cols, T(0));
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
  if (!all_at_least(row_sum, rows, min_sum) ||
      (with_cols && !all_at_least(col_sum, cols, min_sum))) {
    return false;
  }
  for (int64_t r = 0; r < rows; ++r) lse_merge(row.max[r], row.sum[r], bound, row_sum[r]);
  if (with_cols) {
    for (int64_t c = 0; c < cols; ++c) lse_merge(col.max[c], col.sum[c], bound, col_sum[c]);
  }
  return true;
}

template <typename T>
void merge_stats(const T* s, int64_t rows, int64_t cols, T bound, TileScratch<T> scratch,
                 RunningLse<T> row, RunningLse<T> col) {
  if (!merge_stats_bounded(s, rows, cols, bound, scratch, row, col)) {
    merge_stats_exact(s, rows, cols, scratch, row, col);
  }
}

// ---------------------------------------------------------------------------------------------
// Gradient coefficients.

// Per-entry weights of the coefficients: one scale for the whole tile, or (the split
// distributed sweep, whose rows belong to ranks with different upstream gradients) one per row
// and one per column.
template <typename T>
struct Scales {
  T scale;
  const T* rows;  // nullptr: `scale` everywhere
  const T* cols;
  T row(int64_t r) const { return rows ? rows[r] : scale; }
  T col(int64_t c) const { return rows ? cols[c] : scale; }
};

// scale_r * exp(s - lse_row) (the anchor rows' softmax, docs/math.md §3), plus
// scale_c * exp(s - lse_col) when kCols (square mode: the transposed tile's softmax), plus add[]
// when kAdd ("concat": the interventional coefficients of the same entries).
template <typename T, bool kCols, bool kAdd, bool kPerRow>
void coefficients_exact(T* s, int64_t rows, int64_t cols, const T* lse_rows, const T* lse_cols,
                        Scales<T> scales, const T* add) {
  for (int64_t r = 0; r < rows; ++r) {
    T* s_row = s + r * cols;
    const T* add_row = kAdd ? add + r * cols : nullptr;
    const T lse_r = lse_rows[r];
    const T scale_r = scales.row(r);
    const T* scale_cols = scales.cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      T v;
      if constexpr (kPerRow) {
        v = scale_r * exp_vec(s_row[c] - lse_r);
        if constexpr (kCols) v += scale_cols[c] * exp_vec(s_row[c] - lse_cols[c]);
      } else {
        v = exp_vec(s_row[c] - lse_r);
        if constexpr (kCols) v += exp_vec(s_row[c] - lse_cols[c]);
        v *= scale_r;
      }
      if constexpr (kAdd) v += add_row[c];
      s_row[c] = v;
    }
  }
}

// The same for kCols with one exponential per entry: s_r exp(s - lse_r) + s_c exp(s - lse_c)
// = exp(s - ref) (u_r + v_c), u_r = s_r exp(ref - lse_r), v_c = s_c exp(ref - lse_c), ref the
// largest lse of the tile's rows and columns (every entry but the self ones is <= its row's and
// its column's lse). Returns false, leaving the tile unchanged, when the lse spread exceeds
// kShiftRange.
template <typename T, bool kAdd>
bool coefficients_shared_exp(T* s, int64_t rows, int64_t cols, const T* lse_rows,
                             const T* lse_cols, Scales<T> scales, const T* add,
                             TileScratch<T> scratch) {
  T lo = std::numeric_limits<T>::infinity(), ref = neg_inf<T>();
  for (int64_t r = 0; r < rows; ++r) {
    lo = std::min(lo, lse_rows[r]);
    ref = std::max(ref, lse_rows[r]);
  }
  for (int64_t c = 0; c < cols; ++c) {
    lo = std::min(lo, lse_cols[c]);
    ref = std::max(ref, lse_cols[c]);
  }
  // Negated so that NaN fails the test.
  if (!(ref - lo <= kShiftRange<T>)) return false;
  T* u = scratch.rows;
  T* v = scratch.cols;
  for (int64_t r = 0; r < rows; ++r) u[r] = scales.row(r) * std::exp(ref - lse_rows[r]);
  for (int64_t c = 0; c < cols; ++c) v[c] = scales.col(c) * std::exp(ref - lse_cols[c]);
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
void coefficients_for(T* s, int64_t rows, int64_t cols, const T* lse_rows, const T* lse_cols,
                      Scales<T> scales, const T* add, TileScratch<T> scratch) {
  if (lse_cols == nullptr) {
    return coefficients_exact<T, false, kAdd, false>(s, rows, cols, lse_rows, lse_cols, scales,
                                                     add);
  }
  if (coefficients_shared_exp<T, kAdd>(s, rows, cols, lse_rows, lse_cols, scales, add, scratch)) {
    return;
  }
  if (scales.rows != nullptr) {
    coefficients_exact<T, true, kAdd, true>(s, rows, cols, lse_rows, lse_cols, scales, add);
  } else {
    coefficients_exact<T, true, kAdd, false>(s, rows, cols, lse_rows, lse_cols, scales, add);
  }
}

template <typename T>
void coefficients(T* s, int64_t rows, int64_t cols, const T* lse_rows, const T* lse_cols,
                  T scale, const T* scale_rows, const T* scale_cols, const T* add,
                  TileScratch<T> scratch) {
  const Scales<T> scales{scale, scale_rows, scale_cols};
  if (add != nullptr) {
    coefficients_for<T, true>(s, rows, cols, lse_rows, lse_cols, scales, add, scratch);
  } else {
    coefficients_for<T, false>(s, rows, cols, lse_rows, lse_cols, scales, add, scratch);
  }
}

template <typename T>
void shifted_exp(T* s, int64_t rows, int64_t cols, const T* ref, T* row_sum) {
  for (int64_t r = 0; r < rows; ++r) {
    T* s_row = s + r * cols;
    const T ref_r = ref[r];
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < cols; ++c) {
      const T e = exp_vec(s_row[c] - ref_r);
      s_row[c] = e;
      sum += e;
    }
    row_sum[r] += sum;
  }
}

#undef ICL_MSR_ALWAYS_INLINE

}  // namespace

TilePassTable tile_pass_table() {
  return {{&merge_stats<float>, &coefficients<float>, &shifted_exp<float>},
          {&merge_stats<double>, &coefficients<double>, &shifted_exp<double>},
          ICL_MSR_STRINGIFY(ICL_MSR_ISA)};
}

}  // namespace icl_msr::cpu::ICL_MSR_ISA
