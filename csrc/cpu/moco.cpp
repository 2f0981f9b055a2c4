// CPU kernels of the momentum-queue contrast ops.
//
// The queue is streamed in chunks of keys. Each chunk is scored against all N rows of q
// with one GEMM (ATen's mm in fixed tiles, see below) into a
// score buffer of at most kScoreBudget elements and 1 / kQueueFraction of the N x K scores;
// at::parallel_for then folds each row's chunk into its online log-sum-exp or, in
// backward, turns it into softmax weights that a second GEMM accumulates into grad_q.
// Every GEMM runs in tiles fixed by the sizes, one BLAS thread a tile (blas.h): a BLAS
// threading one call cuts the scores by thread count (its edge tiles sum in another order),
// and the backward's accumulating GEMM sums over the chunk's keys, which the BLAS would split
// by thread count; so logits and grad_q are the same on any thread count. fp16/bf16 operands are converted to fp32 (q once, the queue a
// chunk at a time), float64 stays float64, and the temperature is folded into q once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "blas.h"
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

constexpr int64_t kScoreBudget = int64_t(1) << 20;  // score-buffer elements: 4 MiB in fp32
constexpr int64_t kQueueFraction = 32;               // ... and at most this fraction of the queue
constexpr int64_t kMinChunk = 128;                   // keys per chunk, at least (GEMM efficiency)
constexpr int64_t kRowGrain = 16;                    // rows per at::parallel_for grain
constexpr int64_t kLanes = 16;                       // width of the row max / sum vectors

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

// Contiguous operands (a copy only for strided inputs: O(N*D + K*D)), detached so that the
// GEMMs never record autograd history, and q / T in the accumulation type.
struct Operands {
  at::Tensor q, k, queue, scaled_q;
  int64_t rows, keys, depth;

  Operands(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& queue_, double temperature)
      : q(q_.contiguous().detach()), k(k_.contiguous().detach()), queue(queue_.contiguous().detach()),
        rows(q.size(0)), keys(queue.size(0)), depth(q.size(1)) {
    const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    scaled_q = q.to(acc_type, /*non_blocking=*/false, /*copy=*/true);
    scaled_q.mul_(inv_temperature(temperature, acc_type));
  }

  at::TensorOptions acc_options() const { return scaled_q.options(); }

  // 1 / T rounded as the kernels' accumulation type computes it.
  static double inv_temperature(double temperature, at::ScalarType acc_type) {
    return acc_type == at::kDouble ? 1.0 / temperature : double(1.0f / static_cast<float>(temperature));
  }
};

// Streams the queue in chunks: `visit(key_begin, scores, keys)` runs with scores = (q / T) .
// keys^T ([N, count], row-major, contiguous) and keys the chunk [count, D] in the
// accumulation type.
template <typename Visit>
void for_each_score_chunk(const Operands& ops, Visit&& visit) {
  const int64_t wanted = std::min(kScoreBudget / ops.rows, ops.keys / kQueueFraction);
  const int64_t chunk = std::min(ops.keys, std::max(kMinChunk, wanted));
  const auto options = ops.acc_options();
  const at::Tensor scores_buffer = at::empty({ops.rows * chunk}, options);
  const bool convert = ops.queue.scalar_type() != options.dtype();
  const at::Tensor keys_buffer = convert ? at::empty({chunk, ops.depth}, options) : at::Tensor();
  for (int64_t key_begin = 0; key_begin < ops.keys; key_begin += chunk) {
    const int64_t count = std::min(chunk, ops.keys - key_begin);
    at::Tensor keys = ops.queue.narrow(0, key_begin, count);
    if (convert) keys = keys_buffer.narrow(0, 0, count).copy_(keys);
    at::Tensor scores = scores_buffer.narrow(0, 0, ops.rows * count).view({ops.rows, count});
    mm_fixed_order(scores, ops.scaled_q, keys.t());
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
  const Operands ops(q_in, k_in, queue_in, temperature);
  at::Tensor out = at::empty({ops.rows, 1 + ops.keys}, ops.acc_options());
  // The output is N x K anyway: the queue columns are one GEMM written in place.
  const at::Tensor keys = ops.queue.to(out.scalar_type());  // a copy for fp16/bf16 only: O(K * D)
  at::Tensor queue_columns = out.narrow(1, 1, ops.keys);
  mm_fixed_order(queue_columns, ops.scaled_q, keys.t());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ops.q.scalar_type(), "moco_logits", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    positive_logits(ops.q.const_data_ptr<scalar_t>(), ops.k.const_data_ptr<scalar_t>(), ops.rows, ops.depth, inv_t,
                    out.data_ptr<acc_t>(), 1 + ops.keys);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moco_infonce_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                    const at::Tensor& queue_in, double temperature) {
  check_moco_args("moco_infonce", q_in, k_in, queue_in, temperature);
  const Operands ops(q_in, k_in, queue_in, temperature);
  const auto options = ops.acc_options();
  at::Tensor loss = at::empty({ops.rows}, options);
  at::Tensor lse = at::empty({ops.rows}, options);
  const at::Tensor running_sum = at::empty({ops.rows}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ops.q.scalar_type(), "moco_infonce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    acc_t* positive = loss.data_ptr<acc_t>();
    acc_t* row_max = lse.data_ptr<acc_t>();
    acc_t* row_sum = running_sum.data_ptr<acc_t>();
    positive_logits(ops.q.const_data_ptr<scalar_t>(), ops.k.const_data_ptr<scalar_t>(), ops.rows, ops.depth, inv_t,
                    positive, 1);
    // Each row's running (max, sum of exp(x - max)) starts from its positive logit.
    std::copy(positive, positive + ops.rows, row_max);
    std::fill(row_sum, row_sum + ops.rows, acc_t(1));
    for_each_score_chunk(ops, [&](int64_t, const at::Tensor& scores, const at::Tensor&) {
      const int64_t count = scores.size(1);
      acc_t* chunk = scores.data_ptr<acc_t>();
      at::parallel_for(0, ops.rows, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) online_lse_update(chunk + i * count, count, row_max[i], row_sum[i]);
      });
    });
    at::parallel_for(0, ops.rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        row_max[i] += std::log(row_sum[i]);  // the row's lse
        positive[i] = row_max[i] - positive[i];  // the row's loss
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
  const Operands ops(q_in, k_in, queue_in, temperature);
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  // The queue part of grad_q: sum over the chunks of softmax weights . keys.
  at::Tensor queue_grad = at::zeros({ops.rows, ops.depth}, ops.acc_options());
  at::Tensor grad_q = at::empty_like(ops.q);
  at::Tensor grad_k = at::empty_like(ops.k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ops.q.scalar_type(), "moco_infonce_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* q = ops.q.const_data_ptr<scalar_t>();
    const scalar_t* k = ops.k.const_data_ptr<scalar_t>();
    const acc_t* g = grad_loss.const_data_ptr<acc_t>();
    const acc_t* row_lse = lse.const_data_ptr<acc_t>();
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    const int64_t depth = ops.depth;
    for_each_score_chunk(ops, [&](int64_t, const at::Tensor& scores, const at::Tensor& keys) {
      const int64_t count = scores.size(1);
      acc_t* weights = scores.data_ptr<acc_t>();
      at::parallel_for(0, ops.rows, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) softmax_weights(weights + i * count, count, row_lse[i], g[i] * inv_t);
      });
      // Sums over the chunk's keys: rows in fixed blocks, one BLAS thread each.
      addmm_fixed_order(queue_grad, scores, keys);
    });
    const acc_t* queue_part = queue_grad.const_data_ptr<acc_t>();
    scalar_t* gq = grad_q.data_ptr<scalar_t>();
    scalar_t* gk = grad_k.data_ptr<scalar_t>();
    at::parallel_for(0, ops.rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t positive = 0;
        for (int64_t d = 0; d < depth; ++d) {
          positive += static_cast<acc_t>(q[i * depth + d]) * static_cast<acc_t>(k[i * depth + d]);
        }
        const acc_t pos_weight = g[i] * inv_t * (std::exp(positive * inv_t - row_lse[i]) - acc_t(1));
        for (int64_t d = 0; d < depth; ++d) {
          const int64_t at = i * depth + d;
          gq[at] = static_cast<scalar_t>(queue_part[at] + pos_weight * static_cast<acc_t>(k[at]));
          gk[at] = static_cast<scalar_t>(pos_weight * static_cast<acc_t>(q[at]));
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
