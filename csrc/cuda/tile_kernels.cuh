// Building blocks shared by the icl_msr CUDA kernels (attention.cu, contrastive.cu).
//
// Every kernel has the same shape, the flash-attention one: a CTA of kThreads threads owns a
// block of kTile "owned" entities (anchor rows; columns or prototypes in the column-owned
// backward sweeps) and sweeps tiles of kTile "swept" entities. Per tile it
//   1. computes one or two kTile x kTile products (logits, scores) into shared memory, staging
//      the operands kChunk features at a time (tile_product);
//   2. runs an elementwise phase on them, four threads per tile row (online log-sum-exp in the
//      forward passes; gradient coefficients from tile_math.h in the backward passes);
//   3. in the passes that produce (B, D)-shaped results, multiplies the coefficient tile by the
//      swept entities' features and adds that to the owned rows of a float "slab" in global
//      memory (tile_accumulate), or, in the contrastive backward, to accumulators held in
//      registers for the whole sweep and stored to the slab once (RowGradients). The CTA owns
//      those slab rows, so no atomics are needed; when the sweep is split over several CTAs
//      (split_sweep), each split has its own slab and the slabs are summed in a fixed order
//      afterwards. Results are therefore bit-identical run to run.
//
// Products use tensor cores (WMMA, float32 accumulation) for float16/bfloat16 and plain FMA for
// float32/float64, whose tolerances (docs/math.md §5) TF32 would not meet.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "tile_math.h"

namespace icl_msr::cuda {

constexpr int kThreads = 256;                         // 8 warps per CTA
constexpr int kTile = 64;                             // owned and swept entities per tile
constexpr int kChunk = 32;                            // features staged per step of a product
constexpr int kLanesPerRow = kThreads / kTile;        // threads sharing a tile row (elementwise)
constexpr int kColsPerLane = kTile / kLanesPerRow;
static_assert(kLanesPerRow == 4, "merge_lanes / sum_lanes assume 4 lanes per row");

// Accumulation type: float64 for float64 inputs, else float32 (docs/math.md §4).
template <typename T> struct Accum { using type = float; };
template <> struct Accum<double> { using type = double; };
template <typename T> using accum_t = typename Accum<T>::type;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Dynamic shared memory a block may have on the current GPU (the opt-in maximum).
// (Plain runtime calls: ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers, which a
// bare CUDA toolkit may lack.)
inline size_t shared_memory_limit() {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(limit);
}

// ---------------------------------------------------------------------------------------------
// Shared memory. One layout per scalar type, carved out of the dynamic shared memory:
//   stats    [kStats][kTile] accum    per-swept-entity statistics of the tile (lse, delta, prior)
//   operands 2 x [kTile][kLdChunk] T  feature chunks of the rows and columns of a product;
//            [kTile][kLdValue] T      in step 3, the swept features (aliases the chunks)
//   logits   2 x [kTile][kLdTile] accum  the product tiles
//   coef     2 x [kTile][kLdCoef] T   coefficient tiles, the left operand of step 3: stored in T
//            for the tensor cores, or written over the logits when T is the accumulation type
//   stage    [kTile][kLdTile] accum   the slab rows being accumulated in step 3 (in the
//            contrastive backward, whose rows stay in registers, a second buffer of swept
//            features until the final store: RowGradients)
// and after the kernel's layout (kSweepBytes or kBytes) a tail (kernel_bytes) that holds either
// the owned rows (ResidentRows, when held) or, for 16-bit types, a second pair of chunk buffers
// (the next chunks in flight while both sides are staged, see tile_product): never both.
template <typename T>
struct TileLayout {
  using A = accum_t<T>;
  // 16-bit types pad rows by 16 bytes: every 16x16 WMMA fragment stays 32-byte aligned and rows
  // start in different banks; wider types pad by one element against bank conflicts of the FMA
  // path.
  static constexpr int kPad = sizeof(T) == 2 ? 8 : 1;
  static constexpr int kLdChunk = kChunk + kPad;
  static constexpr int kLdValue = kTile + kPad;
  // float tiles: a multiple of 4 floats, as WMMA accumulator loads and stores require.
  static constexpr int kLdTile = kTile + (sizeof(A) == 4 ? 4 : 1);
  static constexpr bool kCoefInPlace = std::is_same_v<T, A>;
  static constexpr int kLdCoef = kCoefInPlace ? kLdTile : kTile + kPad;
  static constexpr int kStats = 3;

  static constexpr size_t aligned(size_t bytes) { return (bytes + 127) / 128 * 128; }
  static constexpr size_t kOperandOffset = aligned(kStats * kTile * sizeof(A));
  static constexpr size_t kLogitOffset =
      kOperandOffset + aligned(std::max(2 * kTile * kLdChunk, kTile * kLdValue) * sizeof(T));
  static constexpr size_t kCoefOffset = kLogitOffset + aligned(2 * kTile * kLdTile * sizeof(A));
  static constexpr size_t kStageOffset =
      kCoefOffset + (kCoefInPlace ? 0 : aligned(2 * kTile * kLdCoef * sizeof(T)));
  // Bytes for kernels with steps 1-2 only (the contrastive forward), and with all three.
  static constexpr size_t kSweepBytes = kCoefOffset;
  static constexpr size_t kBytes = kStageOffset + aligned(kTile * kLdTile * sizeof(A));
  // The second pair of chunk buffers in the tail (by size alone, so that host and device agree;
  // only the cp.async path uses it).
  static constexpr size_t kNextChunkBytes =
      sizeof(T) == 2 ? aligned(2 * kTile * kLdChunk * sizeof(T)) : 0;
};

// Dynamic shared memory of a kernel whose layout ends at `base` (kSweepBytes or kBytes): the
// tail holds the resident rows (`resident` bytes, ResidentRows::extra_bytes) when they are held,
// else the second pair of chunk buffers.
template <typename T>
constexpr size_t kernel_bytes(size_t base, size_t resident = 0) {
  return base + (resident > 0 ? resident : TileLayout<T>::kNextChunkBytes);
}

template <typename T>
struct TileSmem {
  using L = TileLayout<T>;
  using A = accum_t<T>;
  A* stats;
  T* chunk_rows;
  T* chunk_cols;
  T* next_rows;  // the second pair of chunk buffers, in the tail (16-bit types only)
  T* next_cols;
  T* values;
  A* logits[2];
  T* coef[2];
  A* stage;

  // tail: where the kernel's layout ends (kSweepBytes or kBytes).
  __device__ __forceinline__ TileSmem(unsigned char* base, size_t tail)
      : stats(reinterpret_cast<A*>(base)),
        chunk_rows(reinterpret_cast<T*>(base + L::kOperandOffset)),
        chunk_cols(chunk_rows + kTile * L::kLdChunk),
        next_rows(reinterpret_cast<T*>(base + tail)),
        next_cols(next_rows + kTile * L::kLdChunk),
        values(chunk_rows),
        stage(reinterpret_cast<A*>(base + L::kStageOffset)) {
    for (int i = 0; i < 2; ++i) {
      logits[i] = reinterpret_cast<A*>(base + L::kLogitOffset) + i * kTile * L::kLdTile;
      coef[i] = L::kCoefInPlace
                    ? reinterpret_cast<T*>(logits[i])
                    : reinterpret_cast<T*>(base + L::kCoefOffset) + i * kTile * L::kLdCoef;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// kTile x kTile accumulators of a block-wide product, held in registers across the feature loop.
// Both implementations offer zero(), mma<kBTransposed, kATransposed> (this += A B over kk,
// A(i, k) = a[i*lda+k], or a[k*lda+i] when kATransposed (a coefficient tile applied to the
// columns' side); B(k, j) = b[j*ldb+k] when kBTransposed, the rows x columns logit products, else
// b[k*ldb+j], the coefficient x features products) and load/store from a float tile. Each
// thread (warp) loads and stores only the elements it accumulates.

// FMA path (float32, float64; 16-bit types below sm_80): thread (ty, tx) = (tid / 16, tid % 16)
// owns rows ty + 16 i and columns tx + 16 j, i, j < 4, so a warp reads consecutive columns.
template <typename T>
struct FmaTile {
  using A = accum_t<T>;
  A v[4][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) v[i][j] = A(0);
  }

  template <bool kBTransposed, bool kATransposed = false>
  __device__ __forceinline__ void mma(const T* a, int lda, const T* b, int ldb, int kk) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    for (int k = 0; k < kk; ++k) {
      A av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        av[i] = static_cast<A>(kATransposed ? a[k * lda + ty + 16 * i]
                                            : a[(ty + 16 * i) * lda + k]);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        bv[j] = static_cast<A>(kBTransposed ? b[(tx + 16 * j) * ldb + k]
                                            : b[k * ldb + tx + 16 * j]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) v[i][j] += av[i] * bv[j];
    }
  }

  __device__ __forceinline__ void load(const A* s, int lds) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) v[i][j] = s[(ty + 16 * i) * lds + tx + 16 * j];
  }
  __device__ __forceinline__ void store(A* s, int lds) const {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[(ty + 16 * i) * lds + tx + 16 * j] = v[i][j];
  }
};

namespace wmma = nvcuda::wmma;

template <typename T> struct WmmaElement;
template <> struct WmmaElement<c10::Half> { using type = __half; };
template <> struct WmmaElement<c10::BFloat16> { using type = __nv_bfloat16; };

// wmma::load_matrix_sync for an operand fragment in shared memory (every operand here is), said
// through the .shared state space. The API's loads take generic addresses and leave the compiler
// to prove them shared: it never does for bfloat16, nor for float16 through the resident rows'
// pointers, and then each fragment costs four to eight 32-bit generic loads where the same PTX
// instruction on .shared becomes one or two ldmatrix (LDSM). Same instruction, same fragment
// registers in the same order as the API's (mma.hpp), only the state space named. The "memory"
// clobber keeps the loads after the barrier that publishes the tile.
#define ICL_MSR_WMMA_LOAD4(OPCODE)                                                           \
  asm volatile(OPCODE " {%0, %1, %2, %3}, [%4], %5;"                                         \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                               \
               : "r"(address), "r"(ld)                                                        \
               : "memory")
#define ICL_MSR_WMMA_LOAD8(OPCODE)                                                           \
  asm volatile(OPCODE " {%0, %1, %2, %3, %4, %5, %6, %7}, [%8], %9;"                         \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]), "=r"(r[4]), "=r"(r[5]),      \
                 "=r"(r[6]), "=r"(r[7])                                                       \
               : "r"(address), "r"(ld)                                                        \
               : "memory")

template <typename Use, typename E, typename Layout>
__device__ __forceinline__ void load_shared_fragment(wmma::fragment<Use, 16, 16, 16, E, Layout>& f,
                                                     const E* p, unsigned ld) {
  constexpr bool kA = std::is_same_v<Use, wmma::matrix_a>;
  constexpr bool kRow = std::is_same_v<Layout, wmma::row_major>;
  constexpr bool kBf16 = std::is_same_v<E, __nv_bfloat16>;
  static_assert(sizeof(f.x) == (kBf16 ? 16 : 32), "fragment registers as in mma.hpp");
  uint32_t* r = reinterpret_cast<uint32_t*>(f.x);
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  if constexpr (kBf16) {
    if constexpr (kA && kRow)
      ICL_MSR_WMMA_LOAD4("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16");
    else if constexpr (kA)
      ICL_MSR_WMMA_LOAD4("wmma.load.a.sync.aligned.col.m16n16k16.shared.bf16");
    else if constexpr (kRow)
      ICL_MSR_WMMA_LOAD4("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16");
    else
      ICL_MSR_WMMA_LOAD4("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16");
  } else {
    if constexpr (kA && kRow)
      ICL_MSR_WMMA_LOAD8("wmma.load.a.sync.aligned.row.m16n16k16.shared.f16");
    else if constexpr (kA)
      ICL_MSR_WMMA_LOAD8("wmma.load.a.sync.aligned.col.m16n16k16.shared.f16");
    else if constexpr (kRow)
      ICL_MSR_WMMA_LOAD8("wmma.load.b.sync.aligned.row.m16n16k16.shared.f16");
    else
      ICL_MSR_WMMA_LOAD8("wmma.load.b.sync.aligned.col.m16n16k16.shared.f16");
  }
}
#undef ICL_MSR_WMMA_LOAD4
#undef ICL_MSR_WMMA_LOAD8

// Tensor-core path (float16, bfloat16 from sm_80): 16x16x16 WMMA fragments, float accumulators.
// Warp w owns fragment row w / 2 and fragment columns 2 (w % 2) and 2 (w % 2) + 1.
template <typename T>
struct WmmaTile {
  using E = typename WmmaElement<T>::type;  // c10::Half / BFloat16 share __half's bit layout
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag[2];

  __device__ static int row0() { return 16 * (threadIdx.x / 32 / 2); }
  __device__ static int col0(int f) { return 16 * (2 * (threadIdx.x / 32 % 2) + f); }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int f = 0; f < 2; ++f) wmma::fill_fragment(frag[f], 0.0f);
  }

  template <bool kBTransposed, bool kATransposed = false>
  __device__ __forceinline__ void mma(const T* a_tile, int lda, const T* b_tile, int ldb, int kk) {
    const E* a = reinterpret_cast<const E*>(a_tile);
    const E* b = reinterpret_cast<const E*>(b_tile);
    using ALayout = std::conditional_t<kATransposed, wmma::col_major, wmma::row_major>;
    using BLayout = std::conditional_t<kBTransposed, wmma::col_major, wmma::row_major>;
    for (int k = 0; k < kk; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, ALayout> fa;
      load_shared_fragment(fa, kATransposed ? a + k * lda + row0() : a + row0() * lda + k, lda);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, BLayout> fb;
        const E* b_frag = kBTransposed ? b + col0(f) * ldb + k : b + k * ldb + col0(f);
        load_shared_fragment(fb, b_frag, ldb);
        wmma::mma_sync(frag[f], fa, fb, frag[f]);
      }
    }
  }

  __device__ __forceinline__ void load(const float* s, int lds) {
#pragma unroll
    for (int f = 0; f < 2; ++f)
      wmma::load_matrix_sync(frag[f], s + row0() * lds + col0(f), lds, wmma::mem_row_major);
  }
  __device__ __forceinline__ void store(float* s, int lds) const {
#pragma unroll
    for (int f = 0; f < 2; ++f)
      wmma::store_matrix_sync(s + row0() * lds + col0(f), frag[f], lds, wmma::mem_row_major);
  }
};

// bfloat16 WMMA needs sm_80; older targets in TORCH_CUDA_ARCH_LIST fall back to FMA. The shared
// memory layout does not depend on this choice, so host and device agree on its size.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
constexpr bool kTensorCoreArch = true;
#else
constexpr bool kTensorCoreArch = false;
#endif
template <typename T>
using TileAcc = std::conditional_t<sizeof(T) == 2 && kTensorCoreArch, WmmaTile<T>, FmaTile<T>>;

// ---------------------------------------------------------------------------------------------
// Global <-> shared staging.

// Every copy between global and shared memory moves 16 bytes (LDG.128 / STG.128: one memory
// instruction per 8 half-precision elements rather than one per element). The host makes that
// possible (ops_cuda.h, vector_ready): feature and slab rows hold a multiple of kVec<T> elements
// and start 16-byte aligned, and every tile column offset is a multiple of kVec<T>, so a vector
// lies entirely inside or entirely outside the matrix. Shared rows whose leading dimension is a
// multiple of 16 bytes take vector stores too; the one-element pads of the 4- and 8-byte FMA
// layouts take element stores.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T>
union Vec16 {
  uint4 bits;
  T elems[kVec<T>];
};

// Calls f(i, j) for every 16-byte vector of a kRows x kCols tile of T (row i, first column j),
// spread over the CTA's threads. Unrolled over a trip count known at compile time (one vector
// per thread for a 64 x 32 half-precision chunk), so the copies are straight-line code.
template <int kRows, int kCols, typename T, typename F>
__device__ __forceinline__ void for_each_vector(const F& f) {
  static_assert(kCols % kVec<T> == 0, "tile columns are whole 16-byte vectors");
  constexpr int kVecsPerRow = kCols / kVec<T>, kTotal = kRows * kVecsPerRow;
#pragma unroll
  for (int k = 0; k < (kTotal + kThreads - 1) / kThreads; ++k) {
    const int idx = int(threadIdx.x) + k * kThreads;
    if (kTotal % kThreads != 0 && idx >= kTotal) break;
    f(idx / kVecsPerRow, idx % kVecsPerRow * kVec<T>);
  }
}

// dst[0 : kVec] = the vector src[r * src_cols + c :], zero where (r, c) falls outside the
// src_rows x src_cols matrix. One 16-byte store when dst_aligned (a compile-time constant in the
// tile loads, where the branch folds away), else element stores.
template <typename T>
__device__ __forceinline__ void copy_vector(T* dst, bool dst_aligned, const T* src,
                                            int64_t src_rows, int64_t src_cols, int64_t r,
                                            int64_t c) {
  Vec16<T> v;
  v.bits = make_uint4(0, 0, 0, 0);  // zero in every floating type
  if (r < src_rows && c < src_cols) v.bits = *reinterpret_cast<const uint4*>(src + r * src_cols + c);
  if (dst_aligned) {
    *reinterpret_cast<uint4*>(dst) = v.bits;
  } else {
#pragma unroll
    for (int e = 0; e < kVec<T>; ++e) dst[e] = v.elems[e];
  }
}

// dst[i * kLd + j] = src[(row0 + i) * src_cols + col0 + j] over a kRows x kCols tile, zero where
// that falls outside the src_rows x src_cols matrix (so padded rows, columns and features add
// nothing to the products).
template <int kRows, int kCols, int kLd, typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t src_rows,
                                          int64_t src_cols, int64_t row0, int64_t col0) {
  for_each_vector<kRows, kCols, T>([&](int i, int j) {
    copy_vector(dst + i * kLd + j, kLd % kVec<T> == 0, src, src_rows, src_cols, row0 + i,
                col0 + j);
  });
}

// load_tile without waiting, for 16-bit types from sm_80: cp.async 16-byte copies (one LDGSTS
// each, no registers), committed as one group that wait_async_tiles<n>() then waits for, so the
// copy of the next chunk overlaps the products of this one. A vector outside the matrix reads
// nothing (source size 0) and is zero-filled; its source address is then the matrix's start,
// so that no address past the matrix is ever formed.
template <typename T>
constexpr bool kAsyncTiles = sizeof(T) == 2 && kTensorCoreArch;

template <int kRows, int kCols, int kLd, typename T>
__device__ __forceinline__ void load_tile_async(T* dst, const T* src, int64_t src_rows,
                                                int64_t src_cols, int64_t row0, int64_t col0) {
  static_assert(kAsyncTiles<T> && kLd % kVec<T> == 0, "cp.async writes whole aligned vectors");
  for_each_vector<kRows, kCols, T>([&](int i, int j) {
    const int64_t r = row0 + i, c = col0 + j;
    const bool inside = r < src_rows && c < src_cols;
    const T* from = inside ? src + r * src_cols + c : src;
    const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(dst + i * kLd + j));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :
                 : "r"(to), "l"(from), "r"(inside ? 16 : 0)
                 : "memory");
  });
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// Waits until at most kPending of this thread's load_tile_async groups are in flight; a
// barrier after it makes every thread's copies visible to the CTA.
template <int kPending>
__device__ __forceinline__ void wait_async_tiles() {
  asm volatile("cp.async.wait_group %0;" : : "n"(kPending) : "memory");
}

// The inverse of load_tile for the part of the tile inside the matrix.
template <int kRows, int kCols, int kLd, typename T>
__device__ __forceinline__ void store_tile(T* dst, int64_t dst_rows, int64_t dst_cols,
                                           int64_t row0, int64_t col0, const T* src) {
  for_each_vector<kRows, kCols, T>([&](int i, int j) {
    const int64_t r = row0 + i, c = col0 + j;
    if (r >= dst_rows || c >= dst_cols) return;
    Vec16<T> v;
    if constexpr (kLd % kVec<T> == 0) {
      v.bits = *reinterpret_cast<const uint4*>(src + i * kLd + j);
    } else {
#pragma unroll
      for (int e = 0; e < kVec<T>; ++e) v.elems[e] = src[i * kLd + j + e];
    }
    *reinterpret_cast<uint4*>(dst + r * dst_cols + c) = v.bits;
  });
}

// dst += the tile, for the part inside the matrix, in a float buffer that CTAs add to one after
// another (the symmetric contrastive sweep, which hands the buffer on with turn counters). The
// reads go past L1 (ld.global.cg), which may still hold lines of the buffer from before the
// turn; the writes reach L2 either way.
template <int kRows, int kCols, int kLd, typename A>
__device__ __forceinline__ void add_tile(A* dst, int64_t dst_rows, int64_t dst_cols, int64_t row0,
                                         int64_t col0, const A* src) {
  for_each_vector<kRows, kCols, A>([&](int i, int j) {
    const int64_t r = row0 + i, c = col0 + j;
    if (r >= dst_rows || c >= dst_cols) return;
    uint4* to = reinterpret_cast<uint4*>(dst + r * dst_cols + c);
    Vec16<A> v;
    v.bits = __ldcg(to);
#pragma unroll
    for (int e = 0; e < kVec<A>; ++e) v.elems[e] += src[i * kLd + j + e];
    *to = v.bits;
  });
}

// The owned block's features held in shared memory for a whole sweep (a, and b unless absent):
// staged once, zero-padded to whole feature chunks, so that the products stage only the
// swept side. A kernel keeps them where its dynamic shared memory has room (`extra_bytes`,
// decided on the host from D alone); otherwise (`held` false) the products stage both sides
// with every tile. Either way the same operands meet in the same order: identical results.
template <typename T>
struct ResidentRows {
  // Set whether or not the rows are held (`held`), so that the pointers are always into shared
  // memory.
  const T* a = nullptr;
  const T* b = nullptr;
  int ld_a = 0, ld_b = 0;
  bool held = false;

  // At most 160 KiB (under an A100's 163), and what the GPU allows: 99 KiB on sm_86/89/120.
  static constexpr size_t kMaxKernelBytes = 160 * 1024;
  // Not compiled for float64, whose tiles already fill the shared memory (and the kernels'
  // registers).
  static constexpr bool kEnabled = sizeof(T) < 8;

  // Rows are zero-padded to whole `step`-wide feature chunks: kChunk for the logit products,
  // which read them kChunk features at a time; kTile for a kernel that also takes them as the
  // right operand of a product kTile features at a time (the symmetric backward).
  __host__ __device__ static int width(int64_t dim, int step) {
    return static_cast<int>(ceil_div(dim, step) * step);
  }
  __host__ __device__ static int ld(int64_t dim, int step) {
    return width(dim, step) + TileLayout<T>::kPad;
  }
  __host__ __device__ static size_t bytes(int64_t dim, int step) {
    return dim > 0 ? TileLayout<T>::aligned(size_t(kTile) * ld(dim, step) * sizeof(T)) : 0;
  }
  // Shared memory the resident rows take beyond a kernel's `base` bytes on the current GPU: 0
  // when they would not fit (or for float64, whose tiles already fill it). dim_b is 0 without b.
  static size_t extra_bytes(size_t base, int64_t dim_a, int64_t dim_b, int step = kChunk) {
    const size_t extra = bytes(dim_a, step) + bytes(dim_b, step);
    return kEnabled && base + extra <= std::min(kMaxKernelBytes, shared_memory_limit()) ? extra
                                                                                     : 0;
  }

  // Stage rows row0 .. row0 + kTile of a (and b) into `region` (the `extra_bytes` after the
  // kernel's layout, for the same step), or leave the struct empty when `resident` is false.
  // Ends with a barrier.
  __device__ __forceinline__ static ResidentRows stage(bool resident, unsigned char* region,
                                                       const T* src_a, int64_t dim_a,
                                                       const T* src_b, int64_t dim_b,
                                                       int64_t n_rows, int64_t row0,
                                                       int step = kChunk) {
    ResidentRows r;
    r.a = reinterpret_cast<const T*>(region);
    r.b = reinterpret_cast<const T*>(region + bytes(dim_a, step));
    r.ld_a = ld(dim_a, step);
    r.ld_b = ld(dim_b, step);
    r.held = kEnabled && resident;
    if (!r.held) return r;
    stage_block(reinterpret_cast<T*>(region), r.ld_a, src_a, dim_a, width(dim_a, step), n_rows,
                row0);
    if (dim_b > 0)
      stage_block(reinterpret_cast<T*>(region + bytes(dim_a, step)), r.ld_b, src_b, dim_b,
                  width(dim_b, step), n_rows, row0);
    __syncthreads();
    return r;
  }

 private:
  // dst[i * ld + j] = src[(row0 + i) * dim + j] for the block's kTile rows over the padded
  // width, zero outside the n_rows x dim matrix; 16-byte loads (dim is whole vectors).
  __device__ __forceinline__ static void stage_block(T* dst, int ld, const T* src, int64_t dim,
                                                     int width, int64_t n_rows, int64_t row0) {
    const int vecs_per_row = width / kVec<T>;
    for (int idx = threadIdx.x; idx < kTile * vecs_per_row; idx += kThreads) {
      const int i = idx / vecs_per_row, j = idx % vecs_per_row * kVec<T>;
      copy_vector(dst + i * ld + j, ld % kVec<T> == 0, src, n_rows, dim, row0 + i, j);
    }
  }
};

// Step 1: acc += rows[row0 : row0 + kTile] · cols[col0 : col0 + kTile]ᵀ over `dim` features;
// the rows read from `resident` (shared memory, leading dimension ld_resident) when held.
template <typename T>
__device__ __forceinline__ void tile_product(TileAcc<T>& acc, const TileSmem<T>& sm, const T* rows,
                             int64_t n_rows, int64_t row0, const T* cols, int64_t n_cols,
                             int64_t col0, int64_t dim, bool held = false,
                             const T* resident = nullptr, int ld_resident = 0) {
  using L = TileLayout<T>;
  if (dim <= 0) return;  // (and no copy left in flight unwaited)
  if constexpr (kAsyncTiles<T>) {
    // Double-buffered: the next chunk is copied during the products of this one, and the
    // barrier closing each step lets the next step's copy overwrite the buffer this one read.
    // While the rows are held, the rows' chunk buffer is free, so the swept side alternates
    // between the two chunk buffers; otherwise both sides alternate between the two pairs.
    // (Pointers swapped by value: an indexed pair would live in local memory.)
    if (held) {
      T* current = sm.chunk_cols;
      T* next = sm.chunk_rows;
      load_tile_async<kTile, kChunk, L::kLdChunk>(current, cols, n_cols, dim, col0, 0);
      for (int64_t k0 = 0; k0 < dim; k0 += kChunk, std::swap(current, next)) {
        if (k0 + kChunk < dim) {
          load_tile_async<kTile, kChunk, L::kLdChunk>(next, cols, n_cols, dim, col0,
                                                      k0 + kChunk);
          wait_async_tiles<1>();
        } else {
          wait_async_tiles<0>();
        }
        __syncthreads();
        acc.template mma</*kBTransposed=*/true>(resident + k0, ld_resident, current, L::kLdChunk,
                                                kChunk);
        __syncthreads();
      }
      return;
    }
    T* rows_now = sm.chunk_rows;
    T* cols_now = sm.chunk_cols;
    T* rows_next = sm.next_rows;
    T* cols_next = sm.next_cols;
    load_tile_async<kTile, kChunk, L::kLdChunk>(rows_now, rows, n_rows, dim, row0, 0);
    load_tile_async<kTile, kChunk, L::kLdChunk>(cols_now, cols, n_cols, dim, col0, 0);
    for (int64_t k0 = 0; k0 < dim;
         k0 += kChunk, std::swap(rows_now, rows_next), std::swap(cols_now, cols_next)) {
      if (k0 + kChunk < dim) {
        load_tile_async<kTile, kChunk, L::kLdChunk>(rows_next, rows, n_rows, dim, row0,
                                                    k0 + kChunk);
        load_tile_async<kTile, kChunk, L::kLdChunk>(cols_next, cols, n_cols, dim, col0,
                                                    k0 + kChunk);
        wait_async_tiles<2>();  // (a group a side)
      } else {
        wait_async_tiles<0>();
      }
      __syncthreads();
      acc.template mma</*kBTransposed=*/true>(rows_now, L::kLdChunk, cols_now, L::kLdChunk,
                                              kChunk);
      __syncthreads();
    }
  } else {
    if constexpr (ResidentRows<T>::kEnabled) {
      if (held) {  // two loops rather than a branch in one: both straight-line
        for (int64_t k0 = 0; k0 < dim; k0 += kChunk) {
          load_tile<kTile, kChunk, L::kLdChunk>(sm.chunk_cols, cols, n_cols, dim, col0, k0);
          __syncthreads();
          acc.template mma</*kBTransposed=*/true>(resident + k0, ld_resident, sm.chunk_cols,
                                                  L::kLdChunk, kChunk);
          __syncthreads();
        }
        return;
      }
    }
    for (int64_t k0 = 0; k0 < dim; k0 += kChunk) {
      load_tile<kTile, kChunk, L::kLdChunk>(sm.chunk_rows, rows, n_rows, dim, row0, k0);
      load_tile<kTile, kChunk, L::kLdChunk>(sm.chunk_cols, cols, n_cols, dim, col0, k0);
      __syncthreads();
      acc.template mma</*kBTransposed=*/true>(sm.chunk_rows, L::kLdChunk, sm.chunk_cols,
                                              L::kLdChunk, kChunk);
      __syncthreads();
    }
  }
}

// Step 3: slab[own0 : own0 + kTile, :] += coef0 · value0[swept0 : swept0 + kTile, :]
//                                         (+ coef1 · value1[...] when value1 is given),
// over the `dim` feature columns, kTile at a time. coef0/coef1 are kTile x kTile tiles in shared
// memory (owned x swept, leading dimension kLdCoef) written by the elementwise phase; this call
// begins with a barrier that publishes them.
template <typename T>
__device__ __forceinline__ void tile_accumulate(const TileSmem<T>& sm, accum_t<T>* slab, int64_t n_own,
                                int64_t own0, int64_t dim, int64_t n_swept, int64_t swept0,
                                const T* coef0, const T* value0, const T* coef1 = nullptr,
                                const T* value1 = nullptr) {
  using L = TileLayout<T>;
  for (int64_t d0 = 0; d0 < dim; d0 += kTile) {
    load_tile<kTile, kTile, L::kLdTile>(sm.stage, slab, n_own, dim, own0, d0);
    load_tile<kTile, kTile, L::kLdValue>(sm.values, value0, n_swept, dim, swept0, d0);
    __syncthreads();
    TileAcc<T> acc;
    acc.load(sm.stage, L::kLdTile);
    acc.template mma<false>(coef0, L::kLdCoef, sm.values, L::kLdValue, kTile);
    if (value1 != nullptr) {
      __syncthreads();
      load_tile<kTile, kTile, L::kLdValue>(sm.values, value1, n_swept, dim, swept0, d0);
      __syncthreads();
      acc.template mma<false>(coef1, L::kLdCoef, sm.values, L::kLdValue, kTile);
    }
    acc.store(sm.stage, L::kLdTile);
    __syncthreads();
    store_tile<kTile, kTile, L::kLdTile>(slab, n_own, dim, own0, d0, sm.stage);
    __syncthreads();
  }
}

// Step 3 with the owned rows' results in registers for the whole sweep: the gradients of the a
// and b features, each in kChunks kTile-wide feature chunks from feature d0 (the kernel's
// feature group), written to the slab once at the end, so a swept tile costs no slab traffic.
// (kGradChunks, four, cover D = 256 in 128 accumulator registers per thread for a and b
// together; float64 takes two.)
template <typename T>
constexpr int kGradChunks = sizeof(accum_t<T>) == 8 ? 2 : 4;

template <typename T, int kChunks = kGradChunks<T>>
struct RowGradients {
  using L = TileLayout<T>;
  TileAcc<T> acc[2][kChunks];  // [a, b][feature chunk]

  // The swept features of one tile: a's, then b's (none when chunks_b is 0), each in the
  // kTile-wide chunks of the feature group that fall inside its width. A tile's products take
  // the chunks in that order, "position" 0, 1, ... across both.
  // (Members by name and selected with ?:, not arrays: a runtime index would put an array in
  // local memory.)
  struct Swept {
    const T* a;
    const T* b;
    int64_t dim_a, dim_b;
    int chunks_a, chunks_b;
    int64_t n_swept, swept0, d0;

    __device__ Swept(const T* a_, int64_t dim_a_, const T* b_, int64_t dim_b_, bool with_b,
                     int64_t n_swept_, int64_t swept0_, int64_t d0_)
        : a(a_), b(b_), dim_a(dim_a_), dim_b(dim_b_), chunks_a(chunks_inside(dim_a_, d0_)),
          chunks_b(with_b ? chunks_inside(dim_b_, d0_) : 0), n_swept(n_swept_),
          swept0(swept0_), d0(d0_) {}
    __device__ static int chunks_inside(int64_t dim, int64_t d0) {
      return dim > d0 ? static_cast<int>(std::min<int64_t>(ceil_div(dim - d0, kTile),
                                                           kChunks))
                      : 0;
    }
    __device__ const T* features(int g) const { return g == 0 ? a : b; }
    __device__ int64_t dim(int g) const { return g == 0 ? dim_a : dim_b; }
    __device__ int chunks(int g) const { return g == 0 ? chunks_a : chunks_b; }
    __device__ int count() const { return chunks_a + chunks_b; }
  };

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int g = 0; g < 2; ++g)
#pragma unroll
      for (int c = 0; c < kChunks; ++c) acc[g][c].zero();
  }

  // Copies the swept features at `position` into its buffer: asynchronously where cp.async
  // exists (16-bit types from sm_80), alternating between sm.values and the slab stage (free
  // during the sweep), so that the next chunk is in flight during this one's products, and the
  // first during the coefficient phase (begin); otherwise in place, one at a time.
  __device__ __forceinline__ static T* buffer(const TileSmem<T>& sm, int position) {
    if constexpr (kAsyncTiles<T>) {
      static_assert(kTile * L::kLdValue * sizeof(T) <= kTile * L::kLdTile * sizeof(accum_t<T>),
                    "a value tile fits in the stage");
      if (position % 2 == 0) return reinterpret_cast<T*>(sm.stage);
    }
    return sm.values;
  }
  __device__ __forceinline__ static void load(const TileSmem<T>& sm, const Swept& s,
                                              int position) {
    const int g = position < s.chunks_a ? 0 : 1;
    const int64_t d = s.d0 + (position - g * s.chunks_a) * kTile;
    if constexpr (kAsyncTiles<T>)
      load_tile_async<kTile, kTile, L::kLdValue>(buffer(sm, position), s.features(g),
                                                 s.n_swept, s.dim(g), s.swept0, d);
    else
      load_tile<kTile, kTile, L::kLdValue>(buffer(sm, position), s.features(g), s.n_swept,
                                           s.dim(g), s.swept0, d);
  }

  // Before the coefficient phase of a tile (after its logits): starts the first copy.
  __device__ __forceinline__ static void begin(const TileSmem<T>& sm, const Swept& s) {
    if constexpr (kAsyncTiles<T>)
      if (s.count() > 0) load(sm, s, 0);
  }

  // this[g] += coef[g] · the swept chunks of gradient g. coef: the owned x swept tiles the
  // coefficient phase wrote (leading dimension kLdCoef); the first barrier here publishes them.
  // Ends with a barrier (when there is a chunk), after which the buffers may be overwritten.
  __device__ __forceinline__ void accumulate(const TileSmem<T>& sm, const T* const coef[2],
                                             const Swept& s) {
#pragma unroll
    for (int g = 0; g < 2; ++g)
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        if (c >= s.chunks(g)) break;
        const int position = g * s.chunks_a + c;
        if constexpr (kAsyncTiles<T>) {
          if (position + 1 < s.count()) {
            load(sm, s, position + 1);
            wait_async_tiles<1>();
          } else {
            wait_async_tiles<0>();
          }
        } else {
          load(sm, s, position);
        }
        __syncthreads();
        acc[g][c].template mma<false>(coef[g], L::kLdCoef, buffer(sm, position), L::kLdValue,
                                      kTile);
        __syncthreads();
      }
  }

  // slab[g][own0 : own0 + kTile, d0 : d0 + kChunks * kTile] = this[g], inside n_own x dim
  // (+= with `add`, add_tile's read-modify-write).
  __device__ __forceinline__ void store(const TileSmem<T>& sm, accum_t<T>* const slab[2],
                                        int64_t n_own, int64_t own0, const Swept& s,
                                        bool add = false) const {
#pragma unroll
    for (int g = 0; g < 2; ++g)
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        if (c >= s.chunks(g)) break;
        const int64_t d = s.d0 + c * kTile;
        acc[g][c].store(sm.stage, L::kLdTile);
        __syncthreads();
        if (add)
          add_tile<kTile, kTile, L::kLdTile>(slab[g], n_own, s.dim(g), own0, d, sm.stage);
        else
          store_tile<kTile, kTile, L::kLdTile>(slab[g], n_own, s.dim(g), own0, d, sm.stage);
        __syncthreads();
      }
  }
};

// Logits of tile (row block row0, column tile col0) into sm.logits: [0] the base term a·a',
// [1] the interventional term: a·a' + b·b' ("concat", continuing the same accumulator) or b·b'
// ("add"). Features arrive pre-scaled by 1/sqrt(tau), so these are already R/tau.
// The rows come from `resident` when it holds them.
template <typename T>
__device__ __forceinline__ void contrastive_logits(const TileSmem<T>& sm, const T* a, const T* b, int64_t rows,
                                   int64_t row0, const T* a_cols, const T* b_cols, int64_t cols,
                                   int64_t col0, int64_t dim_a, int64_t dim_b, int64_t combine,
                                   const ResidentRows<T>& resident = ResidentRows<T>{}) {
  using L = TileLayout<T>;
  TileAcc<T> acc;
  acc.zero();
  tile_product(acc, sm, a, rows, row0, a_cols, cols, col0, dim_a, resident.held, resident.a,
               resident.ld_a);
  acc.store(sm.logits[0], L::kLdTile);
  if (combine == kCombineNone) return;
  if (combine == kCombineAdd) acc.zero();
  tile_product(acc, sm, b, rows, row0, b_cols, cols, col0, dim_b, resident.held, resident.b,
               resident.ld_b);
  acc.store(sm.logits[1], L::kLdTile);
}

// ---------------------------------------------------------------------------------------------
// Elementwise phase: thread t handles tile row t / kLanesPerRow and, of its columns, those
// congruent to its lane modulo kLanesPerRow, so that a warp's reads hit distinct banks.
__device__ inline int tile_row() { return threadIdx.x / kLanesPerRow; }
__device__ inline int tile_lane() { return threadIdx.x % kLanesPerRow; }
__device__ inline int tile_col(int m) { return tile_lane() + kLanesPerRow * m; }

// max that keeps a NaN once seen, so that NaN inputs give NaN losses as in the reference.
template <typename A>
__device__ A nan_max(A m, A v) {
  return (v > m || v != v) ? v : m;
}

// Folds this thread's share of a tile row, score(q) over the columns q where valid(q), into its
// running (max, sum) with one max and one exp per element and a single lse_merge per tile.
template <typename A, typename Score, typename Valid>
__device__ __forceinline__ void fold_tile_row(A& run_max, A& run_sum, Score score, Valid valid) {
  A tile_max = neg_inf<A>();
#pragma unroll
  for (int m = 0; m < kColsPerLane; ++m)
    if (valid(tile_col(m))) tile_max = nan_max(tile_max, score(tile_col(m)));
  if (tile_max == neg_inf<A>()) return;
  A tile_sum = 0;
#pragma unroll
  for (int m = 0; m < kColsPerLane; ++m)
    if (valid(tile_col(m))) tile_sum += fast_exp(score(tile_col(m)) - tile_max);
  lse_merge(run_max, run_sum, tile_max, tile_sum);
}

// Combine the running (max, sum) of the lanes of a tile row. Merging is symmetric, so every lane
// ends with the same bits; the butterfly order is fixed, so results are deterministic.
template <typename A>
__device__ __forceinline__ void merge_lanes(A& run_max, A& run_sum) {
#pragma unroll
  for (int offset = 1; offset < kLanesPerRow; offset *= 2) {
    const A other_max = __shfl_xor_sync(0xffffffffu, run_max, offset);
    const A other_sum = __shfl_xor_sync(0xffffffffu, run_sum, offset);
    lse_merge(run_max, run_sum, other_max, other_sum);
  }
}

template <typename A>
__device__ A sum_lanes(A value) {
#pragma unroll
  for (int offset = 1; offset < kLanesPerRow; offset *= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// The max over the lanes of a tile row (NaN kept).
template <typename A>
__device__ A max_lanes(A value) {
#pragma unroll
  for (int offset = 1; offset < kLanesPerRow; offset *= 2)
    value = nan_max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

// ---------------------------------------------------------------------------------------------
// Host side.

// How many CTAs share one owned block's sweep (each with its own slab, summed afterwards).
// Splitting keeps the GPU busy when there are few owned blocks (small batches, few prototypes).
// The rule depends only on the problem size, never on the device, so a given input always takes
// the same path; it is capped so that the slabs hold at most kMaxSlabRows rows beyond one.
// CTAs a launch aims at: about two waves on an H100/H200 (132 SMs, one CTA each).
constexpr int64_t kTargetCtas = 256;

struct SweepSplit {
  int64_t splits;
  int64_t tiles_per_split;
};
inline SweepSplit split_sweep(int64_t owned_blocks, int64_t swept_tiles, int64_t n_own) {
  constexpr int64_t kMaxSlabRows = 16384;
  int64_t splits = ceil_div(kTargetCtas, std::max<int64_t>(owned_blocks, 1));
  splits = std::min(splits, std::max<int64_t>(1, kMaxSlabRows / std::max<int64_t>(n_own, 1)));
  splits = std::max<int64_t>(1, std::min(splits, swept_tiles));
  const int64_t per_split = ceil_div(std::max<int64_t>(swept_tiles, 1), splits);
  return {ceil_div(std::max<int64_t>(swept_tiles, 1), per_split), per_split};
}

// Lets `kernel` use `bytes` of dynamic shared memory (above the default 48 KiB), with a clear
// error on a GPU that has less.
template <typename Kernel>
void allow_shared_memory(Kernel* kernel, size_t bytes) {
  const size_t limit = shared_memory_limit();
  TORCH_CHECK(bytes <= limit, "icl_msr CUDA kernels need ", bytes,
              " bytes of shared memory per block; this GPU allows ", limit);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

}  // namespace icl_msr::cuda
