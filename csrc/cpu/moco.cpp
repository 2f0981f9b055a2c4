// CPU kernels of the momentum-queue contrast ops.
//
// Work is split into tasks of (block of q rows) x (range of queue tiles) run by
// at::parallel_for. Each thread converts its operands to the accumulation type (fp32,
// or float64 for float64 inputs) into small per-thread tile buffers: the fused loss
// never allocates anything of size N x K. Logits are computed as (q / T) . key, so the
// temperature is folded into the q block once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "checks.h"

// Lets the compiler if-convert the clamp of exp_nonpositive and vectorise the exp loops
// (the kernels never rely on floating-point exception flags). GCC does not inline
// functions compiled without this flag (std::max, std::copy, ...) into the ones below,
// so the hot loops use plain expressions and builtins only.
#pragma GCC optimize("no-trapping-math")

// The extension is built for the baseline ISA; the hot loops are also compiled for
// AVX-512 (with FMA) and AVX2 and the best clone is picked when the library loads.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ASTREA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
// Helpers of the cloned loops: GCC would otherwise call them out of line.
#define ASTREA_INLINE inline __attribute__((always_inline))
#else
#define ASTREA_SIMD_CLONES
#define ASTREA_INLINE inline
#endif

namespace astrea {
namespace {

constexpr int64_t kRowBlock = 128;  // q rows per task: each packed key tile serves them all
constexpr int64_t kKeyTile = 128;   // queue rows per tile
constexpr int64_t kMicroRows = 8;   // register block of the tile loops: rows ...
constexpr int64_t kMicroCols = 32;  // ... times columns (16 AVX-512 accumulators)
constexpr int64_t kLanes = 16;      // width of the row max / sum vectors

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// exp(x) for x <= 0 as a branch-free polynomial (Cephes expf, ~1 ulp) that the compiler
// vectorises, unlike std::exp; float64 keeps the libm exp (it serves gradcheck, not speed).
ASTREA_INLINE float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float poly = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return poly * scale;
}
ASTREA_INLINE double exp_nonpositive(double x) { return __builtin_exp(x); }

// Key tiles are packed in panels of kMicroCols keys so that the register-blocked loops
// read memory contiguously (a plain [depth, kKeyTile] layout strides 512 bytes per step,
// which thrashes a few L1 sets):
//   transposed panels: key c, feature d at (c / kMicroCols) * depth * kMicroCols + d * kMicroCols + c % kMicroCols
//   row panels:        key c, feature d at (d / kMicroCols) * kKeyTile * kMicroCols + c * kMicroCols + d % kMicroCols

// scores[r][c] = sum_d rows[r][d] * key[c][d] for r < rows_pad, c < cols_pad, where rows
// is [rows_pad, depth], keys_t the transposed panels and scores [kRowBlock, kKeyTile].
template <typename acc_t>
ASTREA_SIMD_CLONES void score_tile(const acc_t* rows, const acc_t* keys_t, int64_t rows_pad,
                                   int64_t cols_pad, int64_t depth, acc_t* scores) {
  for (int64_t r0 = 0; r0 < rows_pad; r0 += kMicroRows) {
    for (int64_t c0 = 0; c0 < cols_pad; c0 += kMicroCols) {
      acc_t acc[kMicroRows][kMicroCols] = {};
      for (int64_t d = 0; d < depth; ++d) {
        const acc_t* key = keys_t + c0 * depth + d * kMicroCols;
        for (int64_t r = 0; r < kMicroRows; ++r) {
          const acc_t a = rows[(r0 + r) * depth + d];
          for (int64_t c = 0; c < kMicroCols; ++c) acc[r][c] += a * key[c];
        }
      }
      for (int64_t r = 0; r < kMicroRows; ++r) {
        for (int64_t c = 0; c < kMicroCols; ++c) scores[(r0 + r) * kKeyTile + c0 + c] = acc[r][c];
      }
    }
  }
}

// grad[r][d] += sum_c weights[r][c] * key[c][d] for r < rows_pad, d < depth_pad, where
// weights is [kRowBlock, kKeyTile], keys the row panels and grad [rows_pad, depth_pad].
template <typename acc_t>
ASTREA_SIMD_CLONES void accumulate_tile(const acc_t* weights, const acc_t* keys, int64_t rows_pad,
                                        int64_t cols, int64_t depth_pad, acc_t* grad) {
  for (int64_t r0 = 0; r0 < rows_pad; r0 += kMicroRows) {
    for (int64_t d0 = 0; d0 < depth_pad; d0 += kMicroCols) {
      acc_t acc[kMicroRows][kMicroCols];
      for (int64_t r = 0; r < kMicroRows; ++r) {
        for (int64_t d = 0; d < kMicroCols; ++d) acc[r][d] = grad[(r0 + r) * depth_pad + d0 + d];
      }
      // Features outermost, rows innermost: each key vector is loaded once for all rows
      // (with rows outside, GCC interchanges the loops and keeps acc in memory).
      for (int64_t c = 0; c < cols; ++c) {
        const acc_t* key = keys + d0 * kKeyTile + c * kMicroCols;
        acc_t w[kMicroRows];
        for (int64_t r = 0; r < kMicroRows; ++r) w[r] = weights[(r0 + r) * kKeyTile + c];
        for (int64_t d = 0; d < kMicroCols; ++d) {
          const acc_t feature = key[d];
          for (int64_t r = 0; r < kMicroRows; ++r) acc[r][d] += w[r] * feature;
        }
      }
      for (int64_t r = 0; r < kMicroRows; ++r) {
        for (int64_t d = 0; d < kMicroCols; ++d) grad[(r0 + r) * depth_pad + d0 + d] = acc[r][d];
      }
    }
  }
}

// Row max and sum over kLanes-wide vectors (GCC vector extensions: plain loops with
// std::max do not vectorise without -ffast-math); float64 keeps scalar loops.
typedef float FloatLanes __attribute__((vector_size(kLanes * sizeof(float))));

ASTREA_INLINE void load_lanes(FloatLanes& v, const float* x) { __builtin_memcpy(&v, x, sizeof(v)); }

ASTREA_INLINE float row_max(const float* x, int64_t n, float init) {
  const int64_t body = n / kLanes * kLanes;
  FloatLanes lanes = init - FloatLanes{};
  for (int64_t c = 0; c < body; c += kLanes) {
    FloatLanes v;
    load_lanes(v, x + c);
    lanes = v > lanes ? v : lanes;
  }
  float result = init;
  for (int64_t l = 0; l < kLanes; ++l) result = lanes[l] > result ? lanes[l] : result;
  for (int64_t c = body; c < n; ++c) result = x[c] > result ? x[c] : result;
  return result;
}

ASTREA_INLINE float row_sum(const float* x, int64_t n) {
  const int64_t body = n / kLanes * kLanes;
  FloatLanes lanes = {};
  for (int64_t c = 0; c < body; c += kLanes) {
    FloatLanes v;
    load_lanes(v, x + c);
    lanes += v;
  }
  float result = 0;
  for (int64_t l = 0; l < kLanes; ++l) result += lanes[l];
  for (int64_t c = body; c < n; ++c) result += x[c];
  return result;
}

ASTREA_INLINE double row_max(const double* x, int64_t n, double init) {
  for (int64_t c = 0; c < n; ++c) init = x[c] > init ? x[c] : init;
  return init;
}
ASTREA_INLINE double row_sum(const double* x, int64_t n) {
  double result = 0;
  for (int64_t c = 0; c < n; ++c) result += x[c];
  return result;
}

// Online log-sum-exp: folds scores[0, n) into the running (max, sum of exp(x - max)).
template <typename acc_t>
ASTREA_SIMD_CLONES void online_lse_update(acc_t* scores, int64_t n, acc_t& max, acc_t& sum) {
  const acc_t new_max = row_max(scores, n, max);
  for (int64_t c = 0; c < n; ++c) scores[c] = exp_nonpositive(scores[c] - new_max);
  sum = (sum == 0 ? acc_t(0) : sum * exp_nonpositive(max - new_max)) + row_sum(scores, n);
  max = new_max;
}

// scores[c] <- coef * exp(scores[c] - lse) (the softmax weight times the row's gradient).
template <typename acc_t>
ASTREA_SIMD_CLONES void softmax_weights(acc_t* scores, int64_t n, acc_t lse, acc_t coef) {
  for (int64_t c = 0; c < n; ++c) scores[c] = coef * exp_nonpositive(scores[c] - lse);
}

// How the N x K work is cut: blocks of q rows, each crossed with `splits` ranges of
// queue tiles; splitting the queue keeps every thread busy when N is small.
struct Partition {
  int64_t rows, keys, depth, row_blocks, tiles, splits, tiles_per_split;

  Partition(int64_t n, int64_t k, int64_t d) : rows(n), keys(k), depth(d) {
    row_blocks = (n + kRowBlock - 1) / kRowBlock;
    tiles = (k + kKeyTile - 1) / kKeyTile;
    const int64_t wanted_tasks = 4 * at::get_num_threads();
    splits = std::clamp<int64_t>((wanted_tasks + row_blocks - 1) / row_blocks, 1, tiles);
    tiles_per_split = (tiles + splits - 1) / splits;
    splits = (tiles + tiles_per_split - 1) / tiles_per_split;
  }
};

// One task's view: rows [row_begin, row_end) against queue tiles [tile_begin, tile_end).
struct Task {
  int64_t block, split, row_begin, row_end, tile_begin, tile_end;
  int64_t num_rows() const { return row_end - row_begin; }
};

// A thread's tile buffers (O(block * D + tile * D), independent of N and K), carved out
// of one scratch tensor per call, so that the allocator and its profiler see them.
template <typename acc_t>
struct Workspace {
  int64_t depth_pad;
  acc_t* rows;    // [kRowBlock, depth]: the task's q rows, times 1 / T
  acc_t* keys_t;  // the key tile in transposed panels
  acc_t* keys;    // the key tile in row panels (backward)
  acc_t* scores;  // [kRowBlock, kKeyTile]
  acc_t* grad;    // [kRowBlock, depth_pad]: the queue part of grad_q (backward)

  static int64_t elements(int64_t depth) {
    const int64_t depth_pad = round_up(depth, kMicroCols);
    return (kRowBlock + kKeyTile) * depth + (kKeyTile + kRowBlock) * depth_pad + kRowBlock * kKeyTile;
  }

  Workspace(acc_t* base, int64_t depth) : depth_pad(round_up(depth, kMicroCols)) {
    rows = base;
    keys_t = rows + kRowBlock * depth;
    keys = keys_t + kKeyTile * depth;
    scores = keys + kKeyTile * depth_pad;
    grad = scores + kRowBlock * kKeyTile;
  }
};

// Runs fn(task, workspace) for every task, in parallel; each thread reuses one workspace.
template <typename acc_t, typename Fn>
void for_each_task(const Partition& p, const at::TensorOptions& options, Fn&& fn) {
  const int64_t per_thread = Workspace<acc_t>::elements(p.depth);
  at::Tensor scratch = at::empty({at::get_num_threads() * per_thread}, options);
  acc_t* base = scratch.data_ptr<acc_t>();
  at::parallel_for(0, p.row_blocks * p.splits, 1, [&](int64_t begin, int64_t end) {
    Workspace<acc_t> ws(base + at::get_thread_num() * per_thread, p.depth);
    for (int64_t index = begin; index < end; ++index) {
      Task t;
      t.block = index / p.splits;
      t.split = index % p.splits;
      t.row_begin = t.block * kRowBlock;
      t.row_end = std::min(p.rows, t.row_begin + kRowBlock);
      t.tile_begin = t.split * p.tiles_per_split;
      t.tile_end = std::min(p.tiles, t.tile_begin + p.tiles_per_split);
      fn(t, ws);
    }
  });
}

// rows[r][d] = q[row_begin + r][d] * scale, zero rows up to the micro-row multiple.
template <typename scalar_t, typename acc_t>
int64_t load_rows(const scalar_t* q, const Task& t, int64_t depth, acc_t scale, acc_t* rows) {
  const int64_t rows_pad = round_up(t.num_rows(), kMicroRows);
  for (int64_t r = 0; r < t.num_rows(); ++r) {
    const scalar_t* src = q + (t.row_begin + r) * depth;
    for (int64_t d = 0; d < depth; ++d) rows[r * depth + d] = static_cast<acc_t>(src[d]) * scale;
  }
  std::fill(rows + t.num_rows() * depth, rows + rows_pad * depth, acc_t(0));
  return rows_pad;
}

// Packs queue rows [key_begin, key_begin + count) into the transposed panels (padding
// keys zero) and, with `row_major`, into the row panels (padding features stay zero).
template <typename scalar_t, typename acc_t>
int64_t load_keys(const scalar_t* queue, int64_t key_begin, int64_t count, int64_t depth,
                  Workspace<acc_t>& ws, bool row_major) {
  const int64_t cols_pad = round_up(count, kMicroCols);
  acc_t* keys_t = ws.keys_t;
  for (int64_t c = 0; c < cols_pad; ++c) {
    acc_t* dst = keys_t + c / kMicroCols * depth * kMicroCols + c % kMicroCols;
    if (c < count) {
      const scalar_t* src = queue + (key_begin + c) * depth;
      for (int64_t d = 0; d < depth; ++d) dst[d * kMicroCols] = static_cast<acc_t>(src[d]);
    } else {
      for (int64_t d = 0; d < depth; ++d) dst[d * kMicroCols] = acc_t(0);
    }
  }
  if (row_major) {
    for (int64_t c = 0; c < count; ++c) {
      const scalar_t* src = queue + (key_begin + c) * depth;
      for (int64_t d0 = 0; d0 < depth; d0 += kMicroCols) {
        acc_t* dst = ws.keys + d0 * kKeyTile + c * kMicroCols;
        const int64_t width = std::min(kMicroCols, depth - d0);
        for (int64_t d = 0; d < width; ++d) dst[d] = static_cast<acc_t>(src[d0 + d]);
      }
    }
  }
  return cols_pad;
}

// q_i . k_i / T for every row.
template <typename scalar_t, typename acc_t>
void positive_logits(const scalar_t* q, const scalar_t* k, int64_t n, int64_t depth, acc_t inv_t,
                     acc_t* out, int64_t out_stride) {
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t dot = 0;
      for (int64_t d = 0; d < depth; ++d) {
        dot += static_cast<acc_t>(q[i * depth + d]) * static_cast<acc_t>(k[i * depth + d]);
      }
      out[i * out_stride] = dot * inv_t;
    }
  });
}

// Contiguous operands (a copy only for strided inputs: O(N*D + K*D)).
struct Operands {
  at::Tensor q, k, queue;
  Operands(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& queue_)
      : q(q_.contiguous()), k(k_.contiguous()), queue(queue_.contiguous()) {}
  Partition partition() const { return Partition(q.size(0), queue.size(0), q.size(1)); }
  at::ScalarType acc_type() const { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }
};

at::Tensor moco_logits_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                           const at::Tensor& queue_in, double temperature) {
  check_moco_args("moco_logits", q_in, k_in, queue_in, temperature);
  const Operands ops(q_in, k_in, queue_in);
  const Partition p = ops.partition();
  at::Tensor out = at::empty({p.rows, 1 + p.keys}, ops.q.options().dtype(ops.acc_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ops.q.scalar_type(), "moco_logits", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* q = ops.q.const_data_ptr<scalar_t>();
    const scalar_t* queue = ops.queue.const_data_ptr<scalar_t>();
    acc_t* logits = out.data_ptr<acc_t>();
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    const int64_t stride = 1 + p.keys;
    positive_logits(q, ops.k.const_data_ptr<scalar_t>(), p.rows, p.depth, inv_t, logits, stride);
    for_each_task<acc_t>(p, out.options(), [&](const Task& t, Workspace<acc_t>& ws) {
      const int64_t rows_pad = load_rows(q, t, p.depth, inv_t, ws.rows);
      for (int64_t tile = t.tile_begin; tile < t.tile_end; ++tile) {
        const int64_t key_begin = tile * kKeyTile;
        const int64_t count = std::min(kKeyTile, p.keys - key_begin);
        const int64_t cols_pad = load_keys(queue, key_begin, count, p.depth, ws, false);
        score_tile(ws.rows, ws.keys_t, rows_pad, cols_pad, p.depth, ws.scores);
        for (int64_t r = 0; r < t.num_rows(); ++r) {
          const acc_t* src = ws.scores + r * kKeyTile;
          std::copy(src, src + count, logits + (t.row_begin + r) * stride + 1 + key_begin);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moco_infonce_cpu(const at::Tensor& q_in,
                                                            const at::Tensor& k_in,
                                                            const at::Tensor& queue_in,
                                                            double temperature) {
  check_moco_args("moco_infonce", q_in, k_in, queue_in, temperature);
  const Operands ops(q_in, k_in, queue_in);
  const Partition p = ops.partition();
  const auto options = ops.q.options().dtype(ops.acc_type());
  at::Tensor loss = at::empty({p.rows}, options);
  at::Tensor lse = at::empty({p.rows}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ops.q.scalar_type(), "moco_infonce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* q = ops.q.const_data_ptr<scalar_t>();
    const scalar_t* queue = ops.queue.const_data_ptr<scalar_t>();
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    // Running (max, sum) of each row over each split's queue range: [splits, N].
    const at::Tensor partials = at::empty({2, p.splits, p.rows}, options);
    acc_t* part_max = partials.data_ptr<acc_t>();
    acc_t* part_sum = part_max + p.splits * p.rows;
    for_each_task<acc_t>(p, options, [&](const Task& t, Workspace<acc_t>& ws) {
      const int64_t rows_pad = load_rows(q, t, p.depth, inv_t, ws.rows);
      acc_t* row_max = part_max + t.split * p.rows + t.row_begin;
      acc_t* row_sum = part_sum + t.split * p.rows + t.row_begin;
      std::fill(row_max, row_max + t.num_rows(), -std::numeric_limits<acc_t>::infinity());
      std::fill(row_sum, row_sum + t.num_rows(), acc_t(0));
      for (int64_t tile = t.tile_begin; tile < t.tile_end; ++tile) {
        const int64_t key_begin = tile * kKeyTile;
        const int64_t count = std::min(kKeyTile, p.keys - key_begin);
        const int64_t cols_pad = load_keys(queue, key_begin, count, p.depth, ws, false);
        score_tile(ws.rows, ws.keys_t, rows_pad, cols_pad, p.depth, ws.scores);
        for (int64_t r = 0; r < t.num_rows(); ++r) {
          online_lse_update(ws.scores + r * kKeyTile, count, row_max[r], row_sum[r]);
        }
      }
    });
    acc_t* loss_data = loss.data_ptr<acc_t>();
    acc_t* lse_data = lse.data_ptr<acc_t>();
    positive_logits(q, ops.k.const_data_ptr<scalar_t>(), p.rows, p.depth, inv_t, loss_data, 1);
    at::parallel_for(0, p.rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t positive = loss_data[i];
        acc_t max = positive;
        for (int64_t s = 0; s < p.splits; ++s) max = std::max(max, part_max[s * p.rows + i]);
        acc_t sum = std::exp(positive - max);
        for (int64_t s = 0; s < p.splits; ++s) {
          const acc_t part = part_sum[s * p.rows + i];
          if (part > 0) sum += part * std::exp(part_max[s * p.rows + i] - max);
        }
        lse_data[i] = max + std::log(sum);
        loss_data[i] = lse_data[i] - positive;
      }
    });
  });
  return {loss, lse};
}

// With g the incoming gradient, p_j = softmax of row i's logits and key_0 = k_i:
//   grad_q_i = g_i / T * (sum_{j>=1} p_j queue_{j-1} + (p_0 - 1) k_i)
//   grad_k_i = g_i / T * (p_0 - 1) q_i
std::tuple<at::Tensor, at::Tensor> moco_infonce_backward_cpu(const at::Tensor& grad_loss_in,
                                                             const at::Tensor& q_in,
                                                             const at::Tensor& k_in,
                                                             const at::Tensor& queue_in,
                                                             const at::Tensor& lse_in,
                                                             double temperature) {
  check_moco_args("moco_infonce_backward", q_in, k_in, queue_in, temperature);
  check_moco_row_vector("grad_loss", grad_loss_in, q_in);
  check_moco_row_vector("lse", lse_in, q_in);
  const Operands ops(q_in, k_in, queue_in);
  const Partition p = ops.partition();
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_q = at::empty_like(ops.q);
  at::Tensor grad_k = at::empty_like(ops.k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ops.q.scalar_type(), "moco_infonce_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* q = ops.q.const_data_ptr<scalar_t>();
    const scalar_t* k = ops.k.const_data_ptr<scalar_t>();
    const scalar_t* queue = ops.queue.const_data_ptr<scalar_t>();
    const acc_t* g = grad_loss.const_data_ptr<acc_t>();
    const acc_t* row_lse = lse.const_data_ptr<acc_t>();
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    const int64_t depth_pad = round_up(p.depth, kMicroCols);
    // Queue part of grad_q per split: [splits, N, depth_pad].
    const at::Tensor partials = at::empty({p.splits, p.rows, depth_pad}, grad_loss.options());
    acc_t* part_grad = partials.data_ptr<acc_t>();
    for_each_task<acc_t>(p, grad_loss.options(), [&](const Task& t, Workspace<acc_t>& ws) {
      const int64_t rows_pad = load_rows(q, t, p.depth, inv_t, ws.rows);
      // Padding features of the row panels must read as zero; the sums start at zero.
      std::fill(ws.keys, ws.keys + kKeyTile * depth_pad, acc_t(0));
      std::fill(ws.grad, ws.grad + kRowBlock * depth_pad, acc_t(0));
      for (int64_t tile = t.tile_begin; tile < t.tile_end; ++tile) {
        const int64_t key_begin = tile * kKeyTile;
        const int64_t count = std::min(kKeyTile, p.keys - key_begin);
        load_keys(queue, key_begin, count, p.depth, ws, true);
        const int64_t cols_pad = round_up(count, kMicroCols);
        score_tile(ws.rows, ws.keys_t, rows_pad, cols_pad, p.depth, ws.scores);
        for (int64_t r = 0; r < rows_pad; ++r) {
          acc_t* weights = ws.scores + r * kKeyTile;
          if (r < t.num_rows()) {
            const int64_t i = t.row_begin + r;
            softmax_weights(weights, count, row_lse[i], g[i] * inv_t);
            std::fill(weights + count, weights + cols_pad, acc_t(0));
          } else {
            std::fill(weights, weights + cols_pad, acc_t(0));
          }
        }
        accumulate_tile(ws.scores, ws.keys, rows_pad, count, depth_pad, ws.grad);
      }
      std::copy(ws.grad, ws.grad + t.num_rows() * depth_pad, part_grad + (t.split * p.rows + t.row_begin) * depth_pad);
    });
    scalar_t* gq = grad_q.data_ptr<scalar_t>();
    scalar_t* gk = grad_k.data_ptr<scalar_t>();
    at::parallel_for(0, p.rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t positive = 0;
        for (int64_t d = 0; d < p.depth; ++d) {
          positive += static_cast<acc_t>(q[i * p.depth + d]) * static_cast<acc_t>(k[i * p.depth + d]);
        }
        const acc_t coef = g[i] * inv_t;
        const acc_t pos_weight = coef * (std::exp(positive * inv_t - row_lse[i]) - acc_t(1));
        for (int64_t d = 0; d < p.depth; ++d) {
          acc_t total = pos_weight * static_cast<acc_t>(k[i * p.depth + d]);
          for (int64_t s = 0; s < p.splits; ++s) total += part_grad[(s * p.rows + i) * depth_pad + d];
          gq[i * p.depth + d] = static_cast<scalar_t>(total);
          gk[i * p.depth + d] = static_cast<scalar_t>(pos_weight * static_cast<acc_t>(q[i * p.depth + d]));
        }
      }
    });
  });
  return {grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(astrea, CPU, m) {
  m.impl("moco_logits", &moco_logits_cpu);
  m.impl("moco_infonce", &moco_infonce_cpu);
  m.impl("moco_infonce_backward", &moco_infonce_backward_cpu);
}

}  // namespace astrea
