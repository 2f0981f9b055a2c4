// CPU kernels of the fused MoE router (semantics: kernels/router.py and astrea/ops/router.py).
//
// Rows are independent: at::parallel_for hands out blocks of kRowsPerBlock rows, scored a
// tile of rows at a time in per-thread scratch in the accumulation type (fp32, fp64 for
// fp64): the tile's exponentials (and sigmoids) in one call of ATen's vectorised kernels,
// the row reductions as `omp simd` loops, the top-k by insertion behind a SIMD skip of chunks
// that cannot enter it. The per-expert counts and score sums are accumulated per row block
// and the block partials summed in block order afterwards, so the results never depend on
// the number of threads.
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
#include <utility>
#include <vector>

namespace astrea {
namespace {

// logits [N, E] floating, 1 <= k <= E, scoring softmax, sigmoid or topk_softmax, optional bias
// [E] floating on the logits' device added to the scores or the logits; num_groups dividing E,
// 1 <= topk_groups <= num_groups, groups of >= 2 experts for top2_sum, k experts in the kept groups.
void check_router_topk_args(const at::Tensor& logits, int64_t k, c10::string_view scoring,
                            const std::optional<at::Tensor>& bias, c10::string_view bias_on, int64_t num_groups,
                            int64_t topk_groups, c10::string_view group_score) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "router_topk: logits must be 2-D [N, E], got ", logits.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), "router_topk: logits must be floating, got ",
                   logits.scalar_type());
  const int64_t experts = logits.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= experts, "router_topk: k must be in [1, ", experts, "], got ", k);
  TORCH_CHECK_VALUE(scoring == "softmax" || scoring == "sigmoid" || scoring == "topk_softmax",
                    "router_topk: scoring must be 'softmax', 'sigmoid' or 'topk_softmax', got '", scoring, "'");
  TORCH_CHECK_VALUE(bias_on == "scores" || bias_on == "logits",
                    "router_topk: bias_on must be 'scores' or 'logits', got '", bias_on, "'");
  TORCH_CHECK_VALUE(group_score == "top2_sum" || group_score == "max",
                    "router_topk: group_score must be 'top2_sum' or 'max', got '", group_score, "'");
  TORCH_CHECK_VALUE(num_groups >= 1 && experts % num_groups == 0, "router_topk: num_groups must divide the ",
                    experts, " experts, got ", num_groups);
  TORCH_CHECK_VALUE(topk_groups >= 1 && topk_groups <= num_groups, "router_topk: topk_groups must be in [1, ",
                    num_groups, "], got ", topk_groups);
  const int64_t group_size = experts / num_groups;
  TORCH_CHECK_VALUE(num_groups == 1 || group_score != "top2_sum" || group_size >= 2,
                    "router_topk: group_score 'top2_sum' needs groups of >= 2 experts, got ", group_size);
  TORCH_CHECK_VALUE(num_groups == 1 || k <= topk_groups * group_size, "router_topk: k must be <= topk_groups * ",
                    "experts per group = ", topk_groups * group_size, ", got ", k);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == logits.size(1), "router_topk: bias must be [",
                      logits.size(1), "], got ", bias->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), "router_topk: bias must be floating, got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == logits.device(), "router_topk: bias must be on the logits' device ",
                      logits.device(), ", got ", bias->device());
  }
}

// The forward's saved indices [N, k] int32 and lse [N], and the incoming gradients
// grad_weights [N, k], grad_prob_sums [E], grad_lse [N], all fp32 (float64 for float64
// logits), on the logits' device.
void check_router_topk_backward_args(const at::Tensor& logits, const at::Tensor& indices,
                                     const at::Tensor& lse, const at::Tensor& grad_weights,
                                     const at::Tensor& grad_prob_sums, const at::Tensor& grad_lse,
                                     c10::string_view scoring) {
  const char* op = "router_topk_backward";
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D [N, E], got ", logits.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(scoring == "softmax" || scoring == "sigmoid", op,
                    ": scoring must be 'softmax' or 'sigmoid', got '", scoring, "'");
  const int64_t rows = logits.size(0);
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == rows && indices.size(1) >= 1 &&
                        indices.size(1) <= logits.size(1),
                    op, ": indices must be [", rows, ", k] with 1 <= k <= ", logits.size(1), ", got ",
                    indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt, op, ": indices must be int32, got ", indices.scalar_type());
  const auto expected = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::pair<const char*, const at::Tensor*> values[] = {
      {"lse", &lse}, {"grad_weights", &grad_weights}, {"grad_prob_sums", &grad_prob_sums}, {"grad_lse", &grad_lse}};
  const std::vector<int64_t> shapes[] = {{rows}, {rows, indices.size(1)}, {logits.size(1)}, {rows}};
  for (size_t i = 0; i < 4; ++i) {
    const auto& [name, tensor] = values[i];
    TORCH_CHECK_VALUE(tensor->sizes() == at::IntArrayRef(shapes[i]), op, ": ", name, " must have shape ",
                      at::IntArrayRef(shapes[i]), ", got ", tensor->sizes());
    TORCH_CHECK_TYPE(tensor->scalar_type() == expected, op, ": ", name, " must be ", expected, ", got ",
                     tensor->scalar_type());
  }
  for (const at::Tensor* tensor : {&indices, &lse, &grad_weights, &grad_prob_sums, &grad_lse}) {
    TORCH_CHECK_VALUE(tensor->device() == logits.device(), op, ": every input must be on the logits' device ",
                      logits.device(), ", got ", tensor->device());
  }
}

// Rows per partial of counts and prob_sums: fixed, so the summation order is too.
constexpr int64_t kRowsPerBlock = 256;
// Logits per scratch tile: the rows of a tile are scored together (one vectorised exp
// over the tile), with the tiles of one thread staying in its L2.
constexpr int64_t kTileElements = 8192;

// Below this sum of the chosen scores, renormalisation is the softmax over the chosen logits:
// the same weights to rounding, finite where the scores underflow to 0 (kernels/router.py).
constexpr double kRenormalizeMinTotal = 0x1p-64;

// values[0, k) = their softmax; NaN when every one is -inf.
template <typename acc_t>
void softmax_in_place(acc_t* values, int64_t k) {
  acc_t top = -std::numeric_limits<acc_t>::infinity();
  for (int64_t slot = 0; slot < k; ++slot) top = std::max(top, values[slot]);
  acc_t total = 0;
  for (int64_t slot = 0; slot < k; ++slot) total += values[slot] = std::exp(values[slot] - top);
  for (int64_t slot = 0; slot < k; ++slot) values[slot] /= total;
}

bool is_softmax(std::string_view scoring) { return scoring == "softmax"; }

int64_t num_row_blocks(int64_t rows) { return (rows + kRowsPerBlock - 1) / kRowsPerBlock; }

int64_t tile_rows(int64_t experts) { return std::clamp<int64_t>(kTileElements / experts, 1, kRowsPerBlock); }

// Per-thread scratch: `count` tiles of [tile_rows, E] values in the accumulation type.
template <typename acc_t>
struct Tiles {
  at::Tensor storage;
  int64_t tile_size;

  Tiles(int64_t count, int64_t experts, const at::TensorOptions& options)
      : storage(at::empty({count * tile_rows(experts) * experts}, options)),
        tile_size(tile_rows(experts) * experts) {}

  acc_t* operator[](int64_t i) const { return storage.data_ptr<acc_t>() + i * tile_size; }
};

// Copies rows [row_begin, row_end) of the [N, E] logits (any strides) into x, row-major,
// in the accumulation type.
template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* logits, int64_t row_begin, int64_t row_end, int64_t stride_n, int64_t stride_e,
               int64_t experts, acc_t* x) {
  for (int64_t row = row_begin; row < row_end; ++row, x += experts) {
    const scalar_t* src = logits + row * stride_n;
    if (stride_e == 1) {
      for (int64_t e = 0; e < experts; ++e) x[e] = static_cast<acc_t>(src[e]);
    } else {
      for (int64_t e = 0; e < experts; ++e) x[e] = static_cast<acc_t>(src[e * stride_e]);
    }
  }
}

// exp and sigmoid of n values by ATen's vectorised kernels (run serially here: inside
// at::parallel_for, ATen does not parallelise again).
template <typename acc_t>
at::Tensor wrap(const acc_t* values, int64_t n) {
  return at::from_blob(const_cast<acc_t*>(values), {n}, at::dtype(c10::CppTypeToScalarType<acc_t>::value));
}

template <typename acc_t>
void exp_in_place(acc_t* values, int64_t n) {
  wrap(values, n).exp_();
}

template <typename acc_t>
void sigmoid_into(const acc_t* x, int64_t n, acc_t* out) {
  at::Tensor result = wrap(out, n);
  at::sigmoid_out(result, wrap(x, n));
}

// A NaN logit may or may not win the max; either way it makes the row's sum of
// exponentials, hence its lse, NaN, as a +Inf logit or an all -Inf row do.
template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t n) {
  acc_t result = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : result)
  for (int64_t e = 0; e < n; ++e) result = std::max(result, x[e]);
  return result;
}

template <typename acc_t>
acc_t row_sum(const acc_t* x, int64_t n) {
  acc_t result = 0;
#pragma omp simd reduction(+ : result)
  for (int64_t e = 0; e < n; ++e) result += x[e];
  return result;
}

template <typename acc_t>
acc_t row_dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t result = 0;
#pragma omp simd reduction(+ : result)
  for (int64_t e = 0; e < n; ++e) result += a[e] * b[e];
  return result;
}

// Whether key a ranks strictly above key b: numbers by value, NaN below every number
// (-inf included), two NaNs equal.
template <typename acc_t>
bool ranks_above(acc_t a, acc_t b) {
  if (a != a) return false;
  return b != b || a > b;
}

// Keys tested together before the insertion loop: a chunk none of whose keys beats the
// current k-th best (the common case once the top-k has filled) is skipped by one SIMD compare.
constexpr int64_t kKeyChunk = 16;

// Offers experts [begin, end) of `key` to the running top-k in best_keys / chosen, `filled`
// of k slots taken, in index order: a key displaces only keys it ranks strictly above, so
// ties keep the earlier expert first; NaN keys rank below -inf.
template <typename acc_t>
void offer_range(const acc_t* key, int64_t begin, int64_t end, int64_t k, acc_t* best_keys, int32_t* chosen,
                 int64_t& filled) {
  for (int64_t chunk = begin; chunk < end; chunk += kKeyChunk) {
    const int64_t chunk_end = std::min(end, chunk + kKeyChunk);
    // With k numbers kept, only a key above the k-th (a plain compare: NaN is never above) enters.
    const acc_t threshold = best_keys[k - 1];
    if (filled == k && threshold == threshold) {
      int any_above = 0;
#pragma omp simd reduction(| : any_above)
      for (int64_t e = chunk; e < chunk_end; ++e) any_above |= key[e] > threshold;
      if (!any_above) continue;
    }
    for (int64_t e = chunk; e < chunk_end; ++e) {
      const acc_t value = key[e];
      if (filled == k && !ranks_above(value, best_keys[k - 1])) continue;
      int64_t slot = filled < k ? filled++ : k - 1;
      for (; slot > 0 && ranks_above(value, best_keys[slot - 1]); --slot) {
        best_keys[slot] = best_keys[slot - 1];
        chosen[slot] = chosen[slot - 1];
      }
      best_keys[slot] = value;
      chosen[slot] = static_cast<int32_t>(e);
    }
  }
}

// The k experts with the largest keys, best first, into chosen[0, k) (offer_range's order).
template <typename acc_t>
void top_k(const acc_t* key, int64_t experts, int64_t k, acc_t* best_keys, int32_t* chosen) {
  int64_t filled = 0;
  offer_range(key, 0, experts, k, best_keys, chosen, filled);
}

// Grouped selection: the topk_groups best of the num_groups contiguous groups of `key`,
// each scored by the sum of its two largest keys (or its largest), ranked by top_k like
// the experts, into kept_groups[0, topk_groups) in ascending group order. scratch holds
// 2 * num_groups + 2 values.
template <typename acc_t>
void keep_groups(const acc_t* key, int64_t experts, int64_t num_groups, int64_t topk_groups, bool group_max,
                 acc_t* scratch, int32_t* kept_groups) {
  const int64_t group_size = experts / num_groups;
  const int64_t best_per_group = group_max ? 1 : 2;
  acc_t* group_scores = scratch;
  acc_t* best = scratch + num_groups;
  for (int64_t group = 0; group < num_groups; ++group) {
    const acc_t* group_keys = key + group * group_size;
    // The two largest values without branches (a NaN-free group ranks by value alone);
    // top_k's ordering where a NaN takes part.
    acc_t first = -std::numeric_limits<acc_t>::infinity(), second = first;
    bool has_nan = false;
    for (int64_t e = 0; e < group_size; ++e) {
      const acc_t value = group_keys[e];
      has_nan |= value != value;
      second = std::max(second, std::min(first, value));
      first = std::max(first, value);
    }
    if (has_nan) {
      top_k(group_keys, group_size, best_per_group, best, kept_groups);
      first = best[0];
      second = best_per_group == 2 ? best[1] : second;
    }
    group_scores[group] = group_max ? first : first + second;
  }
  top_k(group_scores, num_groups, topk_groups, best, kept_groups);
  std::sort(kept_groups, kept_groups + topk_groups);
}

// The k best experts of the kept groups: the groups offered in ascending order are the
// experts of those groups in index order, as top_k over a mask of them would visit them.
template <typename acc_t>
void top_k_in_groups(const acc_t* key, int64_t group_size, const int32_t* kept_groups, int64_t topk_groups,
                     int64_t k, acc_t* best_keys, int32_t* chosen) {
  int64_t filled = 0;
  for (int64_t slot = 0; slot < topk_groups; ++slot) {
    const int64_t begin = kept_groups[slot] * group_size;
    offer_range(key, begin, begin + group_size, k, best_keys, chosen, filled);
  }
}

// Scores rows [begin, end): the logits into tiles[0], exp(x - shift) into tiles[1] with
// shift = shift_of(row, x_row) for each row, and, for sigmoid scoring, sigmoid(x) into tiles[2].
template <typename scalar_t, typename acc_t, typename Shift>
void score_tile(const scalar_t* logits, int64_t begin, int64_t end, int64_t stride_n, int64_t stride_e,
                int64_t experts, bool softmax, const Tiles<acc_t>& tiles, Shift&& shift_of) {
  acc_t* x = tiles[0];
  acc_t* exps = tiles[1];
  load_rows(logits, begin, end, stride_n, stride_e, experts, x);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t offset = (row - begin) * experts;
    const acc_t shift = shift_of(row, x + offset);
    for (int64_t e = 0; e < experts; ++e) exps[offset + e] = x[offset + e] - shift;
  }
  const int64_t elements = (end - begin) * experts;
  exp_in_place(exps, elements);
  if (!softmax) sigmoid_into(x, elements, tiles[2]);
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
    const std::optional<at::Tensor>& bias_in, c10::string_view bias_on, int64_t num_groups, int64_t topk_groups,
    c10::string_view group_score, double scaling_factor) {
  check_router_topk_args(logits, k, scoring, bias_in, bias_on, num_groups, topk_groups, group_score);
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
  const bool sigmoid = scoring == "sigmoid";
  const bool topk_softmax = scoring == "topk_softmax";
  const bool bias_on_logits = bias_on == "logits";
  const bool grouped = num_groups > 1;
  const bool group_max = group_score == "max";
  const int64_t tile = tile_rows(experts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "router_topk", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* logits_data = logits.const_data_ptr<scalar_t>();
    const acc_t* bias_data = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
    acc_t* weights_data = weights.data_ptr<acc_t>();
    int32_t* indices_data = indices.data_ptr<int32_t>();
    acc_t* lse_data = lse.data_ptr<acc_t>();
    const int64_t stride_n = logits.stride(0), stride_e = logits.stride(1);
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      // Tiles: the fp32 logits, their exponentials, the sigmoid scores; then one row of
      // keys, the k best keys and the scratch of the grouped selection.
      const Tiles<acc_t> tiles(3, experts, acc_options);
      std::vector<acc_t> row_scratch(experts + k + 2 * num_groups + 2);
      acc_t* keys = row_scratch.data();
      acc_t* best_keys = keys + experts;
      acc_t* group_scratch = best_keys + k;
      std::vector<int32_t> kept_groups(grouped ? num_groups + 2 : 0);
      for (int64_t block = block_begin; block < block_end; ++block) {
        int32_t* block_counts = count_partials.data_ptr<int32_t>() + block * experts;
        acc_t* block_prob_sums = prob_partials.data_ptr<acc_t>() + block * experts;
        const int64_t block_end_row = std::min(rows, (block + 1) * kRowsPerBlock);
        for (int64_t tile_begin = block * kRowsPerBlock; tile_begin < block_end_row; tile_begin += tile) {
          const int64_t tile_end = std::min(block_end_row, tile_begin + tile);
          score_tile(logits_data, tile_begin, tile_end, stride_n, stride_e, experts, !sigmoid, tiles,
                     [&](int64_t row, const acc_t* x_row) {
                       return lse_data[row] = row_max(x_row, experts);  // the row max until the lse is known
                     });
          const acc_t* x = tiles[0];
          acc_t* exps = tiles[1];
          for (int64_t row = tile_begin; row < tile_end; ++row) {
            const int64_t offset = (row - tile_begin) * experts;
            const acc_t* x_row = x + offset;
            acc_t* score = (sigmoid ? tiles[2] : exps) + offset;
            const acc_t sum_exps = row_sum(exps + offset, experts);
            const acc_t row_lse = lse_data[row] + std::log(sum_exps);
            lse_data[row] = row_lse;
            if (!sigmoid) {
              const acc_t inv_sum = acc_t(1) / sum_exps;
              for (int64_t e = 0; e < experts; ++e) score[e] *= inv_sum;
            }
            for (int64_t e = 0; e < experts; ++e) block_prob_sums[e] += score[e];
            // The keys (kernels/router.py): the logits rank as the scores do without a bias
            // or groups; grouped selection ranks the selection scores (the logits for
            // topk_softmax), a bias adds to those or to the logits.
            const acc_t* selection = topk_softmax ? x_row : score;
            const acc_t* key = x_row;
            if (bias_data != nullptr) {
              const acc_t* base = bias_on_logits ? x_row : selection;
              for (int64_t e = 0; e < experts; ++e) keys[e] = base[e] + bias_data[e];
              key = keys;
            } else if (grouped) {
              key = selection;
            }
            int32_t* chosen = indices_data + row * k;
            acc_t* row_weights = weights_data + row * k;
            if (grouped) {
              keep_groups(key, experts, num_groups, topk_groups, group_max, group_scratch, kept_groups.data());
              top_k_in_groups(key, experts / num_groups, kept_groups.data(), topk_groups, k, best_keys, chosen);
            } else {
              top_k(key, experts, k, best_keys, chosen);
            }
            acc_t total = 0;
            for (int64_t slot = 0; slot < k; ++slot) {
              row_weights[slot] = score[chosen[slot]];
              total += row_weights[slot];
              ++block_counts[chosen[slot]];
            }
            acc_t scale = static_cast<acc_t>(scaling_factor);
            if (topk_softmax || (renormalize && total < kRenormalizeMinTotal)) {
              for (int64_t slot = 0; slot < k; ++slot) row_weights[slot] = x_row[chosen[slot]];
              softmax_in_place(row_weights, k);
            } else if (renormalize) {
              scale /= total;
            }
            // A non-finite row (NaN lse) gets NaN weights; its indices stay valid.
            const bool finite_row = row_lse == row_lse;
            for (int64_t slot = 0; slot < k; ++slot) {
              row_weights[slot] = finite_row ? row_weights[slot] * scale : std::numeric_limits<acc_t>::quiet_NaN();
            }
          }
        }
      }
    });
    sum_partials(count_partials.const_data_ptr<int32_t>(), blocks, experts, counts.data_ptr<int32_t>());
    sum_partials(prob_partials.const_data_ptr<acc_t>(), blocks, experts, prob_sums.data_ptr<acc_t>());
  });
  return {weights, indices, counts, prob_sums, lse};
}

bool is_positive_zero(double value) { return value == 0 && !std::signbit(value); }

// Row `row` of the saved indices, each checked to be an expert id.
const int32_t* checked_indices(const int32_t* indices, int64_t row, int64_t k, int64_t experts) {
  const int32_t* chosen = indices + row * k;
  for (int64_t slot = 0; slot < k; ++slot) {
    TORCH_CHECK_VALUE(chosen[slot] >= 0 && chosen[slot] < experts, "router_topk_backward: indices[", row, ", ",
                      slot, "] = ", chosen[slot], " is outside [0, ", experts, ")");
  }
  return chosen;
}

// The gradient of sum(grad_w * weights) reaching one row's k chosen experts, from their logits
// and scores: returns false with grad_chosen[slot] = d/d score (dv_j = (gw_j - sum_i gw_i w_i) / S
// with renormalisation, else gw_j); for a row renormalised as softmax(x[indices]) returns true
// with grad_chosen[slot] = d/d logit = w_j (gw_j - sum_i gw_i w_i), which replaces dv and the
// score Jacobian. `rescued` is k values of scratch.
template <typename acc_t>
struct ChosenGradients {
  int64_t k;
  bool renormalize;
  acc_t scale;

  bool operator()(const acc_t* logits, const acc_t* scores, const acc_t* grad_w, acc_t* grad_chosen,
                  acc_t* rescued) const {
    acc_t total = 1, weighted = 0;
    if (renormalize) {
      total = 0;
      for (int64_t slot = 0; slot < k; ++slot) {
        total += scores[slot];
        weighted += scale * grad_w[slot] * scores[slot];
      }
      weighted /= total;
    }
    if (renormalize && total < kRenormalizeMinTotal) {
      std::copy(logits, logits + k, rescued);
      softmax_in_place(rescued, k);
      acc_t rescued_weighted = 0;
      for (int64_t slot = 0; slot < k; ++slot) rescued_weighted += scale * grad_w[slot] * rescued[slot];
      for (int64_t slot = 0; slot < k; ++slot) grad_chosen[slot] = rescued[slot] * (scale * grad_w[slot] - rescued_weighted);
      return true;
    }
    for (int64_t slot = 0; slot < k; ++slot) grad_chosen[slot] = (scale * grad_w[slot] - weighted) / total;
    return false;
  }
};

// Closed form of the backward (derivation: kernels/router.py), a tile of rows at a time;
// the tiles, like the forward's, are fixed by the sizes alone.
at::Tensor router_topk_backward_cpu(const at::Tensor& logits, const at::Tensor& indices_in,
                                    const at::Tensor& lse_in, const at::Tensor& grad_weights_in,
                                    const at::Tensor& grad_prob_sums_in, const at::Tensor& grad_lse_in,
                                    c10::string_view scoring, bool renormalize, double scaling_factor) {
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
  const int64_t tile = tile_rows(experts);

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
    // Sigmoid scores whose prob_sums and lse get no gradient have a gradient only on the k
    // chosen experts of a finite row: such tiles recompute those k scores, not the tile's.
    const bool prob_sums_unused = std::all_of(grad_prob_sums_data, grad_prob_sums_data + experts,
                                              [](acc_t g) { return is_positive_zero(g); });
    auto sparse_tile = [&](int64_t begin, int64_t end) {
      if (softmax || !prob_sums_unused) return false;
      for (int64_t row = begin; row < end; ++row) {
        if (!is_positive_zero(grad_lse_data[row]) || !std::isfinite(lse_data[row])) return false;
      }
      return true;
    };
    // Tiles start at multiples of `tile` whatever the thread split: ATen's vectorised exp
    // and sigmoid compute a tile's tail elements apart from its vector body, so a tile
    // boundary that moved with the number of threads would change the last bit of scores.
    const int64_t num_tiles = (rows + tile - 1) / tile;
    at::parallel_for(0, num_tiles, 1, [&](int64_t tile_index_begin, int64_t tile_index_end) {
      // Tiles: the fp32 logits, softmax(x), the sigmoid scores; then one row of the
      // gradient reaching the scores.
      const Tiles<acc_t> tiles(3, experts, lse.options());
      std::vector<acc_t> grad_score(experts);
      // Per slot: the chosen logits and scores, then the gradient ChosenGradients gives.
      std::vector<acc_t> chosen_logits(k), chosen_scores(k), grad_chosen(k), rescued(k);
      const ChosenGradients<acc_t> chosen_gradients{k, renormalize, static_cast<acc_t>(scaling_factor)};
      for (int64_t tile_index = tile_index_begin; tile_index < tile_index_end; ++tile_index) {
        const int64_t tile_begin = tile_index * tile;
        const int64_t tile_end = std::min(rows, tile_begin + tile);
        if (sparse_tile(tile_begin, tile_end)) {
          for (int64_t row = tile_begin; row < tile_end; ++row) {
            const int32_t* chosen = checked_indices(indices_data, row, k, experts);
            for (int64_t slot = 0; slot < k; ++slot) {
              chosen_logits[slot] = static_cast<acc_t>(logits_data[row * stride_n + chosen[slot] * stride_e]);
              chosen_scores[slot] = acc_t(1) / (acc_t(1) + std::exp(-chosen_logits[slot]));
            }
            const bool is_rescued = chosen_gradients(chosen_logits.data(), chosen_scores.data(),
                                                     grad_weights_data + row * k, grad_chosen.data(), rescued.data());
            scalar_t* grad_row = grad_data + row * experts;
            std::fill(grad_row, grad_row + experts, scalar_t(0));
            for (int64_t slot = 0; slot < k; ++slot) {
              const acc_t s = chosen_scores[slot];
              grad_row[chosen[slot]] =
                  static_cast<scalar_t>(is_rescued ? grad_chosen[slot] : grad_chosen[slot] * s * (acc_t(1) - s));
            }
          }
          continue;
        }
        score_tile(logits_data, tile_begin, tile_end, stride_n, stride_e, experts, softmax, tiles,
                   [&](int64_t row, const acc_t*) { return lse_data[row]; });
        const acc_t* probs = tiles[1];
        for (int64_t row = tile_begin; row < tile_end; ++row) {
          const int64_t offset = (row - tile_begin) * experts;
          const acc_t* x_row = tiles[0] + offset;
          const acc_t* p = probs + offset;
          const acc_t* score = (softmax ? probs : tiles[2]) + offset;
          const int32_t* chosen = checked_indices(indices_data, row, k, experts);
          for (int64_t slot = 0; slot < k; ++slot) {
            chosen_logits[slot] = x_row[chosen[slot]];
            chosen_scores[slot] = score[chosen[slot]];
          }
          const bool is_rescued = chosen_gradients(chosen_logits.data(), chosen_scores.data(),
                                                   grad_weights_data + row * k, grad_chosen.data(), rescued.data());
          std::copy(grad_prob_sums_data, grad_prob_sums_data + experts, grad_score.begin());
          if (!is_rescued) {
            for (int64_t slot = 0; slot < k; ++slot) grad_score[chosen[slot]] += grad_chosen[slot];
          }
          const acc_t row_grad_lse = grad_lse_data[row];
          const acc_t dot = softmax ? row_dot(grad_score.data(), p, experts) : acc_t(0);
          auto grad_at = [&](int64_t e) {
            return softmax ? p[e] * (grad_score[e] - dot + row_grad_lse)
                           : grad_score[e] * score[e] * (acc_t(1) - score[e]) + row_grad_lse * p[e];
          };
          scalar_t* grad_row = grad_data + row * experts;
          for (int64_t e = 0; e < experts; ++e) grad_row[e] = static_cast<scalar_t>(grad_at(e));
          if (is_rescued) {
            for (int64_t slot = 0; slot < k; ++slot) {
              grad_row[chosen[slot]] = static_cast<scalar_t>(grad_at(chosen[slot]) + grad_chosen[slot]);
            }
          }
        }
      }
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(astrea, m) {
  // Fused MoE router on CPU tensors (the Python op astrea::router_topk runs it under the
  // auto backend): top-k of softmax or sigmoid scores (or softmax over the top-k logits)
  // with an optional selection bias on the scores or the logits, optionally within the
  // best groups of experts, weights scaled after renormalisation; weights [N, k], indices
  // [N, k] int32, counts [E] int32, prob_sums [E], lse [N], all floating outputs fp32
  // (float64 for float64 logits).
  m.def("router_topk_cpu(Tensor logits, int k, str scoring, bool renormalize, Tensor? bias, "
        "str bias_on='scores', int num_groups=1, int topk_groups=1, str group_score='top2_sum', "
        "float scaling_factor=1.0) "
        "-> (Tensor weights, Tensor indices, Tensor counts, Tensor prob_sums, Tensor lse)");
  // grad_logits (logits' dtype, contiguous) of sum(grad_weights * weights) +
  // sum(grad_prob_sums * prob_sums) + sum(grad_lse * lse), by the closed form of
  // kernels/router.py.
  m.def("router_topk_backward_cpu(Tensor logits, Tensor indices, Tensor lse, Tensor grad_weights, "
        "Tensor grad_prob_sums, Tensor grad_lse, str scoring, bool renormalize, float scaling_factor=1.0) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(astrea, CPU, m) {
  m.impl("router_topk_cpu", &router_topk_cpu);
  m.impl("router_topk_backward_cpu", &router_topk_backward_cpu);
}

}  // namespace astrea
