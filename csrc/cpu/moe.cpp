// CPU kernels of the sparse MoE data movement: the dispatch (stable counting sort of the
// routing slots by expert), the permute into expert order and its backward, and the
// weighted combine with its backward.
//
// Every output row has one writer: the permute writes row p from token ids[p], its backward
// and the combine write token t from its k slots, the combine backward writes the k rows of
// token t. at::parallel_for splits the rows, so the results do not depend on the number of
// threads. The expert_scale gradient is the one reduction across tokens: it is summed slot
// by slot in slot order, on one thread (O(N * k) scalars, next to the O(N * k * D) rows).
// Values are accumulated in fp32 (float64 for float64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace astrea {
namespace {

// indices [N, k] int32 on CPU; 1 <= num_experts. The range of the values is checked by the
// kernel in its histogram pass.
void check_moe_dispatch_args(const at::Tensor& indices, int64_t num_experts) {
  TORCH_CHECK_VALUE(indices.dim() == 2, "moe_dispatch: indices must be 2-D [N, k], got shape ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt, "moe_dispatch: indices must be int32, got ",
                   indices.scalar_type());
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= 8192, "moe_dispatch: num_experts must be in [1, 8192], got ",
                    num_experts);
  TORCH_CHECK_VALUE(indices.numel() <= INT32_MAX, "moe_dispatch: indices has N*k = ", indices.numel(),
                    " slots; at most ", INT32_MAX, " are supported");
}

// A 2-D floating [rows, D] tensor.
void check_rows(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D [rows, D], got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
                   t.scalar_type());
}

void check_int32(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
}

// x [N, D] floating, sorted_token_ids [M] int32.
void check_permute_args(const at::Tensor& x, const at::Tensor& sorted_token_ids) {
  check_rows("permute", "x", x);
  check_int32("permute", "sorted_token_ids", sorted_token_ids, 1);
}

// grad_out [N*k, D] floating, inverse_positions [N, k] int32.
void check_permute_backward_args(const at::Tensor& grad_out, const at::Tensor& inverse_positions) {
  check_rows("permute_backward", "grad_out", grad_out);
  check_int32("permute_backward", "inverse_positions", inverse_positions, 2);
}

// Every one of the `count` row numbers lies in [0, rows): the kernels use them as addresses.
void check_row_ids(const char* op, const char* name, const int32_t* ids, int64_t count, int64_t rows) {
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_VALUE(ids[i] >= 0 && ids[i] < rows, op, ": ", name, " must lie in [0, ", rows, "); got ", ids[i],
                      " at flat index ", i);
  }
}

// expert_out [N*k, D] floating; weights, indices (int32) and inverse_positions (int32) [N, k];
// expert_scale [E] floating or absent.
void check_weighted_combine_args(const char* op, const at::Tensor& expert_out, const at::Tensor& weights,
                                 const at::Tensor& indices, const at::Tensor& inverse_positions,
                                 const std::optional<at::Tensor>& expert_scale, int64_t num_experts) {
  check_rows(op, "expert_out", expert_out);
  check_int32(op, "indices", indices, 2);
  TORCH_CHECK_VALUE(weights.sizes() == indices.sizes() && inverse_positions.sizes() == indices.sizes(), op,
                    ": weights and inverse_positions must have the shape of indices ", indices.sizes(), ", got ",
                    weights.sizes(), " and ", inverse_positions.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()), op, ": weights must be a floating tensor, got ",
                   weights.scalar_type());
  check_int32(op, "inverse_positions", inverse_positions, 2);
  TORCH_CHECK_VALUE(expert_out.size(0) == indices.numel(), op, ": expert_out must have N*k = ", indices.numel(),
                    " rows, got ", expert_out.size(0));
  TORCH_CHECK_VALUE(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  if (expert_scale.has_value()) {
    TORCH_CHECK_VALUE(expert_scale->dim() == 1 && expert_scale->size(0) == num_experts, op,
                      ": expert_scale must be [", num_experts, "], got ", expert_scale->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(expert_scale->scalar_type()), op,
                     ": expert_scale must be a floating tensor, got ", expert_scale->scalar_type());
  }
}

// grad_out [N, D] of expert_out's dtype.
void check_combine_grad(const at::Tensor& grad_out, const at::Tensor& expert_out, const at::Tensor& indices) {
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == indices.size(0) &&
                        grad_out.size(1) == expert_out.size(1),
                    "weighted_combine_backward: grad_out must be [", indices.size(0), ", ", expert_out.size(1),
                    "], got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == expert_out.scalar_type(),
                   "weighted_combine_backward: grad_out must have expert_out's dtype ", expert_out.scalar_type(),
                   ", got ", grad_out.scalar_type());
}

// Each of the `count` row numbers in [0, count) appears once, so every row has one writer.
void check_permutation(const char* op, const char* name, const int32_t* ids, int64_t count) {
  std::vector<char> seen(count, 0);
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_VALUE(ids[i] >= 0 && ids[i] < count && !seen[ids[i]], op, ": ", name,
                      " must be a permutation of [0, ", count, "); got ", ids[i], " at flat index ", i);
    seen[ids[i]] = 1;
  }
}

constexpr int64_t kRowGrain = 16;  // rows per at::parallel_for grain
constexpr int64_t kLanes = 16;     // partial sums of a dot product (lets the compiler vectorise it)

// A [rows, D] operand whose rows are unit-stride: the tensor itself, or a contiguous copy.
at::Tensor unit_stride_rows(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// out[t] = sum_j coef(r) * rows[positions[r]] over the slots r = t * top_k + j of every token
// t, in slot order and in acc_t; a slot whose coef(r) is empty is skipped (its row not read).
// The permute's backward (coefficient 1) and the weighted combine share it.
template <typename scalar_t, typename acc_t, typename Coef>
void gather_sum_rows(const scalar_t* rows, int64_t row_stride, const int32_t* positions, int64_t num_tokens,
                     int64_t top_k, int64_t dim, Coef&& coef, scalar_t* out) {
  at::parallel_for(0, num_tokens, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(dim);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(row.begin(), row.end(), acc_t(0));
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t r = t * top_k + j;
        const std::optional<acc_t> c = coef(r);
        if (!c.has_value()) continue;
        const scalar_t* src = rows + positions[r] * row_stride;
        for (int64_t d = 0; d < dim; ++d) row[d] += *c * static_cast<acc_t>(src[d]);
      }
      std::copy_n(row.begin(), dim, out + t * dim);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_dispatch_cpu(const at::Tensor& indices_in,
                                                                int64_t num_experts) {
  check_moe_dispatch_args(indices_in, num_experts);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t num_tokens = indices.size(0), top_k = indices.size(1), slots = indices.numel();
  const int32_t* expert = indices.const_data_ptr<int32_t>();
  auto int32 = indices.options().dtype(at::kInt);
  at::Tensor sorted_token_ids = at::empty({slots}, int32);
  at::Tensor inverse_positions = at::empty({num_tokens, top_k}, int32);
  at::Tensor expert_offsets = at::zeros({num_experts + 1}, indices.options().dtype(at::kLong));
  if (slots == 0) return {sorted_token_ids, expert_offsets, inverse_positions};

  // Histogram (and the range check, in the same pass), exclusive scan, stable scatter.
  int64_t* offsets = expert_offsets.data_ptr<int64_t>();
  int32_t low = expert[0], high = expert[0];
  for (int64_t r = 0; r < slots; ++r) {
    low = std::min(low, expert[r]);
    high = std::max(high, expert[r]);
    if (expert[r] >= 0 && expert[r] < num_experts) ++offsets[expert[r] + 1];
  }
  TORCH_CHECK_VALUE(low >= 0 && high < num_experts, "moe_dispatch: indices must lie in [0, num_experts=",
                    num_experts, "); got values in [", low, ", ", high, "]");
  for (int64_t e = 0; e < num_experts; ++e) offsets[e + 1] += offsets[e];
  std::vector<int64_t> next(offsets, offsets + num_experts);
  int32_t* ids = sorted_token_ids.data_ptr<int32_t>();
  int32_t* inverse = inverse_positions.data_ptr<int32_t>();
  for (int64_t r = 0; r < slots; ++r) {
    const int64_t position = next[expert[r]]++;
    ids[position] = static_cast<int32_t>(r / top_k);
    inverse[r] = static_cast<int32_t>(position);
  }
  return {sorted_token_ids, expert_offsets, inverse_positions};
}

// out[p] = x[sorted_token_ids[p]].
at::Tensor permute_cpu(const at::Tensor& x_in, const at::Tensor& sorted_token_ids_in) {
  check_permute_args(x_in, sorted_token_ids_in);
  const at::Tensor x = unit_stride_rows(x_in);
  const at::Tensor sorted_token_ids = sorted_token_ids_in.contiguous();
  const int64_t rows = sorted_token_ids.size(0), dim = x.size(1), x_stride = x.stride(0);
  at::Tensor out = at::empty({rows, dim}, x.options());
  if (out.numel() == 0) return out;
  const int32_t* ids = sorted_token_ids.const_data_ptr<int32_t>();
  check_row_ids("permute", "sorted_token_ids", ids, rows, x.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "permute_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        std::copy_n(src + ids[p] * x_stride, dim, dst + p * dim);
      }
    });
  });
  return out;
}

// grad_x[t] = sum_j grad_out[inverse_positions[t, j]], the k rows summed in slot order.
at::Tensor permute_backward_cpu(const at::Tensor& grad_in, const at::Tensor& inverse_positions_in) {
  check_permute_backward_args(grad_in, inverse_positions_in);
  const at::Tensor grad = unit_stride_rows(grad_in);
  const at::Tensor inverse_positions = inverse_positions_in.contiguous();
  const int64_t num_tokens = inverse_positions.size(0), top_k = inverse_positions.size(1);
  const int64_t dim = grad.size(1), grad_stride = grad.stride(0);
  at::Tensor grad_x = at::empty({num_tokens, dim}, grad.options());
  if (grad_x.numel() == 0) return grad_x;
  const int32_t* positions = inverse_positions.const_data_ptr<int32_t>();
  check_row_ids("permute_backward", "inverse_positions", positions, num_tokens * top_k, grad.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "permute_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gather_sum_rows<scalar_t, acc_t>(grad.const_data_ptr<scalar_t>(), grad_stride, positions, num_tokens, top_k, dim,
                                     [](int64_t) { return std::optional<acc_t>(1); }, grad_x.data_ptr<scalar_t>());
  });
  return grad_x;
}

// a . b over n elements in acc_t, as kLanes interleaved partial sums added in a fixed order.
template <typename acc_t, typename scalar_t>
acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t lanes[kLanes] = {};
  const int64_t body = n / kLanes * kLanes;
  for (int64_t d = 0; d < body; d += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += static_cast<acc_t>(a[d + l]) * static_cast<acc_t>(b[d + l]);
  }
  acc_t result = 0;
  for (int64_t l = 0; l < kLanes; ++l) result += lanes[l];
  for (int64_t d = body; d < n; ++d) result += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  return result;
}

// The per-slot coefficients w[t, j] * s[e(t, j)] of the combine in acc_t, 0 for a slot whose
// expert is out of range (such a slot reads no row), and the expert_scale in acc_t.
template <typename acc_t>
struct Coefficients {
  std::vector<acc_t> weight, scale, coef;
  std::vector<char> valid;

  Coefficients(const at::Tensor& weights, const int32_t* expert, const std::optional<at::Tensor>& expert_scale,
               int64_t num_experts) {
    const int64_t slots = weights.numel();
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor w = weights.to(acc_type).contiguous();
    weight.assign(w.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>() + slots);
    scale.assign(num_experts, acc_t(1));
    if (expert_scale.has_value()) {
      const at::Tensor s = expert_scale->to(acc_type).contiguous();
      std::copy_n(s.const_data_ptr<acc_t>(), num_experts, scale.begin());
    }
    coef.resize(slots);
    valid.resize(slots);
    for (int64_t r = 0; r < slots; ++r) {
      valid[r] = expert[r] >= 0 && expert[r] < num_experts;
      coef[r] = valid[r] ? weight[r] * scale[expert[r]] : acc_t(0);
    }
  }
};

// Contiguous int32 routing tensors of the combine and the checks of their values.
struct Routing {
  at::Tensor indices, inverse_positions;
  int64_t num_tokens, top_k;

  Routing(const char* op, const at::Tensor& indices_in, const at::Tensor& inverse_in, int64_t rows)
      : indices(indices_in.contiguous()), inverse_positions(inverse_in.contiguous()),
        num_tokens(indices.size(0)), top_k(indices.size(1)) {
    check_row_ids(op, "inverse_positions", positions(), num_tokens * top_k, rows);
  }
  const int32_t* expert() const { return indices.const_data_ptr<int32_t>(); }
  const int32_t* positions() const { return inverse_positions.const_data_ptr<int32_t>(); }
};

// out[t] = sum_j w[t, j] * s[e(t, j)] * y[pos(t, j)] over the slots of nonzero coefficient.
at::Tensor weighted_combine_cpu(const at::Tensor& expert_out_in, const at::Tensor& weights,
                                const at::Tensor& indices, const at::Tensor& inverse_positions,
                                const std::optional<at::Tensor>& expert_scale, int64_t num_experts) {
  check_weighted_combine_args("weighted_combine", expert_out_in, weights, indices, inverse_positions, expert_scale,
                              num_experts);
  const at::Tensor y = unit_stride_rows(expert_out_in);
  const Routing routing("weighted_combine", indices, inverse_positions, y.size(0));
  const int64_t num_tokens = routing.num_tokens, top_k = routing.top_k, dim = y.size(1), y_stride = y.stride(0);
  at::Tensor out = at::empty({num_tokens, dim}, y.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "weighted_combine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Coefficients<acc_t> c(weights, routing.expert(), expert_scale, num_experts);
    gather_sum_rows<scalar_t, acc_t>(
        y.const_data_ptr<scalar_t>(), y_stride, routing.positions(), num_tokens, top_k, dim,
        // A zero coefficient skips its slot, as the dense combine does: its row (NaN or Inf
        // as it may be) is not read and adds exactly nothing.
        [&](int64_t r) { return c.valid[r] && c.coef[r] != acc_t(0) ? std::optional<acc_t>(c.coef[r]) : std::nullopt; },
        out.data_ptr<scalar_t>());
  });
  return out;
}

// grad_y[pos(t, j)] = w * s * grad[t]; dot[t, j] = y[pos(t, j)] . grad[t]; grad_w = s * dot;
// grad_s[e] = sum over the slots of e, in slot order, of w * dot. Without expert_scale,
// grad_s is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_combine_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& expert_out_in, const at::Tensor& weights,
    const at::Tensor& indices, const at::Tensor& inverse_positions, const std::optional<at::Tensor>& expert_scale,
    int64_t num_experts) {
  check_weighted_combine_args("weighted_combine_backward", expert_out_in, weights, indices, inverse_positions,
                              expert_scale, num_experts);
  check_combine_grad(grad_in, expert_out_in, indices);
  const at::Tensor y = unit_stride_rows(expert_out_in);
  const at::Tensor grad = unit_stride_rows(grad_in);
  const Routing routing("weighted_combine_backward", indices, inverse_positions, y.size(0));
  const int64_t num_tokens = routing.num_tokens, top_k = routing.top_k, slots = num_tokens * top_k;
  check_permutation("weighted_combine_backward", "inverse_positions", routing.positions(), slots);
  const int64_t dim = y.size(1), y_stride = y.stride(0), grad_stride = grad.stride(0);
  at::Tensor grad_y = at::empty({y.size(0), dim}, y.options());
  at::Tensor grad_weights;
  at::Tensor grad_scale;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "weighted_combine_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const Coefficients<acc_t> c(weights, routing.expert(), expert_scale, num_experts);
    const int32_t* positions = routing.positions();
    const int32_t* expert = routing.expert();
    const scalar_t* y_data = y.const_data_ptr<scalar_t>();
    const scalar_t* grad_data = grad.const_data_ptr<scalar_t>();
    scalar_t* grad_y_data = grad_y.data_ptr<scalar_t>();
    std::vector<acc_t> dots(slots, acc_t(0));
    at::parallel_for(0, num_tokens, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* g = grad_data + t * grad_stride;
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t r = t * top_k + j;
          const acc_t coef = c.coef[r];
          scalar_t* gy = grad_y_data + positions[r] * dim;
          const scalar_t* y_row = y_data + positions[r] * y_stride;
          for (int64_t d = 0; d < dim; ++d) gy[d] = static_cast<scalar_t>(coef * static_cast<acc_t>(g[d]));
          dots[r] = c.valid[r] ? dot<acc_t>(y_row, g, dim) : acc_t(0);
        }
      }
    });
    at::Tensor grad_w = at::empty({num_tokens, top_k}, weights.options().dtype(acc_type));
    acc_t* grad_w_data = grad_w.data_ptr<acc_t>();
    for (int64_t r = 0; r < slots; ++r) grad_w_data[r] = c.valid[r] ? dots[r] * c.scale[expert[r]] : acc_t(0);
    grad_weights = grad_w.to(weights.scalar_type());
    if (expert_scale.has_value()) {
      at::Tensor grad_s = at::zeros({num_experts}, expert_scale->options().dtype(acc_type));
      acc_t* grad_s_data = grad_s.data_ptr<acc_t>();
      for (int64_t r = 0; r < slots; ++r) {
        if (c.valid[r]) grad_s_data[expert[r]] += c.weight[r] * dots[r];
      }
      grad_scale = grad_s.to(expert_scale->scalar_type());
    } else {
      grad_scale = at::empty({0}, weights.options());
    }
  });
  return {grad_y, grad_weights, grad_scale};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(astrea, m) {
  // CPU kernels of Triton ops (astrea/ops/dispatch.py, combine.py): the same semantics as
  // the Python custom ops astrea::moe_dispatch, permute, permute_backward, weighted_combine
  // and weighted_combine_backward, which call them on CPU tensors.
  m.def("moe_dispatch_cpu(Tensor indices, int num_experts) "
        "-> (Tensor sorted_token_ids, Tensor expert_offsets, Tensor inverse_positions)");
  m.def("permute_cpu(Tensor x, Tensor sorted_token_ids) -> Tensor");
  m.def("permute_backward_cpu(Tensor grad_out, Tensor inverse_positions) -> Tensor");
  m.def("weighted_combine_cpu(Tensor expert_out, Tensor weights, Tensor indices, Tensor inverse_positions, "
        "Tensor? expert_scale, int num_experts) -> Tensor");
  m.def("weighted_combine_backward_cpu(Tensor grad_out, Tensor expert_out, Tensor weights, Tensor indices, "
        "Tensor inverse_positions, Tensor? expert_scale, int num_experts) "
        "-> (Tensor grad_expert_out, Tensor grad_weights, Tensor grad_expert_scale)");
}

TORCH_LIBRARY_IMPL(astrea, CPU, m) {
  m.impl("moe_dispatch_cpu", &moe_dispatch_cpu);
  m.impl("permute_cpu", &permute_cpu);
  m.impl("permute_backward_cpu", &permute_backward_cpu);
  m.impl("weighted_combine_cpu", &weighted_combine_cpu);
  m.impl("weighted_combine_backward_cpu", &weighted_combine_backward_cpu);
}

}  // namespace astrea
