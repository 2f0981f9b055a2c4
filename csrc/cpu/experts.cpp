// CPU kernel of moe_experts' weight gradients (astrea/ops/experts.py): per expert e,
// out[e] = a[:, lo:hi] @ b[lo:hi] with [lo, hi) = [offsets[e], offsets[e + 1]), the sum over
// that expert's rows. The work is cut into tiles fixed by the sizes (an expert and a block of
// output rows), spread over at::parallel_for; each tile's product runs on one BLAS thread
// (blas.h), so every sum has one order on any thread count. An expert without rows gets zeros.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "blas.h"

namespace astrea {
namespace {

constexpr int64_t kTileRows = 64;  // output rows per tile

at::Tensor grouped_weight_grad_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0),
                    "grouped_weight_grad_cpu: a must be [m, M] and b [M, n]; got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type() && a.is_floating_point(),
                   "grouped_weight_grad_cpu: a and b must share one floating dtype; got ", a.scalar_type(), " and ",
                   b.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 1, "grouped_weight_grad_cpu: offsets must be [E + 1]");
  const std::vector<int64_t> bounds = [&] {
    at::Tensor host = offsets.to(at::kCPU, at::kLong).contiguous();
    return std::vector<int64_t>(host.const_data_ptr<int64_t>(), host.const_data_ptr<int64_t>() + host.numel());
  }();
  const int64_t experts = static_cast<int64_t>(bounds.size()) - 1;
  for (int64_t e = 0; e < experts; ++e) {
    TORCH_CHECK_VALUE(0 <= bounds[e] && bounds[e] <= bounds[e + 1] && bounds[e + 1] <= a.size(1),
                      "grouped_weight_grad_cpu: offsets must ascend within [0, ", a.size(1), "]");
  }
  const int64_t rows = a.size(0);
  at::Tensor out = at::zeros({experts, rows, b.size(1)}, a.options());
  const int64_t row_blocks = (rows + kTileRows - 1) / kTileRows;
  at::parallel_for(0, experts * row_blocks, 1, [&](int64_t begin, int64_t end) {
    SingleThreadBlas one_thread;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t e = tile / row_blocks;
      const int64_t first = (tile % row_blocks) * kTileRows;
      const int64_t count = std::min(kTileRows, rows - first);
      const int64_t lo = bounds[e], hi = bounds[e + 1];
      if (hi == lo) continue;
      at::Tensor target = out.select(0, e).narrow(0, first, count);
      at::mm_out(target, a.narrow(0, first, count).narrow(1, lo, hi - lo), b.narrow(0, lo, hi - lo));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(astrea, m) {
  // The weight gradients of astrea::moe_experts_backward on CPU tensors.
  m.def("grouped_weight_grad_cpu(Tensor a, Tensor b, Tensor offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(astrea, CPU, m) {
  m.impl("grouped_weight_grad_cpu", &grouped_weight_grad_cpu);
}

}  // namespace astrea
