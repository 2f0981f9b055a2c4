// CPU kernels of the dense weighted combine out[b] = sum_e c[b, e] * y_e[b] and its backward.
//
// The experts are E tensors [B, ..., D] of any strides, read in place through their [B, T, D]
// views. The forward follows the reference's rounding steps: per row, an fp32 accumulator
// (float64 for float64) starts at +0 and adds c * y expert by expert in expert order, skipping
// an expert whose coefficient is 0 for the sample (its rows are not read), then rounds once to
// the experts' dtype. Each output row and each coefficient gradient is computed by one thread
// in a fixed order, so results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

// acc + c * y must round twice, as the reference does: no fused multiply-add.
#pragma GCC optimize("fp-contract=off")

namespace astrea {
namespace {

// experts: 1 or more tensors [B, ..., D] of one shape and floating dtype on one device;
// coef [B, E] floating on that device.
void check_dense_combine_args(const char* op, at::TensorList experts, const at::Tensor& coef) {
  TORCH_CHECK_VALUE(!experts.empty(), op, ": experts must hold at least one tensor, got none");
  const at::Tensor& first = experts[0];
  TORCH_CHECK_VALUE(first.dim() >= 2, op, ": experts[0] must be [B, ..., D] (at least 2-D), got shape ",
                    first.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(first.scalar_type()), op, ": experts must be floating, got ",
                   first.scalar_type());
  for (size_t e = 1; e < experts.size(); ++e) {
    TORCH_CHECK_VALUE(experts[e].sizes() == first.sizes(), op, ": experts[", e, "] must have the shape of experts[0] ",
                      first.sizes(), ", got ", experts[e].sizes());
    TORCH_CHECK_TYPE(experts[e].scalar_type() == first.scalar_type(), op, ": experts[", e,
                     "] must have the dtype of experts[0] ", first.scalar_type(), ", got ", experts[e].scalar_type());
    TORCH_CHECK_VALUE(experts[e].device() == first.device(), op, ": experts[", e, "] must be on ", first.device(),
                      ", got ", experts[e].device());
  }
  const int64_t num_experts = static_cast<int64_t>(experts.size());
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == first.size(0) && coef.size(1) == num_experts, op,
                    ": coef must be [B, E] = [", first.size(0), ", ", num_experts, "], got ", coef.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(coef.scalar_type()), op, ": coef must be floating, got ", coef.scalar_type());
  TORCH_CHECK_VALUE(coef.device() == first.device(), op, ": coef must be on ", first.device(), ", got ",
                    coef.device());
}

// The incoming gradient of the dense combine: the experts' shape, dtype and device.
void check_dense_combine_grad(const at::Tensor& grad, const at::Tensor& expert) {
  TORCH_CHECK_VALUE(grad.sizes() == expert.sizes(), "dense_combine_backward_cpu: grad must have the experts' shape ",
                    expert.sizes(), ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == expert.scalar_type(),
                   "dense_combine_backward_cpu: grad must have the experts' dtype ", expert.scalar_type(), ", got ",
                   grad.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == expert.device(), "dense_combine_backward_cpu: grad must be on ",
                    expert.device(), ", got ", grad.device());
}

constexpr int64_t kRowGrain = 16;  // [D] rows per at::parallel_for grain
// Independent partial sums of a coefficient gradient, added in a fixed order at the end:
// lets the compiler vectorise the dot product without reordering it from run to run.
constexpr int64_t kDotLanes = 8;

// A [B, ..., D] expert seen as [B, T, D] (a view whenever its strides allow one).
at::Tensor as_btd(const at::Tensor& y) { return y.reshape({y.size(0), -1, y.size(-1)}); }

// Element (b, t, 0) of a [B, T, D] tensor and its stride along D.
template <typename scalar_t>
struct RowView {
  const scalar_t* data;
  int64_t stride_b, stride_t, stride_d;

  explicit RowView(const at::Tensor& btd)
      : data(btd.const_data_ptr<scalar_t>()),
        stride_b(btd.stride(0)),
        stride_t(btd.stride(1)),
        stride_d(btd.stride(2)) {}
  const scalar_t* row(int64_t b, int64_t t) const { return data + b * stride_b + t * stride_t; }
};

template <typename scalar_t>
std::vector<RowView<scalar_t>> row_views(const std::vector<at::Tensor>& experts_btd) {
  std::vector<RowView<scalar_t>> views;
  views.reserve(experts_btd.size());
  for (const at::Tensor& y : experts_btd) views.emplace_back(y);
  return views;
}

std::vector<at::Tensor> experts_as_btd(at::TensorList experts) {
  std::vector<at::Tensor> btd;
  btd.reserve(experts.size());
  for (const at::Tensor& y : experts) btd.push_back(as_btd(y));
  return btd;
}

// The coefficients in the experts' math dtype, as the reference's coef.to(math).
at::Tensor math_coefficients(const at::Tensor& coef, at::ScalarType expert_dtype) {
  const auto math = expert_dtype == at::kDouble ? at::kDouble : at::kFloat;
  return coef.to(math).contiguous();
}

at::Tensor dense_combine_cpu(at::TensorList experts, const at::Tensor& coef) {
  check_dense_combine_args("dense_combine_cpu", experts, coef);
  const at::Tensor& first = experts[0];
  at::Tensor out = at::empty(first.sizes(), first.options());
  if (out.numel() == 0) return out;
  const std::vector<at::Tensor> experts_btd = experts_as_btd(experts);
  const int64_t batch = experts_btd[0].size(0), tokens = experts_btd[0].size(1), dim = experts_btd[0].size(2);
  const int64_t num_experts = static_cast<int64_t>(experts.size());
  const at::Tensor coef_math = math_coefficients(coef, first.scalar_type());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "dense_combine_cpu", [&] {
    using math_t = at::opmath_type<scalar_t>;
    const std::vector<RowView<scalar_t>> views = row_views<scalar_t>(experts_btd);
    const math_t* coef_data = coef_math.const_data_ptr<math_t>();
    scalar_t* out_data = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * tokens, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<math_t> acc(dim);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / tokens, t = row % tokens;
        std::fill(acc.begin(), acc.end(), math_t(0));
        for (int64_t e = 0; e < num_experts; ++e) {
          const math_t c = coef_data[b * num_experts + e];
          if (c == math_t(0)) continue;  // adds exactly nothing, even where y is not finite
          const scalar_t* y = views[e].row(b, t);
          const int64_t sd = views[e].stride_d;
          if (sd == 1) {
            for (int64_t j = 0; j < dim; ++j) acc[j] = acc[j] + c * static_cast<math_t>(y[j]);
          } else {
            for (int64_t j = 0; j < dim; ++j) acc[j] = acc[j] + c * static_cast<math_t>(y[j * sd]);
          }
        }
        scalar_t* o = out_data + row * dim;
        for (int64_t j = 0; j < dim; ++j) o[j] = static_cast<scalar_t>(acc[j]);
      }
    });
  });
  return out;
}

// sum_j g[j] * y[j * sd] in kDotLanes fixed partial sums added in lane order.
template <typename scalar_t, typename math_t>
math_t strided_dot(const scalar_t* g, const scalar_t* y, int64_t sd, int64_t dim) {
  std::array<math_t, kDotLanes> lanes{};
  int64_t j = 0;
  for (; j + kDotLanes <= dim; j += kDotLanes) {
    for (int64_t l = 0; l < kDotLanes; ++l) {
      lanes[l] = lanes[l] + static_cast<math_t>(g[j + l]) * static_cast<math_t>(y[(j + l) * sd]);
    }
  }
  for (; j < dim; ++j) {
    math_t& lane = lanes[j % kDotLanes];
    lane = lane + static_cast<math_t>(g[j]) * static_cast<math_t>(y[j * sd]);
  }
  math_t total = 0;
  for (const math_t lane : lanes) total = total + lane;
  return total;
}

// (d experts: c[b, e] * grad[b] in the experts' dtype, or none; d coef [B, E] in coef's dtype:
// sum over the sample of grad * y_e in the math dtype, or an empty tensor).
std::tuple<std::vector<at::Tensor>, at::Tensor> dense_combine_backward_cpu(const at::Tensor& grad_in,
                                                                         at::TensorList experts,
                                                                         const at::Tensor& coef, bool expert_grad,
                                                                         bool coef_grad) {
  check_dense_combine_args("dense_combine_backward_cpu", experts, coef);
  check_dense_combine_grad(grad_in, experts[0]);
  const int64_t num_experts = static_cast<int64_t>(experts.size());
  std::vector<at::Tensor> grad_experts;
  if (expert_grad) {
    for (int64_t e = 0; e < num_experts; ++e) grad_experts.push_back(at::empty(grad_in.sizes(), grad_in.options()));
  }
  const at::Tensor coef_math = math_coefficients(coef, grad_in.scalar_type());
  at::Tensor grad_coef_math = coef_grad ? at::zeros(coef_math.sizes(), coef_math.options())
                                        : at::empty({0}, coef.options());
  // Before the [B, T, D] view, which an empty B or D cannot take (its T would be ambiguous).
  if (grad_in.numel() == 0) return {grad_experts, grad_coef_math.to(coef.scalar_type())};
  const at::Tensor grad = as_btd(grad_in.contiguous());
  const int64_t batch = grad.size(0), tokens = grad.size(1), dim = grad.size(2);
  const std::vector<at::Tensor> experts_btd = experts_as_btd(experts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "dense_combine_backward_cpu", [&] {
    using math_t = at::opmath_type<scalar_t>;
    const std::vector<RowView<scalar_t>> views = row_views<scalar_t>(experts_btd);
    const math_t* coef_data = coef_math.const_data_ptr<math_t>();
    const scalar_t* grad_data = grad.const_data_ptr<scalar_t>();
    math_t* grad_coef_data = coef_grad ? grad_coef_math.data_ptr<math_t>() : nullptr;
    // One (sample, expert) pair per task: its expert gradient rows and its coefficient gradient.
    at::parallel_for(0, batch * num_experts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t b = pair / num_experts, e = pair % num_experts;
        const math_t c = coef_data[pair];
        const scalar_t* g_sample = grad_data + b * tokens * dim;
        if (expert_grad) {
          scalar_t* dy = grad_experts[e].data_ptr<scalar_t>() + b * tokens * dim;
          for (int64_t j = 0; j < tokens * dim; ++j) {
            dy[j] = static_cast<scalar_t>(c * static_cast<math_t>(g_sample[j]));
          }
        }
        if (coef_grad) {
          math_t total = 0;
          for (int64_t t = 0; t < tokens; ++t) {
            const scalar_t* y = views[e].row(b, t);
            total = total + strided_dot<scalar_t, math_t>(g_sample + t * dim, y, views[e].stride_d, dim);
          }
          grad_coef_data[pair] = total;
        }
      }
    });
  });
  return {grad_experts, coef_grad ? grad_coef_math.to(coef.scalar_type()) : grad_coef_math};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(astrea, m) {
  // The dense weighted combine on CPU tensors (the Python ops astrea::dense_weighted_combine and
  // dense_combine_backward run it under the auto backend): out[b] = sum_e coef[b, e] * experts[e][b]
  // in expert order in fp32 (float64 for float64), experts with a zero coefficient skipped;
  // the backward gives coef[b, e] * grad[b] per expert (or no tensors) and d coef [B, E] in
  // coef's dtype (or an empty tensor).
  m.def("dense_combine_cpu(Tensor[] experts, Tensor coef) -> Tensor");
  m.def("dense_combine_backward_cpu(Tensor grad, Tensor[] experts, Tensor coef, bool expert_grad, bool coef_grad) "
        "-> (Tensor[] grad_experts, Tensor grad_coef)");
}

TORCH_LIBRARY_IMPL(astrea, CPU, m) {
  m.impl("dense_combine_cpu", &dense_combine_cpu);
  m.impl("dense_combine_backward_cpu", &dense_combine_backward_cpu);
}

}  // namespace astrea
