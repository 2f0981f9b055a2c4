// The CUDA builtins that csrc/cuda/moco_device.cuh uses, emulated on the host so that
// its kernels run unchanged on a machine without a GPU: each CUDA thread of a block is a
// std::thread; __syncthreads is a barrier of the block's 256 threads, __shfl_xor_sync an
// exchange between the 32 threads of a warp; __half and __nv_bfloat16 round to nearest
// even like the device conversions; nvcuda::wmma fragments hold the whole 16 x 16 tile in
// every lane (the hardware spreads it over the lanes in an unspecified layout that the
// kernels never rely on) and load / store with the documented semantics: row_major element
// (i, j) at p[i * ldm + j], col_major at p[i + j * ldm].
//
// Besides computing, the emulation checks what a GPU would not report clearly: every wmma
// pointer is 256-bit aligned, every ldm a multiple of 16 bytes, and no fragment reaches
// past the dynamic shared memory of the launch. Shared memory starts every block filled
// with NaN bytes, so a read of an element no thread wrote shows in the results.
#pragma once

#define ASTREA_CUDA_EMULATION 1

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;

namespace emulation {

constexpr int kBlockThreads = 256;
constexpr size_t kSharedBytes = 228 * 1024;  // an H100's shared memory per SM

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "FAILED: %s (thread %u of block %u)\n", what, threadIdx.x, blockIdx.x);
  std::exit(1);
}

struct Block {
  std::barrier<> all{kBlockThreads};
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  float lanes[kBlockThreads];
  Block() {
    for (int w = 0; w < kBlockThreads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
};

inline Block* block = nullptr;
inline size_t shared_bytes = 0;  // dynamic shared memory of the running launch

}  // namespace emulation

// The dynamic shared memory that moco_device.cuh declares as an unsized extern __shared__
// array inside namespace astrea::cuda::detail.
namespace astrea::cuda::detail {
alignas(128) inline unsigned char shared_memory[emulation::kSharedBytes];
}

namespace emulation {

using astrea::cuda::detail::shared_memory;

inline void sync_warp() { block->warps[threadIdx.x / 32]->arrive_and_wait(); }

// Runs kernel(args...) on `blocks` blocks of 256 threads, one block after the other.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t blocks, size_t bytes, Args... args) {
  if (bytes > kSharedBytes) fail("launch asks for more shared memory than an SM has");
  for (int64_t b = 0; b < blocks; ++b) {
    std::memset(shared_memory, 0xFF, kSharedBytes);
    shared_bytes = bytes;
    Block state;
    block = &state;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < kBlockThreads; ++t) {
      threads.emplace_back([=] {
        threadIdx.x = t;
        blockIdx.x = static_cast<unsigned>(b);
        kernel(args...);
      });
    }
    for (auto& thread : threads) thread.join();
  }
}

}  // namespace emulation

inline void __syncthreads() { emulation::block->all.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask*/, float value, int lane_mask) {
  emulation::block->lanes[threadIdx.x] = value;
  emulation::sync_warp();
  const float other = emulation::block->lanes[threadIdx.x ^ lane_mask];
  emulation::sync_warp();
  return other;
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct __half {
  _Float16 value;
};
inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half(float f) { return {static_cast<_Float16>(f)}; }

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t bits = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if (std::isnan(f)) return {0x7fc0};
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(bits >> 16)};
}

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kRows * kCols;
  float x[num_elements];
};

inline float element_to_float(float v) { return v; }
inline float element_to_float(__half v) { return __half2float(v); }
inline float element_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename E>
void check_pointer(const E* p, unsigned ldm, int rows, int cols, bool row_major) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emulation::fail("wmma pointer not 256-bit aligned");
  if (ldm * sizeof(E) % 16 != 0) emulation::fail("wmma ldm not a multiple of 16 bytes");
  const auto* begin = reinterpret_cast<const unsigned char*>(p);
  const size_t extent = row_major ? (rows - 1) * size_t{ldm} + cols : (cols - 1) * size_t{ldm} + rows;
  const auto* end = reinterpret_cast<const unsigned char*>(p + extent);
  const unsigned char* shared = emulation::shared_memory;
  if (begin >= shared && begin < shared + emulation::kSharedBytes && end > shared + emulation::shared_bytes) {
    emulation::fail("wmma fragment past the launch's dynamic shared memory");
  }
}

template <typename Frag, typename E>
void load(Frag& f, const E* p, unsigned ldm, bool row_major) {
  check_pointer(p, ldm, Frag::kRows, Frag::kCols, row_major);
  for (int i = 0; i < Frag::kRows; ++i) {
    for (int j = 0; j < Frag::kCols; ++j) {
      f.x[i * Frag::kCols + j] = element_to_float(row_major ? p[i * ldm + j] : p[i + j * ldm]);
    }
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (float& v : f.x) v = value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename E>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const E* p, unsigned ldm) {
  load(f, p, ldm, std::is_same_v<Layout, row_major>);
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const float* p, unsigned ldm, layout_t layout) {
  load(f, p, ldm, layout == mem_row_major);
}

// Every lane holds the same tile: lane 0 stores it, between warp barriers so that no lane
// of the warp reads the memory meanwhile.
template <int M, int N, int K, typename T>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  check_pointer(p, ldm, M, N, layout == mem_row_major);
  emulation::sync_warp();
  if (threadIdx.x % 32 == 0) {
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N; ++j) (layout == mem_row_major ? p[i * ldm + j] : p[i + j * ldm]) = f.x[i * N + j];
    }
  }
  emulation::sync_warp();
}

template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LayoutA>& a,
              const fragment<matrix_b, M, N, K, T, LayoutB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k) sum += a.x[i * K + k] * b.x[k * N + j];
      out[i * N + j] = sum;
    }
  }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace nvcuda::wmma
