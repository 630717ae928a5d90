// The elementwise passes over a contrastive logit tile (contrastive.cpp): the forward's running
// row/column statistics and the backward's gradient coefficients. They are most of the kernels'
// time outside the BLAS, and gcc vectorises them twice as wide with AVX2 as with the x86-64
// baseline. So that one build runs on any CPU of its architecture, they are compiled twice,
// tile_passes_impl.h in tile_passes_avx2.cpp (AVX2 + FMA; x86-64 with gcc only, elsewhere that
// unit is empty) and in tile_passes_base.cpp (the baseline), and tile_passes<T>() picks one on
// first use from what the CPU reports.
//
// ICL_MSR_CPU_ISA=baseline forces the baseline passes (to test them on an AVX2 CPU);
// ICL_MSR_CPU_ISA=avx2 requires the AVX2 ones; unset or "auto", the CPU decides.
//
// No ATen here: tile_passes_impl.h, which includes this header, is compiled under a target
// pragma, which must not apply to ATen's inline functions.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ICL_MSR_HAVE_AVX2_PASSES 1
#else
#define ICL_MSR_HAVE_AVX2_PASSES 0
#endif

namespace icl_msr::cpu {

// Running (max, sum of exp(v - max)) of a block of rows, as lse_merge keeps them.
template <typename T>
struct RunningLse {
  T* max;  // nullptr: not tracked
  T* sum;
};

// A tile's per-row and per-column scratch: `rows` entries, then `cols` and `cols2` of the tile's
// column count each.
template <typename T>
struct TileScratch {
  T* rows;
  T* cols;
  T* cols2;
};

template <typename T>
struct TilePasses {
  // Merges a (rows x cols) logit tile s into the running statistics of its rows and, when
  // col.max is given (square mode, whose pair tiles also stand for their transposes), of its
  // columns. `bound` is >= every entry of s (or NaN).
  void (*merge_stats)(const T* s, int64_t rows, int64_t cols, T bound, TileScratch<T> scratch,
                      RunningLse<T> row, RunningLse<T> col);
  // Turns a logit tile, in place, into s_r exp(s - lse_row) [+ s_c exp(s - lse_col) when
  // lse_cols is given] [+ add when given]: the NT-Xent gradient coefficients before the positive
  // and self corrections. The weights s_r, s_c are `scale`, or scale_rows[r] and scale_cols[c]
  // when scale_rows is given (lse_cols must be given then).
  void (*coefficients)(T* s, int64_t rows, int64_t cols, const T* lse_rows, const T* lse_cols,
                       T scale, const T* scale_rows, const T* scale_cols, const T* add,
                       TileScratch<T> scratch);
  // Replaces a (rows x cols) logit tile s, in place, by exp(s - ref[r]) and adds each row's sum
  // to row_sum[r]: the memory-bank forward's softmax numerators against a fixed reference per
  // row (contrastive.cpp).
  void (*shifted_exp)(T* s, int64_t rows, int64_t cols, const T* ref, T* row_sum);
};

struct TilePassTable {
  TilePasses<float> f32;
  TilePasses<double> f64;
  const char* isa;
};

namespace baseline {
TilePassTable tile_pass_table();
}
#if ICL_MSR_HAVE_AVX2_PASSES
namespace avx2 {
TilePassTable tile_pass_table();
}
#endif

// The passes chosen for this CPU (once per process), and their name: "avx2" or "baseline".
const TilePassTable& tile_pass_table();

template <typename T>
const TilePasses<T>& tile_passes();
template <>
inline const TilePasses<float>& tile_passes<float>() {
  return tile_pass_table().f32;
}
template <>
inline const TilePasses<double>& tile_passes<double>() {
  return tile_pass_table().f64;
}

}  // namespace icl_msr::cpu
