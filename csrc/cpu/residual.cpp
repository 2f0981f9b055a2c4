// CPU kernel of the stochastic residual: out = base + m * branch / p per mask unit, or, with no
// base (the backward of the branch), m * branch / p.
//
// The mask is the Triton kernel's, bit for bit: unit u (a [..., D] row, or a sample along
// dim 0) draws tl.rand(seed, offset + u), Philox4x32-10 keyed by the seed's 32-bit halves
// with the 64-bit counter in the first two words, and is kept when that uniform is below p
// in fp32. The values follow the reference's rounding steps: branch * (1/p rounded to the
// math dtype), then + base, in fp32 (float64 for float64), rounded once to the output dtype.
// Each row is written by one thread, so results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

// a * b + c must round twice, as the reference does: no fused multiply-add.
#pragma GCC optimize("fp-contract=off")

namespace astrea {
namespace {

// branch [B, ..., D] floating (at least 2-D), base absent or of branch's shape, dtype and
// device; p in (0, 1]; seed, offset >= 0; granularity "token" or "sample".
void check_stochastic_residual_args(const std::optional<at::Tensor>& base, const at::Tensor& branch,
                                    double keep_p, int64_t seed, int64_t offset,
                                    c10::string_view granularity) {
  const char* op = "stochastic_residual";
  TORCH_CHECK_VALUE(branch.dim() >= 2, op, ": the branch must be [B, ..., D] (at least 2-D), got shape ",
                    branch.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(branch.scalar_type()), op, ": the branch must be a floating tensor, got ",
                   branch.scalar_type());
  if (base.has_value()) {
    TORCH_CHECK_VALUE(base->sizes() == branch.sizes(), op, ": the base must have the branch's shape ",
                      branch.sizes(), ", got ", base->sizes());
    TORCH_CHECK_TYPE(base->scalar_type() == branch.scalar_type(), op, ": the base must have the branch's dtype ",
                     branch.scalar_type(), ", got ", base->scalar_type());
    TORCH_CHECK_VALUE(base->device() == branch.device(), op, ": base and branch must be on one device, got ",
                      base->device(), " and ", branch.device());
  }
  TORCH_CHECK_VALUE(keep_p > 0.0 && keep_p <= 1.0, op, ": p (the keep probability) must be in (0, 1], got ",
                    keep_p);
  TORCH_CHECK_VALUE(seed >= 0 && offset >= 0, op, ": seed and offset must be >= 0, got ", seed, " and ", offset);
  TORCH_CHECK_VALUE(granularity == "token" || granularity == "sample", op,
                    ": granularity must be 'token' or 'sample', got '", granularity, "'");
}

constexpr int64_t kRowGrain = 64;  // rows per at::parallel_for grain

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
// Largest fp32 scale with INT32_MAX * scale < 1 (triton.language.random.uint_to_uniform_float).
constexpr float kUniformScale = 4.6566127342e-10f;

// tl.rand(seed, counter): the first Philox4x32-10 output word as a uniform in [0, 1).
float philox_uniform(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t product_b = uint64_t(kPhiloxRoundB) * c2;
    const uint64_t product_a = uint64_t(kPhiloxRoundA) * c0;
    const uint32_t next_c0 = static_cast<uint32_t>(product_b >> 32) ^ c1 ^ k0;
    const uint32_t next_c2 = static_cast<uint32_t>(product_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(product_b);
    c3 = static_cast<uint32_t>(product_a);
    c0 = next_c0;
    c2 = next_c2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  // The word read as int32 and folded to non-negative (~x for negative x), as Triton does.
  const int32_t word = static_cast<int32_t>(c0);
  const int32_t folded = word < 0 ? ~word : word;
  return static_cast<float>(folded) * kUniformScale;
}

at::Tensor stochastic_residual_cpu(const std::optional<at::Tensor>& base_in, const at::Tensor& branch_in,
                                   double keep_p, int64_t seed, int64_t offset, c10::string_view granularity,
                                   bool training) {
  check_stochastic_residual_args(base_in, branch_in, keep_p, seed, offset, granularity);
  const at::Tensor branch = branch_in.contiguous();
  const std::optional<at::Tensor> base =
      base_in.has_value() ? std::optional<at::Tensor>(base_in->contiguous()) : std::nullopt;
  at::Tensor out = at::empty(branch.sizes(), branch.options());
  if (out.numel() == 0) return out;
  const int64_t dim = branch.size(-1), rows = branch.numel() / dim;
  const int64_t rows_per_unit = granularity == "sample" ? rows / branch.size(0) : 1;
  const bool stochastic = training && keep_p < 1.0;
  const float keep_below = static_cast<float>(keep_p);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, branch.scalar_type(), "stochastic_residual_cpu", [&] {
    using math_t = at::opmath_type<scalar_t>;
    const math_t inv_p = static_cast<math_t>(1.0 / keep_p);
    const scalar_t* branch_data = branch.const_data_ptr<scalar_t>();
    const scalar_t* base_data = base.has_value() ? base->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_data = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        bool keep = true;
        if (stochastic) {
          const uint64_t unit = static_cast<uint64_t>(row / rows_per_unit);
          keep = philox_uniform(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset) + unit) < keep_below;
        }
        const scalar_t* r = branch_data + row * dim;
        scalar_t* o = out_data + row * dim;
        // The kept branch is scaled by 1/p only in training with p < 1; a dropped one adds
        // +0 to the base (which turns a -0 base into +0, as the reference's add does).
        if (base_data == nullptr) {
          if (!keep) {
            for (int64_t j = 0; j < dim; ++j) o[j] = scalar_t(math_t(0));
          } else if (stochastic) {
            for (int64_t j = 0; j < dim; ++j) o[j] = static_cast<scalar_t>(static_cast<math_t>(r[j]) * inv_p);
          } else {
            for (int64_t j = 0; j < dim; ++j) o[j] = r[j];
          }
          continue;
        }
        const scalar_t* y = base_data + row * dim;
        if (!keep) {
          for (int64_t j = 0; j < dim; ++j) o[j] = static_cast<scalar_t>(static_cast<math_t>(y[j]) + math_t(0));
        } else if (stochastic) {
          for (int64_t j = 0; j < dim; ++j) {
            o[j] = static_cast<scalar_t>(static_cast<math_t>(y[j]) + static_cast<math_t>(r[j]) * inv_p);
          }
        } else {
          for (int64_t j = 0; j < dim; ++j) {
            o[j] = static_cast<scalar_t>(static_cast<math_t>(y[j]) + static_cast<math_t>(r[j]));
          }
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(astrea, m) {
  // The stochastic residual on CPU tensors (the Python ops astrea::stochastic_residual and
  // stochastic_residual_backward run it under the auto backend): base + m * branch / p, or
  // m * branch / p without a base, in the branch's shape and dtype; the mask is the Triton
  // kernel's Philox draw keyed by (seed, offset + unit), bit for bit.
  m.def("stochastic_residual_cpu(Tensor? base, Tensor branch, float p, int seed, int offset, str granularity, "
        "bool training) -> Tensor");
}

TORCH_LIBRARY_IMPL(astrea, CPU, m) { m.impl("stochastic_residual_cpu", &stochastic_residual_cpu); }

}  // namespace astrea
