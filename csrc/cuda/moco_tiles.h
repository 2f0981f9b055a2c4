// Geometry of the tensor-core score tiles of moco_kernels.cu: shared-memory pitches,
// which warp computes which 16 x 16 wmma fragment, which thread stages which elements.
// Plain C++17 without CUDA headers, so that tests/cpp/moco_tile_layout.cpp checks it on
// the host with g++; the kernels take every offset and leading dimension from here.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ASTREA_HOST_DEVICE __host__ __device__
#else
#define ASTREA_HOST_DEVICE
#endif

namespace astrea::cuda {

inline constexpr int kThreads = 256;  // threads of every tile kernel
inline constexpr int kWarps = kThreads / 32;
inline constexpr int kFragment = 16;  // wmma m = n = k

// One tile of Rows q rows x Keys queue rows, 16-bit inputs (fp16 / bf16), fp32 results.
//
// Shared memory, every array 32-byte aligned:
//   rows   [Rows][kStagePitch] 16-bit: kDepth features of the q rows (one stage).
//          matrix_a, row_major: element (row m, feature k) at m * kStagePitch + k.
//   keys   [Keys][kStagePitch] 16-bit: the same features of the queue rows. Scores are
//          rows . keys^T, so keys is matrix_b col_major there: element (feature k, key n)
//          at n * kStagePitch + k. The gradient is probs . keys, where the same memory is
//          matrix_b row_major: element (key k, feature n) at k * kStagePitch + n.
//   probs  [Rows][kProbPitch] 16-bit: softmax probabilities of the tile, matrix_a row_major
//          (backward only; shares its memory with rows, which is dead by then).
//   scores [Rows][kScorePitch] fp32: the accumulators stored mem_row_major.
//   grad   [Rows][grad_pitch(dim)] fp32: the gradient accumulator of backward, loaded and
//          stored as accumulator fragments, mem_row_major.
// wmma wants 256-bit aligned fragment pointers and ldm a multiple of 16 bytes (8 halves,
// 4 floats). Every fragment starts at a row multiple of 16 and a column multiple of 16, so
// its offset is 16 * pitch * size + 16 * column_block * size bytes: a multiple of 32 once
// the pitch is a multiple of 16 bytes (checked below and by the host test).
// Bank conflicts: a pitch of kDepth + 8 halves (144 B = 36 words) starts the 8 rows that one
// ldmatrix phase reads 4 banks apart (0, 4, ..., 28), each reading 4 banks: conflict-free.
// The fp32 pitches are 4 floats past a multiple of 32 words for the same reason.
template <int Rows, int Keys>
struct TensorCoreLayout {
  static constexpr int kRows = Rows;
  static constexpr int kKeys = Keys;
  static constexpr int kDepth = 64;  // features per shared-memory stage
  static constexpr int kStagePitch = kDepth + 8;
  static constexpr int kProbPitch = Keys + 8;
  static constexpr int kScorePitch = Keys + 4;
  // Warps form a kWarpRows x kWarpCols grid over the score tile; each computes
  // kFragRows x kFragCols fragments (their accumulators live in registers).
  static constexpr int kWarpRows = Rows >= 4 * 2 * kFragment ? 4 : 2;
  static constexpr int kWarpCols = kWarps / kWarpRows;
  static constexpr int kFragRows = Rows / kFragment / kWarpRows;
  static constexpr int kFragCols = Keys / kFragment / kWarpCols;
  // Fragments of one stage of the gradient (Rows x kDepth features), dealt round-robin to warps.
  static constexpr int kGradFragCols = kDepth / kFragment;
  static constexpr int kGradFrags = Rows / kFragment * kGradFragCols;
  // Global loads move kVector consecutive features (16 bytes) when the rows allow it.
  static constexpr int kVector = 8;
  static constexpr int kStageGroups = kDepth / kVector;  // vectors per staged row

  static_assert(Rows % kFragment == 0 && Keys % kFragment == 0, "tiles are whole fragments");
  static_assert(kFragRows >= 1 && kFragRows * kFragment * kWarpRows == Rows, "warps cover every tile row");
  static_assert(kFragCols >= 1 && kFragCols * kFragment * kWarpCols == Keys, "warps cover every tile key");
  static_assert(kStagePitch % 8 == 0 && kProbPitch % 8 == 0, "16-bit ldm must be a multiple of 8");
  static_assert(kScorePitch % 4 == 0, "fp32 ldm must be a multiple of 4");
  static_assert(kStagePitch * 2 % 128 == 16, "16-bit pitch: one 16-byte bank group past a 128-byte line");
  static_assert(kProbPitch * 2 % 128 == 16, "16-bit pitch: one 16-byte bank group past a 128-byte line");
  static_assert(kThreads % kRows == 0 && kThreads / kRows <= 32, "the row reductions put a row in one warp");

  // First row / key of fragment (i, j) of warp `warp` in the score tile.
  ASTREA_HOST_DEVICE static constexpr int score_row(int warp, int i) {
    return (warp / kWarpCols * kFragRows + i) * kFragment;
  }
  ASTREA_HOST_DEVICE static constexpr int score_key(int warp, int j) {
    return (warp % kWarpCols * kFragCols + j) * kFragment;
  }
  // First row / feature (within the stage) of gradient fragment f.
  ASTREA_HOST_DEVICE static constexpr int grad_row(int f) { return f / kGradFragCols * kFragment; }
  ASTREA_HOST_DEVICE static constexpr int grad_col(int f) { return f % kGradFragCols * kFragment; }
  // fp32 pitch of the gradient accumulator: every whole fragment of dim features fits.
  ASTREA_HOST_DEVICE static constexpr int64_t grad_pitch(int64_t dim) {
    return (dim + kFragment - 1) / kFragment * kFragment + 4;
  }
  // Row and first feature of staged vector g (thread t stages g = t, t + kThreads, ...):
  // consecutive threads read consecutive 16-byte pieces of a row.
  ASTREA_HOST_DEVICE static constexpr int stage_row(int g) { return g / kStageGroups; }
  ASTREA_HOST_DEVICE static constexpr int stage_col(int g) { return g % kStageGroups * kVector; }
};

// The tiles the kernels use. Forward: 128 x 128, each warp 32 rows x 64 keys (2 x 4
// fragments: 6 fragment loads per 8 mma), 104 KiB of shared memory: 2 blocks per SM on an
// H100 (1 on an A100). Backward: 32 x 64, short because its gradient accumulator (32 x D
// fp32) lives in shared memory too; D up to about 1,590 fits an H100, 1,080 an A100.
// Untuned: measure on the GPU before changing them (they are the only tile constants).
using ForwardTensorCoreLayout = TensorCoreLayout<128, 128>;
using BackwardTensorCoreLayout = TensorCoreLayout<32, 64>;

}  // namespace astrea::cuda
