// CPU kernels of the fused MoE router (semantics: kernels/router.py and astrea/ops/router.py).
//
// Rows are independent: at::parallel_for hands out blocks of kRowsPerBlock rows, each row
// is copied once into a per-thread buffer in the accumulation type (fp32, fp64 for fp64)
// and scored there. The per-expert counts and score sums are accumulated per row block
// and the block partials summed in block order afterwards, so the results never depend
// on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>
#include <vector>

#include "checks.h"

namespace astrea {
namespace {

// Rows per partial of counts and prob_sums: fixed, so the summation order is too.
constexpr int64_t kRowsPerBlock = 256;

bool is_softmax(std::string_view scoring) { return scoring == "softmax"; }

int64_t num_row_blocks(int64_t rows) { return (rows + kRowsPerBlock - 1) / kRowsPerBlock; }

// Copies row `row` of the [N, E] logits (any strides) into x in the accumulation type.
template <typename scalar_t, typename acc_t>
void load_row(const scalar_t* logits, int64_t row, int64_t stride_n, int64_t stride_e, int64_t experts,
              acc_t* x) {
  const scalar_t* src = logits + row * stride_n;
  if (stride_e == 1) {
    for (int64_t e = 0; e < experts; ++e) x[e] = static_cast<acc_t>(src[e]);
  } else {
    for (int64_t e = 0; e < experts; ++e) x[e] = static_cast<acc_t>(src[e * stride_e]);
  }
}

// Largest value of x[0, n), NaN when any is NaN (as torch.amax).
template <typename acc_t>
acc_t nan_propagating_max(const acc_t* x, int64_t n) {
  acc_t result = -std::numeric_limits<acc_t>::infinity();
  bool has_nan = false;
  for (int64_t e = 0; e < n; ++e) {
    result = x[e] > result ? x[e] : result;
    has_nan |= x[e] != x[e];
  }
  return has_nan ? std::numeric_limits<acc_t>::quiet_NaN() : result;
}

// Scores of one row into score[]; returns its log-sum-exp (NaN for a non-finite row).
// For softmax the exponentials are kept; for sigmoid exps is scratch.
template <typename acc_t>
acc_t score_row(const acc_t* x, int64_t experts, bool softmax, acc_t* exps, acc_t* score) {
  const acc_t row_max = nan_propagating_max(x, experts);
  acc_t sum_exps = 0;
  for (int64_t e = 0; e < experts; ++e) {
    exps[e] = std::exp(x[e] - row_max);
    sum_exps += exps[e];
  }
  if (softmax) {
    const acc_t inv_sum = acc_t(1) / sum_exps;
    for (int64_t e = 0; e < experts; ++e) score[e] = exps[e] * inv_sum;
  } else {
    for (int64_t e = 0; e < experts; ++e) score[e] = acc_t(1) / (acc_t(1) + std::exp(-x[e]));
  }
  return row_max + std::log(sum_exps);
}

// The k experts with the largest keys, best first, into chosen[0, k): NaN keys rank as
// -inf and equal keys go to the lower index. Experts are visited in index order and a
// key displaces only strictly smaller ones, so ties keep the earlier expert first.
template <typename acc_t>
void top_k(const acc_t* key, int64_t experts, int64_t k, acc_t* best_keys, int32_t* chosen) {
  int64_t filled = 0;
  for (int64_t e = 0; e < experts; ++e) {
    const acc_t value = key[e] != key[e] ? -std::numeric_limits<acc_t>::infinity() : key[e];
    if (filled == k && !(value > best_keys[k - 1])) continue;
    int64_t slot = filled < k ? filled++ : k - 1;
    for (; slot > 0 && value > best_keys[slot - 1]; --slot) {
      best_keys[slot] = best_keys[slot - 1];
      chosen[slot] = chosen[slot - 1];
    }
    best_keys[slot] = value;
    chosen[slot] = static_cast<int32_t>(e);
  }
}

// out[e] = sum of the [blocks, E] partials over the blocks, in block order.
template <typename T>
void sum_partials(const T* partials, int64_t blocks, int64_t experts, T* out) {
  std::fill(out, out + experts, T(0));
  for (int64_t block = 0; block < blocks; ++block) {
    for (int64_t e = 0; e < experts; ++e) out[e] += partials[block * experts + e];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> router_topk_cpu(
    const at::Tensor& logits, int64_t k, c10::string_view scoring, bool renormalize,
    const std::optional<at::Tensor>& bias_in) {
  check_router_topk_args(logits, k, scoring, bias_in);
  const int64_t rows = logits.size(0);
  const int64_t experts = logits.size(1);
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = logits.options().dtype(acc_type);
  at::Tensor weights = at::empty({rows, k}, acc_options);
  at::Tensor indices = at::empty({rows, k}, logits.options().dtype(at::kInt));
  at::Tensor lse = at::empty({rows}, acc_options);
  const int64_t blocks = num_row_blocks(rows);
  at::Tensor count_partials = at::zeros({blocks, experts}, logits.options().dtype(at::kInt));
  at::Tensor prob_partials = at::zeros({blocks, experts}, acc_options);
  at::Tensor counts = at::empty({experts}, logits.options().dtype(at::kInt));
  at::Tensor prob_sums = at::empty({experts}, acc_options);
  const at::Tensor bias = bias_in.has_value() ? bias_in->to(acc_type).contiguous() : at::Tensor();
  const bool softmax = is_softmax(scoring);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "router_topk", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* logits_data = logits.const_data_ptr<scalar_t>();
    const acc_t* bias_data = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
    acc_t* weights_data = weights.data_ptr<acc_t>();
    int32_t* indices_data = indices.data_ptr<int32_t>();
    acc_t* lse_data = lse.data_ptr<acc_t>();
    const int64_t stride_n = logits.stride(0), stride_e = logits.stride(1);
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      // x, exps, score, biased key, then the k best keys.
      std::vector<acc_t> buffer(4 * experts + k);
      acc_t* x = buffer.data();
      acc_t* exps = x + experts;
      acc_t* score = exps + experts;
      acc_t* biased = score + experts;
      acc_t* best_keys = biased + experts;
      for (int64_t block = block_begin; block < block_end; ++block) {
        int32_t* block_counts = count_partials.data_ptr<int32_t>() + block * experts;
        acc_t* block_prob_sums = prob_partials.data_ptr<acc_t>() + block * experts;
        const int64_t row_end = std::min(rows, (block + 1) * kRowsPerBlock);
        for (int64_t row = block * kRowsPerBlock; row < row_end; ++row) {
          load_row(logits_data, row, stride_n, stride_e, experts, x);
          const acc_t row_lse = score_row(x, experts, softmax, exps, score);
          lse_data[row] = row_lse;
          for (int64_t e = 0; e < experts; ++e) block_prob_sums[e] += score[e];
          const acc_t* key = x;  // without a bias the logits rank as the scores do
          if (bias_data != nullptr) {
            for (int64_t e = 0; e < experts; ++e) biased[e] = score[e] + bias_data[e];
            key = biased;
          }
          int32_t* chosen = indices_data + row * k;
          acc_t* row_weights = weights_data + row * k;
          top_k(key, experts, k, best_keys, chosen);
          acc_t total = 0;
          for (int64_t slot = 0; slot < k; ++slot) {
            row_weights[slot] = score[chosen[slot]];
            total += row_weights[slot];
            ++block_counts[chosen[slot]];
          }
          // A non-finite row (NaN lse) gets NaN weights; its indices stay valid.
          const bool finite_row = row_lse == row_lse;
          for (int64_t slot = 0; slot < k; ++slot) {
            row_weights[slot] = !finite_row ? std::numeric_limits<acc_t>::quiet_NaN()
                                : renormalize ? row_weights[slot] / total
                                              : row_weights[slot];
          }
        }
      }
    });
    sum_partials(count_partials.const_data_ptr<int32_t>(), blocks, experts, counts.data_ptr<int32_t>());
    sum_partials(prob_partials.const_data_ptr<acc_t>(), blocks, experts, prob_sums.data_ptr<acc_t>());
  });
  return {weights, indices, counts, prob_sums, lse};
}

// Closed form of the backward (derivation: kernels/router.py), one row at a time.
at::Tensor router_topk_backward_cpu(const at::Tensor& logits, const at::Tensor& indices_in,
                                    const at::Tensor& lse_in, const at::Tensor& grad_weights_in,
                                    const at::Tensor& grad_prob_sums_in, const at::Tensor& grad_lse_in,
                                    c10::string_view scoring, bool renormalize) {
  check_router_topk_backward_args(logits, indices_in, lse_in, grad_weights_in, grad_prob_sums_in, grad_lse_in,
                                  scoring);
  const int64_t rows = logits.size(0);
  const int64_t experts = logits.size(1);
  const int64_t k = indices_in.size(1);
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor grad_weights = grad_weights_in.contiguous();
  const at::Tensor grad_prob_sums = grad_prob_sums_in.contiguous();
  const at::Tensor grad_lse = grad_lse_in.contiguous();
  at::Tensor grad_logits = at::empty({rows, experts}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  const bool softmax = is_softmax(scoring);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "router_topk_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* logits_data = logits.const_data_ptr<scalar_t>();
    const int32_t* indices_data = indices.const_data_ptr<int32_t>();
    const acc_t* lse_data = lse.const_data_ptr<acc_t>();
    const acc_t* grad_weights_data = grad_weights.const_data_ptr<acc_t>();
    const acc_t* grad_prob_sums_data = grad_prob_sums.const_data_ptr<acc_t>();
    const acc_t* grad_lse_data = grad_lse.const_data_ptr<acc_t>();
    scalar_t* grad_data = grad_logits.data_ptr<scalar_t>();
    const int64_t stride_n = logits.stride(0), stride_e = logits.stride(1);
    at::parallel_for(0, rows, kRowsPerBlock, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buffer(3 * experts);  // x, probs, the gradient reaching the scores
      acc_t* x = buffer.data();
      acc_t* probs = x + experts;
      acc_t* grad_score = probs + experts;
      for (int64_t row = begin; row < end; ++row) {
        load_row(logits_data, row, stride_n, stride_e, experts, x);
        const int32_t* chosen = indices_data + row * k;
        const acc_t* grad_w = grad_weights_data + row * k;
        for (int64_t slot = 0; slot < k; ++slot) {
          TORCH_CHECK_VALUE(chosen[slot] >= 0 && chosen[slot] < experts, "router_topk_backward: indices[", row,
                            ", ", slot, "] = ", chosen[slot], " is outside [0, ", experts, ")");
        }
        const acc_t row_lse = lse_data[row];
        for (int64_t e = 0; e < experts; ++e) probs[e] = std::exp(x[e] - row_lse);
        // The scores are kept in x: x is not needed once they are computed.
        acc_t* score = x;
        if (softmax) {
          for (int64_t e = 0; e < experts; ++e) score[e] = probs[e];
        } else {
          for (int64_t e = 0; e < experts; ++e) score[e] = acc_t(1) / (acc_t(1) + std::exp(-x[e]));
        }
        for (int64_t e = 0; e < experts; ++e) grad_score[e] = grad_prob_sums_data[e];
        acc_t total = 1, weighted = 0;
        if (renormalize) {
          total = 0;
          for (int64_t slot = 0; slot < k; ++slot) {
            total += score[chosen[slot]];
            weighted += grad_w[slot] * score[chosen[slot]];
          }
          weighted /= total;
        }
        for (int64_t slot = 0; slot < k; ++slot) grad_score[chosen[slot]] += (grad_w[slot] - weighted) / total;
        const acc_t row_grad_lse = grad_lse_data[row];
        scalar_t* grad_row = grad_data + row * experts;
        if (softmax) {
          acc_t dot = 0;
          for (int64_t e = 0; e < experts; ++e) dot += grad_score[e] * probs[e];
          for (int64_t e = 0; e < experts; ++e) {
            grad_row[e] = static_cast<scalar_t>(probs[e] * (grad_score[e] - dot + row_grad_lse));
          }
        } else {
          for (int64_t e = 0; e < experts; ++e) {
            const acc_t s = score[e];
            grad_row[e] = static_cast<scalar_t>(grad_score[e] * s * (acc_t(1) - s) + row_grad_lse * probs[e]);
          }
        }
      }
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(astrea, CPU, m) {
  m.impl("router_topk_cpu", &router_topk_cpu);
  m.impl("router_topk_backward_cpu", &router_topk_backward_cpu);
}

}  // namespace astrea
