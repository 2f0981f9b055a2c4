// Matrix products whose sums do not depend on the thread count (astrea/_blas.py is the
// Python side of the same switch).
//
// torch's CPU BLAS (MKL in the x86-64 wheels) splits a long reduction, the K of an
// [M, K] @ [K, N] product with a small M x N output, over its threads, so the last bits of
// the result change with the thread count. MKL's MKL_Set_Num_Threads_Local makes the
// calling thread's BLAS calls run on one thread; it is looked up as a weak symbol, null where
// torch's BLAS is not MKL (the products then follow that BLAS). oneDNN, which runs torch's
// bf16/fp16 CPU GEMMs, sizes its blocking (and so its summation order) by the threads OpenMP
// reports to the calling thread, even inside a parallel region where it then runs on one: the
// guard also sets that count to 1 (omp_set_num_threads is per thread, restored after).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace astrea {

// While alive, this thread's BLAS calls (MKL and oneDNN) run on one thread.
class SingleThreadBlas {
 public:
  SingleThreadBlas()
      : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0), previous_omp_(omp_get_max_threads()) {
    omp_set_num_threads(1);
  }
  ~SingleThreadBlas() {
    omp_set_num_threads(previous_omp_);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadBlas(const SingleThreadBlas&) = delete;
  SingleThreadBlas& operator=(const SingleThreadBlas&) = delete;

 private:
  int previous_;  // 0: the thread followed the global setting
  int previous_omp_;
};

// Runs tile(index) for every index in [0, count) over at::parallel_for, each worker's BLAS
// calls on one thread and below autograd (the callers are ops with their own backward: the
// products inside are not traced).
template <typename Tile>
void parallel_tiles(int64_t count, Tile tile) {
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    SingleThreadBlas one_thread;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t index = begin; index < end; ++index) tile(index);
  });
}

// out = a @ b (out [M, N], a [M, K], b [K, N]) in tiles of kRows x kCols fixed by the sizes,
// each on one BLAS thread, spread over at::parallel_for. A BLAS threading one call cuts the
// output by its thread count, and its edge tiles sum in another order than its full ones
// (MKL's AVX2 kernels do, even for a short K): this product is the same on any thread count.
inline void mm_fixed_order(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  constexpr int64_t kRows = 64, kCols = 512;
  const int64_t rows = a.size(0), cols = b.size(1);
  const int64_t col_blocks = (cols + kCols - 1) / kCols;
  const int64_t tiles = (rows + kRows - 1) / kRows * col_blocks;
  parallel_tiles(tiles, [&](int64_t tile) {
    const int64_t row = tile / col_blocks * kRows, col = tile % col_blocks * kCols;
    const int64_t count = std::min(kRows, rows - row), width = std::min(kCols, cols - col);
    at::Tensor target = out.narrow(0, row, count).narrow(1, col, width);
    at::mm_out(target, a.narrow(0, row, count), b.narrow(1, col, width));
  });
}

// out += a @ b (out [M, N], a [M, K], b [K, N]) in blocks of kRows rows fixed by M, each
// block's product on one BLAS thread, the blocks spread over at::parallel_for: the same
// sums in the same order on any thread count.
inline void addmm_fixed_order(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  constexpr int64_t kRows = 32;
  const int64_t rows = a.size(0);
  const int64_t blocks = (rows + kRows - 1) / kRows;
  parallel_tiles(blocks, [&](int64_t block) {
    const int64_t first = block * kRows;
    const int64_t count = std::min(kRows, rows - first);
    at::Tensor out_rows = out.narrow(0, first, count);
    out_rows.addmm_(a.narrow(0, first, count), b);
  });
}

}  // namespace astrea
