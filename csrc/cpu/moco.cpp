// CPU kernels of the momentum-queue contrast ops.
//
// Work is split into tasks of (block of q rows) x (range of queue tiles) run by
// at::parallel_for. A task scores its rows against one queue tile at a time with a GEMM
// (ATen's mm, i.e. the BLAS the build links) into a per-thread score buffer, as ATen's own
// CPU flash attention tiles attention; the forward folds each tile into an online
// log-sum-exp, the backward turns it into softmax weights and accumulates weights . tile
// into grad_q with a second GEMM. Per-thread buffers are O(block * (D + tile) + tile * D):
// the fused loss never allocates anything of size N x K. fp16/bf16 blocks and tiles are
// converted to fp32 as they are loaded (fp32 accumulation), float64 stays float64, and the
// temperature is folded into the q block once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "checks.h"

// Lets the compiler if-convert the clamp of exp_nonpositive and vectorise the exp loops
// (the kernels never rely on floating-point exception flags).
#pragma GCC optimize("no-trapping-math")

// The extension is built for the baseline ISA; the exp loops are also compiled for
// AVX-512 and AVX2 and the best clone is picked when the library loads.
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

constexpr int64_t kRowBlock = 128;  // q rows per task: each key tile serves them all
constexpr int64_t kKeyTile = 512;   // queue rows per tile: a 128 x 512 fp32 score tile stays in L2
constexpr int64_t kLanes = 16;      // width of the row max / sum vectors

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

// A thread's tile buffers, allocated once per thread and call (so that the allocator and
// its profiler see them).
struct Workspace {
  at::Tensor rows;    // [kRowBlock, D]: the task's q rows times 1 / T, in the accumulation type
  at::Tensor keys;    // [kKeyTile, D]: the key tile converted to the accumulation type
  at::Tensor scores;  // kRowBlock * kKeyTile: one tile's scores, [rows, keys] row-major

  Workspace(int64_t depth, const at::TensorOptions& options)
      : rows(at::empty({kRowBlock, depth}, options)),
        keys(at::empty({kKeyTile, depth}, options)),
        scores(at::empty({kRowBlock * kKeyTile}, options)) {}
};

// Contiguous operands (a copy only for strided inputs: O(N*D + K*D)), detached so that the
// GEMMs on their blocks never record autograd history.
struct Operands {
  at::Tensor q, k, queue;
  Operands(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& queue_)
      : q(q_.contiguous().detach()), k(k_.contiguous().detach()), queue(queue_.contiguous().detach()) {}
  Partition partition() const { return Partition(q.size(0), queue.size(0), q.size(1)); }
  at::ScalarType acc_type() const { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }
};

// Runs fn(task, workspace) for every task, in parallel; each thread reuses one workspace.
template <typename Fn>
void for_each_task(const Partition& p, const at::TensorOptions& options, Fn&& fn) {
  at::parallel_for(0, p.row_blocks * p.splits, 1, [&](int64_t begin, int64_t end) {
    Workspace ws(p.depth, options);
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

// Task t's q rows times 1 / T in the accumulation type: [t.num_rows(), D].
at::Tensor load_rows(const Operands& ops, const Task& t, double inv_t, Workspace& ws) {
  at::Tensor rows = ws.rows.narrow(0, 0, t.num_rows());
  rows.copy_(ops.q.narrow(0, t.row_begin, t.num_rows()));
  return rows.mul_(inv_t);
}

// Scores task t's rows against each of its queue tiles in turn: `visit(key_begin, scores,
// keys)` runs with scores = rows . keys^T ([rows, count], row-major, contiguous) and keys
// the tile [count, D] in the accumulation type.
template <typename Visit>
void for_each_score_tile(const Operands& ops, const Task& t, const Partition& p, const at::Tensor& rows,
                         Workspace& ws, Visit&& visit) {
  const bool convert = ops.queue.scalar_type() != ws.keys.scalar_type();
  for (int64_t tile = t.tile_begin; tile < t.tile_end; ++tile) {
    const int64_t key_begin = tile * kKeyTile;
    const int64_t count = std::min(kKeyTile, p.keys - key_begin);
    at::Tensor keys = ops.queue.narrow(0, key_begin, count);
    if (convert) keys = ws.keys.narrow(0, 0, count).copy_(keys);
    at::Tensor scores = ws.scores.narrow(0, 0, t.num_rows() * count).view({t.num_rows(), count});
    at::mm_out(scores, rows, keys.t());
    visit(key_begin, scores, keys);
  }
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

at::Tensor moco_logits_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                           const at::Tensor& queue_in, double temperature) {
  check_moco_args("moco_logits", q_in, k_in, queue_in, temperature);
  const Operands ops(q_in, k_in, queue_in);
  const Partition p = ops.partition();
  at::Tensor out = at::empty({p.rows, 1 + p.keys}, ops.q.options().dtype(ops.acc_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ops.q.scalar_type(), "moco_logits", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* logits = out.data_ptr<acc_t>();
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    const int64_t stride = 1 + p.keys;
    positive_logits(ops.q.const_data_ptr<scalar_t>(), ops.k.const_data_ptr<scalar_t>(), p.rows, p.depth, inv_t,
                    logits, stride);
    for_each_task(p, out.options(), [&](const Task& t, Workspace& ws) {
      const at::Tensor rows = load_rows(ops, t, inv_t, ws);
      for_each_score_tile(ops, t, p, rows, ws, [&](int64_t key_begin, const at::Tensor& scores, const at::Tensor&) {
        const int64_t count = scores.size(1);
        const acc_t* src = scores.const_data_ptr<acc_t>();
        for (int64_t r = 0; r < t.num_rows(); ++r) {
          std::copy(src + r * count, src + (r + 1) * count, logits + (t.row_begin + r) * stride + 1 + key_begin);
        }
      });
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
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    // Running (max, sum) of each row over each split's queue range: [splits, N].
    const at::Tensor partials = at::empty({2, p.splits, p.rows}, options);
    acc_t* part_max = partials.data_ptr<acc_t>();
    acc_t* part_sum = part_max + p.splits * p.rows;
    for_each_task(p, options, [&](const Task& t, Workspace& ws) {
      const at::Tensor rows = load_rows(ops, t, inv_t, ws);
      acc_t* row_max = part_max + t.split * p.rows + t.row_begin;
      acc_t* row_sum = part_sum + t.split * p.rows + t.row_begin;
      std::fill(row_max, row_max + t.num_rows(), -std::numeric_limits<acc_t>::infinity());
      std::fill(row_sum, row_sum + t.num_rows(), acc_t(0));
      for_each_score_tile(ops, t, p, rows, ws, [&](int64_t, const at::Tensor& scores, const at::Tensor&) {
        const int64_t count = scores.size(1);
        acc_t* tile = scores.data_ptr<acc_t>();
        for (int64_t r = 0; r < t.num_rows(); ++r) online_lse_update(tile + r * count, count, row_max[r], row_sum[r]);
      });
    });
    acc_t* loss_data = loss.data_ptr<acc_t>();
    acc_t* lse_data = lse.data_ptr<acc_t>();
    positive_logits(ops.q.const_data_ptr<scalar_t>(), ops.k.const_data_ptr<scalar_t>(), p.rows, p.depth, inv_t,
                    loss_data, 1);
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
    const acc_t* g = grad_loss.const_data_ptr<acc_t>();
    const acc_t* row_lse = lse.const_data_ptr<acc_t>();
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    // Queue part of grad_q per split: [splits, N, D].
    const at::Tensor partials = at::empty({p.splits, p.rows, p.depth}, grad_loss.options());
    acc_t* part_grad = partials.data_ptr<acc_t>();
    for_each_task(p, grad_loss.options(), [&](const Task& t, Workspace& ws) {
      const at::Tensor rows = load_rows(ops, t, inv_t, ws);
      at::Tensor grad = partials[t.split].narrow(0, t.row_begin, t.num_rows()).zero_();
      for_each_score_tile(ops, t, p, rows, ws, [&](int64_t, const at::Tensor& scores, const at::Tensor& keys) {
        const int64_t count = scores.size(1);
        acc_t* weights = scores.data_ptr<acc_t>();
        for (int64_t r = 0; r < t.num_rows(); ++r) {
          const int64_t i = t.row_begin + r;
          softmax_weights(weights + r * count, count, row_lse[i], g[i] * inv_t);
        }
        grad.addmm_(scores, keys);
      });
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
          for (int64_t s = 0; s < p.splits; ++s) total += part_grad[(s * p.rows + i) * p.depth + d];
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
