// CPU kernels of moe_experts' grouped GEMMs (astrea/ops/experts.py), with [lo, hi) =
// [offsets[e], offsets[e + 1]) the dispatch rows of expert e:
//   grouped_mm_cpu:          out[lo:hi] = a[lo:hi] @ b[e]        (both projections, d rows)
//   grouped_weight_grad_cpu: out[e] = a[:, lo:hi] @ b[lo:hi]     (the weight gradients)
// The work is cut into tiles fixed by the sizes (an expert and a block of output rows), spread
// over at::parallel_for; each tile's product runs on one BLAS thread (blas.h), so every sum has
// one order on any thread count, which torch's own grouped_mm (MKL splitting the reduction over
// its threads) does not give. Rows past offsets[E], and experts without rows, get zeros.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "blas.h"

namespace astrea {
namespace {

// Output rows per tile: large enough that a tile's GEMM amortises its call (bf16 runs AMX
// tiles), small enough that a few experts still spread over the threads.
constexpr int64_t kGroupedTileRows = 256;     // grouped_mm_cpu: rows of one expert
constexpr int64_t kWeightGradTileRows = 1024;  // grouped_weight_grad_cpu: rows of out[e]

// offsets [E + 1] on the host, checked to ascend within [0, limit].
std::vector<int64_t> expert_bounds(const char* op, const at::Tensor& offsets, int64_t limit) {
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 1, op, ": offsets must be [E + 1]; got ",
                    offsets.sizes());
  at::Tensor host = offsets.to(at::kCPU, at::kLong).contiguous();
  std::vector<int64_t> bounds(host.const_data_ptr<int64_t>(), host.const_data_ptr<int64_t>() + host.numel());
  for (size_t e = 0; e + 1 < bounds.size(); ++e) {
    TORCH_CHECK_VALUE(0 <= bounds[e] && bounds[e] <= bounds[e + 1] && bounds[e + 1] <= limit, op,
                      ": offsets must ascend within [0, ", limit, "]");
  }
  return bounds;
}

void check_operands(const char* op, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type() && a.is_floating_point(), op,
                   ": a and b must share one floating dtype; got ", a.scalar_type(), " and ", b.scalar_type());
}

// Runs tile(e, first, count) for every block of tile_rows of the `rows(e)` rows of each expert.
template <typename Rows, typename Tile>
void for_each_tile(int64_t experts, int64_t tile_rows, Rows rows, Tile tile) {
  std::vector<int64_t> starts(experts + 1, 0);  // first tile of each expert
  for (int64_t e = 0; e < experts; ++e) starts[e + 1] = starts[e] + (rows(e) + tile_rows - 1) / tile_rows;
  parallel_tiles(starts[experts], [&](int64_t index) {
    const int64_t e = std::upper_bound(starts.begin(), starts.end(), index) - starts.begin() - 1;
    const int64_t first = (index - starts[e]) * tile_rows;
    tile(e, first, std::min(tile_rows, rows(e) - first));
  });
}

at::Tensor grouped_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  constexpr const char* op = "grouped_mm_cpu";
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 3 && a.size(1) == b.size(1), op,
                    ": a must be [M, K] and b [E, K, n]; got ", a.sizes(), " and ", b.sizes());
  check_operands(op, a, b);
  const std::vector<int64_t> bounds = expert_bounds(op, offsets, a.size(0));
  const int64_t experts = static_cast<int64_t>(bounds.size()) - 1;
  TORCH_CHECK_VALUE(b.size(0) == experts, op, ": b must hold E = ", experts, " experts; got ", b.size(0));
  at::Tensor out = at::empty({a.size(0), b.size(2)}, a.options());
  out.narrow(0, bounds[experts], a.size(0) - bounds[experts]).zero_();
  for_each_tile(experts, kGroupedTileRows, [&](int64_t e) { return bounds[e + 1] - bounds[e]; },
                [&](int64_t e, int64_t first, int64_t count) {
                  at::Tensor target = out.narrow(0, bounds[e] + first, count);
                  at::mm_out(target, a.narrow(0, bounds[e] + first, count), b.select(0, e));
                });
  return out;
}

at::Tensor grouped_weight_grad_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  constexpr const char* op = "grouped_weight_grad_cpu";
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), op,
                    ": a must be [m, M] and b [M, n]; got ", a.sizes(), " and ", b.sizes());
  check_operands(op, a, b);
  const std::vector<int64_t> bounds = expert_bounds(op, offsets, a.size(1));
  const int64_t experts = static_cast<int64_t>(bounds.size()) - 1;
  at::Tensor out = at::empty({experts, a.size(0), b.size(1)}, a.options());
  for (int64_t e = 0; e < experts; ++e) {
    if (bounds[e + 1] == bounds[e]) out.select(0, e).zero_();
  }
  for_each_tile(experts, kWeightGradTileRows, [&](int64_t e) { return bounds[e + 1] > bounds[e] ? a.size(0) : 0; },
                [&](int64_t e, int64_t first, int64_t count) {
                  const int64_t lo = bounds[e], hi = bounds[e + 1];
                  at::Tensor target = out.select(0, e).narrow(0, first, count);
                  at::mm_out(target, a.narrow(0, first, count).narrow(1, lo, hi - lo), b.narrow(0, lo, hi - lo));
                });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(astrea, m) {
  // The grouped GEMMs of astrea::moe_experts and its backward on CPU tensors.
  m.def("grouped_mm_cpu(Tensor a, Tensor b, Tensor offsets) -> Tensor");
  m.def("grouped_weight_grad_cpu(Tensor a, Tensor b, Tensor offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(astrea, CPU, m) {
  m.impl("grouped_mm_cpu", &grouped_mm_cpu);
  m.impl("grouped_weight_grad_cpu", &grouped_weight_grad_cpu);
}

}  // namespace astrea
