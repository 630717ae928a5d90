// Helpers shared by the CPU kernels (attention.cpp, contrastive.cpp): conversions to the
// accumulation dtype, row blocks, the parallel loop and a vectorisable exp. The argument checks
// are shared with the CUDA kernels (csrc/checks.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <limits>

#include "checks.h"

namespace icl_msr::cpu {

// `t` read in the accumulation dtype `acc`, contiguous: the kernels work on raw row-major
// buffers, and half inputs are upcast once here rather than element by element.
inline at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

// A gradient computed in the accumulation dtype, returned in the dtype of its input.
inline at::Tensor like_input(const at::Tensor& grad, const at::Tensor& input) {
  return grad.to(input.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// Row blocks and the parallel loop.

// A contiguous range of rows [begin, begin + size).
struct Block {
  int64_t begin;
  int64_t size;
  int64_t end() const { return begin + size; }
};

// `n` rows cut into `count` blocks of near-equal size (the first n % count one row longer).
class Blocks {
 public:
  Blocks(int64_t n, int64_t count) : n_(n), count_(std::max<int64_t>(1, std::min(count, n))) {}
  int64_t count() const { return count_; }
  Block operator[](int64_t i) const {
    const int64_t base = n_ / count_, extra = n_ % count_;
    return {i * base + std::min(i, extra), base + (i < extra ? 1 : 0)};
  }
  int64_t max_size() const { return (n_ + count_ - 1) / count_; }

 private:
  int64_t n_, count_;
};

// Runs f(t) for t in [0, n) on ATen's intra-op threads, each task single-threaded inside (the
// BLAS calls made from a task see they are in a parallel region). Tasks are split statically
// into contiguous chunks, so which thread runs a task never changes a result as long as tasks
// write disjoint outputs. Workers do not inherit the caller's thread-local dispatch state, so
// each chunk runs below autograd explicitly: the kernels call ATen ops on views of inputs that
// may require grad.
template <typename F>
void parallel_tasks(int64_t n, const F& f) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode below_autograd;
    for (int64_t t = begin; t < end; ++t) f(t);
  });
}

// One scratch buffer per intra-op thread, indexed by at::get_thread_num() inside parallel_tasks,
// so that tiles are allocated once per call rather than once per task. (Called from inside another
// parallel region, parallel_tasks runs inline on the caller's thread, whose number may exceed the
// thread count seen there: the caller's own buffer is included.)
class ThreadScratch {
 public:
  ThreadScratch(int64_t elems_per_thread, at::ScalarType dtype)
      : buffer_(at::empty({std::max(at::get_num_threads(), at::get_thread_num() + 1),
                           elems_per_thread},
                          at::TensorOptions(dtype))) {}
  // This thread's buffer as a flat tensor of elems_per_thread elements.
  at::Tensor get() const {
    const int64_t tid = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid < buffer_.size(0), "thread ", tid, " has no scratch buffer");
    return buffer_[tid];
  }

 private:
  at::Tensor buffer_;
};

// An (rows, cols) row-major matrix over the first rows * cols elements of a flat buffer.
inline at::Tensor matrix(const at::Tensor& flat, int64_t offset, int64_t rows, int64_t cols) {
  return flat.narrow(0, offset, rows * cols).view({rows, cols});
}

// ---------------------------------------------------------------------------------------------
// exp in a form gcc vectorises inside `#pragma omp simd` loops (no libm call): Cephes' expf,
// range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6 polynomial (relative error about
// 1 ulp). Exact at the limits the kernels rely on: exp(-inf) = 0, NaN stays NaN. Results below
// FLT_MIN flush to 0 and arguments above 88 give +inf; the kernels only evaluate it at arguments
// <= 0 up to rounding (a logit minus a bound, max or log-sum-exp of its row), or at the self
// logits they then discard. float64 uses libm's exp.
// Always inlined: a call inside a loop stops gcc from vectorising it.

// std::bit_cast is C++20; torch < 2.13 builds extensions as C++17, and memcpy compiles to the
// same register move.
template <typename To, typename From>
C10_ALWAYS_INLINE To bits_as(From from) {
  static_assert(sizeof(To) == sizeof(From), "bits_as needs types of one size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

template <typename T>
C10_ALWAYS_INLINE T exp_vec(T x) {
  return std::exp(x);
}

template <>
C10_ALWAYS_INLINE float exp_vec<float>(float x) {
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

}  // namespace icl_msr::cpu
