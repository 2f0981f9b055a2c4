// Runs the kernels of csrc/cuda/moco_device.cuh on the host (tests/cpp/cuda_emulation.h
// supplies the CUDA builtins) and compares logits, loss and gradients with a float64
// reference: the tensor-core tiles for bf16 and fp16, the FMA tiles for fp32. Launches
// mirror the host code of moco_kernels.cu. Exits non-zero on the first mismatch.
//
// Row i's queue holds a copy of q_i at key (7 i + 3) mod K, so that one key dominates the
// row's softmax wherever it lies in the tiles: a score or probability taken from the wrong
// row, key or feature moves the results by O(1).
#include "cuda_emulation.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/moco_device.cuh"

namespace {

using namespace astrea::cuda;
using namespace astrea::cuda::detail;

template <typename T>
struct Dtype;
template <>
struct Dtype<float> {
  static constexpr const char* kName = "fp32";
  static constexpr double kTolerance = 1e-4;  // of the fp32 outputs and gradients
  using Family = FmaFamily;
};
template <>
struct Dtype<__nv_bfloat16> {
  static constexpr const char* kName = "bf16";
  static constexpr double kTolerance = 2e-2;  // gradients are bf16 (2^-9) from bf16 probabilities
  using Family = TensorCoreFamily;
};
template <>
struct Dtype<__half> {
  static constexpr const char* kName = "fp16";
  static constexpr double kTolerance = 4e-3;
  using Family = TensorCoreFamily;
};

double value(float v) { return v; }
double value(__half v) { return __half2float(v); }
double value(__nv_bfloat16 v) { return __bfloat162float(v); }

// Elements of `got` against `want`: |got - want| <= tol * (scale + |want|).
template <typename G>
void compare(const char* what, const std::vector<G>& got, const std::vector<double>& want, double tol,
             double scale, const char* dtype, long n, long num_keys, long dim) {
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = value(got[i]);
    if (!(std::fabs(g - want[i]) <= tol * (scale + std::fabs(want[i])))) {
      std::fprintf(stderr, "FAILED: %s %s (N=%ld K=%ld D=%ld) element %zu: got %.6g, expected %.6g\n", dtype, what,
                   n, num_keys, dim, i, g, want[i]);
      std::exit(1);
    }
  }
}

// Buffers placed `offset` elements into their allocation (offset 1: not 16-byte aligned).
template <typename T>
struct Buffer {
  std::vector<T> storage;
  size_t offset;
  Buffer(size_t size, size_t offset_) : storage(size + offset_), offset(offset_) {}
  T* data() { return storage.data() + offset; }
  T& operator[](size_t i) { return storage[offset + i]; }
};

template <typename T>
void run_case(long n, long num_keys, long dim, int sms, size_t offset, std::mt19937& rng) {
  using Forward = typename Dtype<T>::Family::template Forward<T>;
  using Backward = typename Dtype<T>::Family::template Backward<T>;
  const char* name = Dtype<T>::kName;
  const float temperature = 0.1f;
  const float inv_t = 1.f / temperature;

  // L2-normalised rows rounded to T; the reference sees the rounded values.
  std::normal_distribution<double> normal;
  auto unit_rows = [&](long rows) {
    std::vector<double> x(rows * dim);
    for (long r = 0; r < rows; ++r) {
      double norm = 0;
      for (long d = 0; d < dim; ++d) norm += (x[r * dim + d] = normal(rng)) * x[r * dim + d];
      for (long d = 0; d < dim; ++d) x[r * dim + d] /= std::sqrt(norm);
    }
    return x;
  };
  std::vector<double> q = unit_rows(n), key = unit_rows(n), queue = unit_rows(num_keys);
  for (long i = 0; i < n; ++i) {
    for (long d = 0; d < dim; ++d) {
      key[i * dim + d] = 0.5 * key[i * dim + d] + q[i * dim + d];
      queue[(7 * i + 3) % num_keys * dim + d] = q[i * dim + d];
    }
  }
  auto to_device = [&](std::vector<double>& x) {
    Buffer<T> b(x.size(), offset);
    for (size_t i = 0; i < x.size(); ++i) {
      b[i] = from_float<T>(static_cast<float>(x[i]));
      x[i] = value(b[i]);
    }
    return b;
  };
  Buffer<T> q_dev = to_device(q), key_dev = to_device(key), queue_dev = to_device(queue);
  std::vector<float> grad_loss(n);
  std::uniform_real_distribution<float> uniform(0.25f, 1.f);
  for (float& g : grad_loss) g = uniform(rng);

  // float64 reference.
  std::vector<double> logits(n * (num_keys + 1)), lse(n), loss(n), grad_q(n * dim), grad_k(n * dim);
  for (long i = 0; i < n; ++i) {
    double* row = &logits[i * (num_keys + 1)];
    for (long j = 0; j <= num_keys; ++j) {
      const double* other = j == 0 ? &key[i * dim] : &queue[(j - 1) * dim];
      double dot = 0;
      for (long d = 0; d < dim; ++d) dot += q[i * dim + d] * other[d];
      row[j] = dot / temperature;
    }
    const double max = *std::max_element(row, row + num_keys + 1);
    double sum = 0;
    for (long j = 0; j <= num_keys; ++j) sum += std::exp(row[j] - max);
    lse[i] = max + std::log(sum);
    loss[i] = lse[i] - row[0];
    const double coef = grad_loss[i] / temperature;
    for (long d = 0; d < dim; ++d) {
      double g = (std::exp(row[0] - lse[i]) - 1) * key[i * dim + d];
      for (long j = 0; j < num_keys; ++j) g += std::exp(row[1 + j] - lse[i]) * queue[j * dim + d];
      grad_q[i * dim + d] = coef * g;
      grad_k[i * dim + d] = coef * (std::exp(row[0] - lse[i]) - 1) * q[i * dim + d];
    }
  }
  const double grad_scale = *std::max_element(grad_q.begin(), grad_q.end(), [](double a, double b) {
    return std::fabs(a) < std::fabs(b);
  });

  // moco_logits
  std::vector<float> logits_out(n * (num_keys + 1));
  const long tiles = (num_keys + Forward::kKeys - 1) / Forward::kKeys;
  emulation::launch(logits_kernel<Forward, T>, (n + Forward::kRows - 1) / Forward::kRows * tiles,
                    storage_bytes<typename Forward::Storage>(), q_dev.data(), key_dev.data(), queue_dev.data(),
                    int64_t{n}, int64_t{num_keys}, int64_t{dim}, inv_t, int64_t{tiles}, logits_out.data());
  compare("logits", logits_out, logits, 1e-4, 1.0, name, n, num_keys, dim);

  // moco_infonce forward
  const unsigned warp_row_blocks = static_cast<unsigned>((n + kWarps - 1) / kWarps);
  const Plan plan = plan_for<Forward>(n, num_keys, sms);
  std::vector<float> part(2 * plan.splits * n), loss_out(n), lse_out(n);
  emulation::launch(lse_partial_kernel<Forward, T>, plan.blocks(), storage_bytes<typename Forward::Storage>(),
                    q_dev.data(), queue_dev.data(), int64_t{n}, int64_t{num_keys}, int64_t{dim}, inv_t, plan,
                    part.data(), part.data() + plan.splits * n);
  emulation::launch(lse_finalize_kernel<T>, warp_row_blocks, 0, q_dev.data(), key_dev.data(), int64_t{n},
                    int64_t{dim}, inv_t, plan.splits, part.data(), part.data() + plan.splits * n,
                    loss_out.data(), lse_out.data());
  compare("lse", lse_out, lse, 1e-4, 1.0, name, n, num_keys, dim);
  compare("loss", loss_out, loss, 1e-4, 1.0, name, n, num_keys, dim);

  // moco_infonce backward, from the float64 lse rounded to fp32
  const Plan backward = plan_for<Backward>(n, num_keys, sms);
  std::vector<float> lse_in(lse.begin(), lse.end()), part_grad(backward.splits * n * dim);
  std::vector<T> grad_q_out(n * dim), grad_k_out(n * dim);
  emulation::launch(grad_partial_kernel<Backward, T>, backward.blocks(), grad_partial_bytes<Backward>(dim),
                    grad_loss.data(), q_dev.data(), queue_dev.data(), lse_in.data(), int64_t{n},
                    int64_t{num_keys}, int64_t{dim}, inv_t, backward, part_grad.data());
  emulation::launch(grad_finalize_kernel<T>, warp_row_blocks, 0, grad_loss.data(), q_dev.data(), key_dev.data(),
                    lse_in.data(), int64_t{n}, int64_t{dim}, inv_t, backward.splits, part_grad.data(),
                    grad_q_out.data(), grad_k_out.data());
  compare("grad q", grad_q_out, grad_q, Dtype<T>::kTolerance, std::fabs(grad_scale), name, n, num_keys, dim);
  compare("grad k", grad_k_out, grad_k, Dtype<T>::kTolerance, std::fabs(grad_scale), name, n, num_keys, dim);
  std::printf("%s N=%ld K=%ld D=%ld (splits %ld / %ld, offset %zu): OK\n", name, n, num_keys, dim,
              static_cast<long>(plan.splits), static_cast<long>(backward.splits), offset);
}

}  // namespace

// Shared memory per block of each tile kernel (the Storage layout is the device's).
template <typename T>
void print_shared_memory(long dim) {
  using Family = typename Dtype<T>::Family;
  std::printf("%s shared memory per block: forward %zu B, backward %zu B at D = %ld\n", Dtype<T>::kName,
              storage_bytes<typename Family::template Forward<T>::Storage>(),
              grad_partial_bytes<typename Family::template Backward<T>>(dim), dim);
}

int main() {
  std::mt19937 rng(0);
  print_shared_memory<__nv_bfloat16>(256);
  print_shared_memory<float>(256);
  // Tensor-core tiles: 128 x 128 forward, 32 x 64 backward, stages of 64 features.
  // Several row blocks and splits, a partial last key tile, D = 40 (16-byte loads, a
  // partial fragment); D = 100 (element loads, two stages); 16-byte-capable D with
  // misaligned operands; N = K = 1.
  run_case<__nv_bfloat16>(130, 300, 40, 3, 0, rng);
  run_case<__nv_bfloat16>(33, 70, 100, 1, 0, rng);
  run_case<__nv_bfloat16>(20, 65, 24, 2, 1, rng);
  run_case<__nv_bfloat16>(1, 1, 16, 1, 0, rng);
  run_case<__half>(40, 129, 72, 2, 0, rng);
  // FMA tiles (fp32): 64 x 64 forward, 32 x 64 backward, stages of 32 features.
  run_case<float>(70, 130, 40, 3, 0, rng);
  run_case<float>(1, 1, 5, 1, 0, rng);
  std::printf("moco kernels OK\n");
  return 0;
}
