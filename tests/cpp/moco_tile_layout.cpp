// Host check of the tensor-core tile geometry in csrc/cuda/moco_tiles.h (run by
// tests/test_moco_cuda_on_host.py), with the index functions the kernels use:
//   - the warps' fragments cover every score / gradient fragment exactly once,
//   - the staging threads write every staged element exactly once,
//   - every fragment pointer is 32-byte aligned and every ldm a multiple of 16 bytes,
//   - no fragment reads or writes outside its shared-memory array,
//   - the score tile and the gradient accumulation, replayed stage by stage with the
//     documented wmma semantics (row_major: element (i, j) at i * ldm + j; col_major:
//     at i + j * ldm), equal plain loops, with zero padding of rows, keys and features.
// Exits non-zero with a message on the first failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/moco_tiles.h"

namespace {

using astrea::cuda::kFragment;
using astrea::cuda::kThreads;
using astrea::cuda::kWarps;

void check(bool ok, const char* what, long a = 0, long b = 0, long c = 0) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s (%ld, %ld, %ld)\n", what, a, b, c);
    std::exit(1);
  }
}

// A shared-memory array: bounds-checked, with its pitch and element size for the
// alignment checks.
struct Array {
  std::vector<float> data;
  long rows, pitch, element_bytes;
  Array(long rows_, long pitch_, long element_bytes_)
      : data(rows_ * pitch_, NAN), rows(rows_), pitch(pitch_), element_bytes(element_bytes_) {}
  float& at(long r, long c) {
    check(r >= 0 && r < rows && c >= 0 && c < pitch, "element outside its array", r, c, pitch);
    return data[r * pitch + c];
  }
  // The start of a 16 x 16 fragment at (r, c) with leading dimension `pitch`.
  void check_fragment(long r, long c) {
    check(r % kFragment == 0 && c % kFragment == 0, "fragment not on a 16 x 16 grid", r, c);
    check((pitch * element_bytes) % 16 == 0, "ldm not a multiple of 16 bytes", pitch, element_bytes);
    check(((r * pitch + c) * element_bytes) % 32 == 0, "fragment pointer not 32-byte aligned", r, c, pitch);
    at(r + kFragment - 1, c + kFragment - 1);  // the fragment lies inside the array
  }
};

using Fragment = std::vector<float>;  // 16 x 16, element (i, j) at i * 16 + j

// A fragment loaded from the array element (r, c) on: row_major reads element (i, j) at
// i * ldm + j past that pointer, i.e. a.at(r + i, c + j); col_major at i + j * ldm, i.e.
// a.at(r + j, c + i).
Fragment load(Array& a, long r, long c, bool row_major) {
  a.check_fragment(r, c);
  Fragment f(kFragment * kFragment);
  for (int i = 0; i < kFragment; ++i) {
    for (int j = 0; j < kFragment; ++j) f[i * kFragment + j] = row_major ? a.at(r + i, c + j) : a.at(r + j, c + i);
  }
  return f;
}

void store(Array& a, long r, long c, const Fragment& f) {
  a.check_fragment(r, c);
  for (int i = 0; i < kFragment; ++i) {
    for (int j = 0; j < kFragment; ++j) a.at(r + i, c + j) = f[i * kFragment + j];
  }
}

void mma(Fragment& acc, const Fragment& a, const Fragment& b) {
  for (int i = 0; i < kFragment; ++i) {
    for (int j = 0; j < kFragment; ++j) {
      for (int k = 0; k < kFragment; ++k) acc[i * kFragment + j] += a[i * kFragment + k] * b[k * kFragment + j];
    }
  }
}

template <typename L>
void check_coverage() {
  std::vector<int> score_hits((L::kRows / kFragment) * (L::kKeys / kFragment), 0);
  for (int warp = 0; warp < kWarps; ++warp) {
    for (int i = 0; i < L::kFragRows; ++i) {
      for (int j = 0; j < L::kFragCols; ++j) {
        const int r = L::score_row(warp, i), c = L::score_key(warp, j);
        check(r >= 0 && r < L::kRows && c >= 0 && c < L::kKeys, "score fragment outside the tile", warp, i, j);
        ++score_hits[r / kFragment * (L::kKeys / kFragment) + c / kFragment];
      }
    }
  }
  for (int hits : score_hits) check(hits == 1, "a score fragment is not computed exactly once", hits);

  std::vector<int> grad_hits((L::kRows / kFragment) * (L::kDepth / kFragment), 0);
  for (int warp = 0; warp < kWarps; ++warp) {
    for (int f = warp; f < L::kGradFrags; f += kWarps) {
      const int r = L::grad_row(f), c = L::grad_col(f);
      check(r >= 0 && r < L::kRows && c >= 0 && c < L::kDepth, "gradient fragment outside the stage", f);
      ++grad_hits[r / kFragment * (L::kDepth / kFragment) + c / kFragment];
    }
  }
  for (int hits : grad_hits) check(hits == 1, "a gradient fragment is not computed exactly once", hits);

  for (int count : {L::kRows, L::kKeys}) {
    std::vector<int> staged(count * L::kDepth, 0);
    for (int t = 0; t < kThreads; ++t) {
      for (int g = t; g < count * L::kStageGroups; g += kThreads) {
        const int r = L::stage_row(g), c = L::stage_col(g);
        check(r < count && c % L::kVector == 0 && c + L::kVector <= L::kDepth, "staged vector outside the stage", g);
        for (int i = 0; i < L::kVector; ++i) ++staged[r * L::kDepth + c + i];
      }
    }
    for (int hits : staged) check(hits == 1, "a staged element is not written exactly once", hits);
  }
}

// Stage `d0` of rows [first, first + count) of src ([limit, dim] row-major) into dst,
// zero past row `limit` or feature `dim`: the staging of TensorCoreTile::load_stage.
template <typename L>
void load_stage(const std::vector<float>& src, long first, long limit, long d0, long dim, int count, Array& dst) {
  for (int g = 0; g < count * L::kStageGroups; ++g) {
    const int r = L::stage_row(g), c = L::stage_col(g);
    for (int i = 0; i < L::kVector; ++i) {
      const long row = first + r, col = d0 + c + i;
      dst.at(r, c + i) = (row < limit && col < dim) ? src[row * dim + col] : 0.f;
    }
  }
}

// One score tile and one gradient accumulation, replayed with the kernels' loop structure.
template <typename L>
void check_products(long n, long num_keys, long dim, long row0, long key0, std::mt19937& rng) {
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  std::vector<float> q(n * dim), queue(num_keys * dim);
  for (float& v : q) v = uniform(rng);
  for (float& v : queue) v = uniform(rng);
  const float inv_t = 2.5f;
  Array rows(L::kRows, L::kStagePitch, 2), keys(L::kKeys, L::kStagePitch, 2);
  Array scores(L::kRows, L::kScorePitch, 4), probs(L::kRows, L::kProbPitch, 2);

  std::vector<std::vector<Fragment>> acc(kWarps, std::vector<Fragment>(L::kFragRows * L::kFragCols,
                                                                      Fragment(kFragment * kFragment, 0.f)));
  for (long d0 = 0; d0 < dim; d0 += L::kDepth) {
    load_stage<L>(q, row0, n, d0, dim, L::kRows, rows);
    load_stage<L>(queue, key0, num_keys, d0, dim, L::kKeys, keys);
    for (int k = 0; k < L::kDepth; k += kFragment) {
      if (d0 + k >= dim) break;
      for (int warp = 0; warp < kWarps; ++warp) {
        for (int i = 0; i < L::kFragRows; ++i) {
          const Fragment a = load(rows, L::score_row(warp, i), k, true);
          for (int j = 0; j < L::kFragCols; ++j) {
            // matrix_b col_major at &keys[score_key][k]: (feature kk, key jj) at kk + jj * ldm.
            const Fragment b = load(keys, L::score_key(warp, j), k, false);
            mma(acc[warp][i * L::kFragCols + j], a, b);
          }
        }
      }
    }
  }
  for (int warp = 0; warp < kWarps; ++warp) {
    for (int i = 0; i < L::kFragRows; ++i) {
      for (int j = 0; j < L::kFragCols; ++j) {
        Fragment f = acc[warp][i * L::kFragCols + j];
        for (float& v : f) v *= inv_t;
        store(scores, L::score_row(warp, i), L::score_key(warp, j), f);
      }
    }
  }
  for (int r = 0; r < L::kRows; ++r) {
    for (int c = 0; c < L::kKeys; ++c) {
      double expected = 0;
      const long row = row0 + r, key = key0 + c;
      if (row < n && key < num_keys) {
        for (long d = 0; d < dim; ++d) expected += double(q[row * dim + d]) * queue[key * dim + d];
      }
      expected *= inv_t;
      check(std::fabs(scores.at(r, c) - expected) <= 1e-4 * (1 + std::fabs(expected)), "score differs", r, c, dim);
    }
  }

  // Gradient: grad[r][d] += sum_c p[r][c] * queue[key0 + c][d], p zero past the last key.
  const long count = std::min<long>(L::kKeys, num_keys - key0);
  const long pitch = L::grad_pitch(dim);
  check(pitch % 4 == 0 && pitch >= dim, "gradient pitch", pitch, dim);
  Array grad(L::kRows, pitch, 4);
  std::vector<float> p(L::kRows * L::kKeys);
  for (int r = 0; r < L::kRows; ++r) {
    for (int c = 0; c < L::kKeys; ++c) p[r * L::kKeys + c] = c < count ? uniform(rng) : 0.f;
    for (long d = 0; d < pitch; ++d) grad.at(r, d) = d < dim ? uniform(rng) : 0.f;
  }
  const std::vector<float> grad_before = grad.data;
  for (int r = 0; r < L::kRows; ++r) {
    for (int c = 0; c < L::kKeys; ++c) probs.at(r, c) = p[r * L::kKeys + c];
  }
  for (long d0 = 0; d0 < dim; d0 += L::kDepth) {
    load_stage<L>(queue, key0, num_keys, d0, dim, L::kKeys, keys);
    for (int warp = 0; warp < kWarps; ++warp) {
      for (int f = warp; f < L::kGradFrags; f += kWarps) {
        const long col = d0 + L::grad_col(f);
        if (col >= dim) continue;
        Fragment out = load(grad, L::grad_row(f), col, true);
        for (int c = 0; c < L::kKeys; c += kFragment) {
          if (c >= count) break;
          mma(out, load(probs, L::grad_row(f), c, true), load(keys, c, L::grad_col(f), true));
        }
        store(grad, L::grad_row(f), col, out);
      }
    }
  }
  for (int r = 0; r < L::kRows; ++r) {
    for (long d = 0; d < dim; ++d) {
      double expected = grad_before[r * pitch + d];
      for (long c = 0; c < count; ++c) expected += double(p[r * L::kKeys + c]) * queue[(key0 + c) * dim + d];
      check(std::fabs(grad.at(r, d) - expected) <= 1e-4 * (1 + std::fabs(expected)), "gradient differs", r, d, dim);
    }
  }
}

template <typename L>
void check_layout(std::mt19937& rng) {
  check_coverage<L>();
  // (n, num_keys, dim, row0, key0): full tiles, partial last row block / key tile, dims
  // below one fragment, between fragments and stages, and several stages.
  const long cases[][5] = {
      {L::kRows, L::kKeys, 64, 0, 0},
      {L::kRows + 5, 2 * L::kKeys + 7, 19, L::kRows, 2 * L::kKeys},
      {3, 1, 1, 0, 0},
      {2 * L::kRows, 3 * L::kKeys, 200, L::kRows, L::kKeys},
      {L::kRows - 1, L::kKeys + 1, 72, 0, L::kKeys},
      {7, 5, 130, 0, 0},
  };
  for (const auto& c : cases) check_products<L>(c[0], c[1], c[2], c[3], c[4], rng);
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  check_layout<astrea::cuda::ForwardTensorCoreLayout>(rng);
  check_layout<astrea::cuda::BackwardTensorCoreLayout>(rng);
  std::printf("moco tile layouts OK\n");
  return 0;
}
