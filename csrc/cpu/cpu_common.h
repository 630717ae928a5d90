// Helpers shared by the CPU kernels (attention.cpp, contrastive.cpp): conversions to the
// accumulation dtype, row blocks and the parallel loop. The argument checks are shared with the
// CUDA kernels (csrc/checks.h), the vectorised tile passes live in tile_passes.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

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
// Or explicit blocks [starts[k], starts[k + 1]) (a schedule made by the caller).
class Blocks {
 public:
  Blocks(int64_t n, int64_t count) {
    count = std::max<int64_t>(1, std::min(count, n));
    const int64_t base = n / count, extra = n % count;
    for (int64_t i = 0; i <= count; ++i) starts_.push_back(i * base + std::min(i, extra));
  }
  explicit Blocks(std::vector<int64_t> starts) : starts_(std::move(starts)) {}
  int64_t count() const { return static_cast<int64_t>(starts_.size()) - 1; }
  Block operator[](int64_t i) const { return {starts_[i], starts_[i + 1] - starts_[i]}; }
  int64_t max_size() const {
    int64_t largest = 0;
    for (int64_t i = 0; i < count(); ++i) largest = std::max(largest, (*this)[i].size);
    return largest;
  }

 private:
  std::vector<int64_t> starts_;
};

// Runs f(t) for t in [0, n) on ATen's intra-op threads, each task single-threaded inside (the
// BLAS calls made from a task see they are in a parallel region). Tasks are split statically
// into contiguous chunks, so which thread runs a task never changes a result as long as tasks
// write disjoint outputs. at::parallel_for runs a single task inline, outside any parallel
// region, where the BLAS would split its products over all the threads, summing in an order
// that may depend on their count: an empty second task keeps the BLAS single-threaded there too,
// so that results do not depend on the thread count. Workers do not inherit the caller's
// thread-local dispatch state, so each chunk runs below autograd explicitly: the kernels call
// ATen ops on views of inputs that may require grad.
template <typename F>
void parallel_tasks(int64_t n, const F& f) {
  if (n <= 0) return;
  at::parallel_for(0, std::max<int64_t>(n, 2), 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode below_autograd;
    for (int64_t t = begin; t < std::min(end, n); ++t) f(t);
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

}  // namespace icl_msr::cpu
