// Nearest-neighbour counting on CPU (the clone-robust weights' heavy part): for every group, num_samples
// uniform points of the group's box, each assigned to its nearest alternative; counts per alternative.
//
// Threading (DESIGN.md's CPU rule): one at::parallel_for over blocks of samples; each task generates its
// samples, then computes scores |x|^2 - 2 s.x with a hand-written, register-blocked inner product (no BLAS
// call inside the parallel region), keeps a running (min, argmin) per sample and counts into its thread's
// own counts row; the rows are summed once at the end. No [samples x alternatives] matrix is ever stored.
//
// The sample generator is the counter-based hash documented in fastalign/backends/nn_count_torch.py; the
// same bits come out of the torch and Triton backends.
#include "fastalign.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int kRows = 6;    // samples per micro-tile: 6 x 2 accumulator vectors + 2 loads + 1 broadcast fit 16 regs
constexpr int kCols = 16;   // alternatives per micro-tile: two 8-float vectors

// 8 floats; GCC lowers it to one AVX register (haswell clone) or two SSE registers (default clone).
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned loads

inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

inline float uniform(uint32_t index, uint32_t key) {
  uint32_t v = hash32(hash32(index ^ key) + key);
  return static_cast<float>((v >> 8) | 1u) * 5.9604644775390625e-08f;  // 2^-24
}

// acc[r][c] = sum_k s[r][k] * xt[k][c] for one micro-tile; s rows have stride d, xt rows stride ld.
// Compiled twice (AVX2+FMA and the baseline, see kMicroTile below): the build uses no -march flag.
template <bool kAvx2>
__attribute__((always_inline)) inline void micro_tile_body(const float* s, int64_t d, const float* xt, int64_t ld, const float* sq, float* best,
                int64_t* best_idx, int64_t first_idx) {
  v8 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = v8{};
  for (int64_t k = 0; k < d; ++k) {
    const v8 x0 = *reinterpret_cast<const v8u*>(xt + k * ld);
    const v8 x1 = *reinterpret_cast<const v8u*>(xt + k * ld + 8);
    for (int r = 0; r < kRows; ++r) {
      const float sk = s[r * d + k];
      acc[r][0] += sk * x0;
      acc[r][1] += sk * x1;
    }
  }
  for (int r = 0; r < kRows; ++r) {
    float dots[kCols];
    __builtin_memcpy(dots, acc[r], sizeof(dots));
    for (int c = 0; c < kCols; ++c) {
      const float score = sq[c] - 2.0f * dots[c];
      if (score < best[r]) {  // strict: the first index wins ties, as in torch.argmin
        best[r] = score;
        best_idx[r] = first_idx + c;
      }
    }
  }
}

using MicroTile = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t*, int64_t);

__attribute__((target("avx2,fma"))) void micro_tile_avx2(const float* s, int64_t d, const float* xt, int64_t ld,
                                                         const float* sq, float* best, int64_t* best_idx,
                                                         int64_t first_idx) {
  micro_tile_body<true>(s, d, xt, ld, sq, best, best_idx, first_idx);
}

void micro_tile_default(const float* s, int64_t d, const float* xt, int64_t ld, const float* sq, float* best,
                        int64_t* best_idx, int64_t first_idx) {
  micro_tile_body<false>(s, d, xt, ld, sq, best, best_idx, first_idx);
}

// Chosen by CPU features, not CPU model (GCC's target_clones("arch=haswell") would skip AMD CPUs with AVX2).
const MicroTile kMicroTile = (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? micro_tile_avx2
                                                                                                : micro_tile_default;

}  // namespace

at::Tensor nn_count(const at::Tensor& points_in, const at::Tensor& sq_norms_in, const at::Tensor& group_start_in,
                    const at::Tensor& keys_in, const at::Tensor& width_in, int64_t num_samples,
                    int64_t block_samples, int64_t block_alternatives) {
  TORCH_CHECK(points_in.dim() == 2 && points_in.scalar_type() == at::kFloat, "nn_count: points must be fp32 [M, d]");
  TORCH_CHECK(num_samples >= 1 && num_samples <= INT32_MAX, "nn_count: num_samples out of range");
  TORCH_CHECK(block_samples >= kRows && block_samples % kRows == 0, "nn_count: block_samples must be a multiple of ",
              kRows);
  TORCH_CHECK(block_alternatives >= kCols && block_alternatives % kCols == 0,
              "nn_count: block_alternatives must be a multiple of ", kCols);
  const at::Tensor points = points_in.contiguous();
  const at::Tensor sq_norms = sq_norms_in.to(at::kFloat).contiguous();
  const at::Tensor group_start = group_start_in.to(at::kLong).contiguous();
  const at::Tensor keys = keys_in.to(at::kInt).contiguous();
  const at::Tensor width = width_in.to(at::kFloat).contiguous();
  const int64_t m_total = points.size(0), d = points.size(1), n_groups = group_start.numel() - 1;
  TORCH_CHECK(sq_norms.numel() == m_total && keys.numel() == n_groups * d && width.numel() == n_groups * d,
              "nn_count: sq_norms [M], keys [G, d] and width [G, d] must match points [M, d] and group_start [G+1]");

  const float* x = points.data_ptr<float>();
  const float* sq = sq_norms.data_ptr<float>();
  const int64_t* start = group_start.data_ptr<int64_t>();
  const uint32_t* key = reinterpret_cast<const uint32_t*>(keys.data_ptr<int32_t>());
  const float* wid = width.data_ptr<float>();

  const int64_t blocks_per_group = (num_samples + block_samples - 1) / block_samples;
  const int64_t n_blocks = n_groups * blocks_per_group;
  const int n_threads = at::get_num_threads();
  std::vector<int64_t> thread_counts(static_cast<size_t>(n_threads) * m_total, 0);

  at::parallel_for(0, n_blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    int64_t* counts = thread_counts.data() + static_cast<size_t>(at::get_thread_num()) * m_total;
    std::vector<float> samples(block_samples * d), packed(d * block_alternatives), packed_sq(block_alternatives);
    std::vector<float> best(block_samples);
    std::vector<int64_t> best_idx(block_samples);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t g = b / blocks_per_group;
      const int64_t i0 = (b % blocks_per_group) * block_samples;
      const int64_t rows = std::min(block_samples, num_samples - i0);
      const int64_t m_lo = start[g], m_hi = start[g + 1];
      for (int64_t r = 0; r < block_samples; ++r) {  // rows past num_samples are generated but never counted
        const uint32_t index = static_cast<uint32_t>(i0 + r);
        for (int64_t k = 0; k < d; ++k)
          samples[r * d + k] = (uniform(index, key[g * d + k]) - 0.5f) * wid[g * d + k];
      }
      std::fill(best.begin(), best.end(), std::numeric_limits<float>::infinity());
      std::fill(best_idx.begin(), best_idx.end(), m_lo);
      for (int64_t m0 = m_lo; m0 < m_hi; m0 += block_alternatives) {
        // pack this block of alternatives transposed [d, block] (zeros and +inf norms past the group's end)
        const int64_t cols = std::min(block_alternatives, m_hi - m0);
        const int64_t padded = (cols + kCols - 1) / kCols * kCols;
        for (int64_t c = 0; c < padded; ++c) {
          const bool real = c < cols;
          packed_sq[c] = real ? sq[m0 + c] : std::numeric_limits<float>::infinity();
          for (int64_t k = 0; k < d; ++k) packed[k * block_alternatives + c] = real ? x[(m0 + c) * d + k] : 0.0f;
        }
        for (int64_t r = 0; r < block_samples; r += kRows) {
          for (int64_t c = 0; c < padded; c += kCols) {
            kMicroTile(samples.data() + r * d, d, packed.data() + c, block_alternatives, packed_sq.data() + c,
                       best.data() + r, best_idx.data() + r, m0 + c);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) counts[best_idx[r]] += 1;
    }
  });

  at::Tensor out = at::zeros({m_total}, points.options().dtype(at::kLong));
  int64_t* total = out.data_ptr<int64_t>();
  for (int t = 0; t < n_threads; ++t)
    for (int64_t m = 0; m < m_total; ++m) total[m] += thread_counts[static_cast<size_t>(t) * m_total + m];
  return out;
}
