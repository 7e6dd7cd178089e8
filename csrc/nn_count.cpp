// Nearest-neighbour counting on CPU (the clone-robust weights' heavy part): for every group, num_samples
// uniform points of the group's box, each assigned to its nearest alternative; counts per alternative.
//
// Threading (DESIGN.md's CPU rule): the alternatives of large groups are packed once, then one at::parallel_for
// runs over blocks of samples. Each task generates its samples, packs a small group's alternatives itself, computes scores |x|^2 - 2 s.x with a hand-written,
// register-blocked inner product (no BLAS call inside the parallel region; AVX-512, AVX2 or baseline code,
// chosen at run time by the CPU's features), keeps a running (min, argmin) per sample and lane, and counts into
// its thread's own counts row; the rows are summed once at the end. No [samples x alternatives] matrix is stored.
//
// The sample generator is the counter-based hash documented in fastalign/backends/nn_count_torch.py; the
// same bits come out of the torch and Triton backends.
#include "fastalign.h"

#include "arch.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace {

// Micro-tile shapes: R samples x (2 vectors of W floats) alternatives, accumulators in registers.
//   AVX-512: W = 16, 12 rows: 24 accumulators + 2 loads of the 32 registers (broadcasts are folded into the FMAs).
//   AVX2: W = 8, 6 rows: 12 accumulators + 2 loads + 1 broadcast of the 16 registers.
//   Baseline (SSE2 on x86-64, no FMA; NEON on aarch64, where GCC fuses the multiply-adds): W = 4, 6 rows: 12
//   accumulators of the 16 registers.
// Each lane keeps its own running (min, argmin) in memory across the alternatives of a block (vector compare and
// select, no scalar loop per score); a row's lanes are reduced once per block (see reduce_lanes).
constexpr int kMaxTileCols = 32;  // the widest micro-tile (AVX-512); block_alternatives is a multiple of it
constexpr int kMaxTileRows = 12;  // the tallest (AVX-512); every tile's rows divide it, block_samples is a multiple

struct Avx512Tile {
  typedef float vf __attribute__((vector_size(64), aligned(4)));
  typedef int32_t vi __attribute__((vector_size(64), aligned(4)));
  static constexpr int W = 16, R = 12;
};
struct Avx2Tile {
  typedef float vf __attribute__((vector_size(32), aligned(4)));
  typedef int32_t vi __attribute__((vector_size(32), aligned(4)));
  static constexpr int W = 8, R = 6;
};
struct SseTile {
  typedef float vf __attribute__((vector_size(16), aligned(4)));
  typedef int32_t vi __attribute__((vector_size(16), aligned(4)));
  static constexpr int W = 4, R = 6;
};
static_assert(Avx512Tile::R == kMaxTileRows && kMaxTileRows % Avx2Tile::R == 0 && kMaxTileRows % SseTile::R == 0,
              "block_samples, a multiple of kMaxTileRows, must hold whole micro-tiles of every kind");

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

// One micro-tile: scores sq[c] - 2 s[r].xt[:, c] for T::R samples (rows of s, stride d) and 2 T::W alternatives
// (columns of xt, stride ld), folded into the per-lane running minima best / best_idx [T::R][best_ld] (lanes
// 0 .. 2 T::W - 1 of each row: a narrower tile uses fewer of the row's kMaxTileCols lanes). Strict <:
// within a lane the first (lowest) index wins ties, and reduce_lanes keeps the lowest index among equal lanes,
// so ties resolve as torch.argmin's do. Every score is the same k-ordered sum on every clone, fused
// multiply-adds on AVX2 and AVX-512, separate multiplies and adds on the x86-64 baseline (which may therefore
// resolve a near-tie differently, as any two BLAS builds may; on aarch64 GCC fuses them).
template <class T>
__attribute__((always_inline)) inline void micro_tile_body(const float* s, int64_t d, const float* xt, int64_t ld,
                                                           const float* sq, float* best, int32_t* best_idx,
                                                           int32_t first_idx, int64_t best_ld) {
  typedef typename T::vf vf;
  typedef typename T::vi vi;
  constexpr int W = T::W, R = T::R;
  vf acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vf{};
  for (int64_t k = 0; k < d; ++k) {
    const vf x0 = *reinterpret_cast<const vf*>(xt + k * ld);
    const vf x1 = *reinterpret_cast<const vf*>(xt + k * ld + W);
    for (int r = 0; r < R; ++r) {
      const float sk = s[r * d + k];
      acc[r][0] += sk * x0;
      acc[r][1] += sk * x1;
    }
  }
  vi lane;
  for (int i = 0; i < W; ++i) lane[i] = i;
  for (int j = 0; j < 2; ++j) {
    const vf sqj = *reinterpret_cast<const vf*>(sq + j * W);
    const vi idx = lane + (first_idx + j * W);
    for (int r = 0; r < R; ++r) {
      vf* b = reinterpret_cast<vf*>(best + r * best_ld + j * W);
      vi* bi = reinterpret_cast<vi*>(best_idx + r * best_ld + j * W);
      const vf score = sqj - 2.0f * acc[r][j];
      const vi better = score < *b;
      *b = better ? score : *b;
      *bi = better ? idx : *bi;
    }
  }
}

using MicroTile = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int32_t*, int32_t,
                           int64_t);
#define FASTALIGN_MICRO_TILE(NAME, TARGET, TILE)                                                                   \
  TARGET void NAME(const float* s, int64_t d, const float* xt, int64_t ld, const float* sq, float* best,         \
                   int32_t* best_idx, int32_t first_idx, int64_t best_ld) {                                      \
    micro_tile_body<TILE>(s, d, xt, ld, sq, best, best_idx, first_idx, best_ld);                                  \
  }
#ifdef FASTALIGN_X86_SIMD
FASTALIGN_MICRO_TILE(micro_tile_avx512, __attribute__((target("avx512f,avx2,fma"))), Avx512Tile)
FASTALIGN_MICRO_TILE(micro_tile_avx2, __attribute__((target("avx2,fma"))), Avx2Tile)
FASTALIGN_MICRO_TILE(micro_tile_fma128, __attribute__((target("avx2,fma"))), SseTile)  // 8 columns, with FMA
#endif
FASTALIGN_MICRO_TILE(micro_tile_sse, , SseTile)  // portable: 16-byte GCC vectors (SSE2 on x86-64, NEON on aarch64)
#undef FASTALIGN_MICRO_TILE

struct Tile {
  MicroTile fn;
  int rows, cols;  // samples x alternatives
};

// One instruction set's tiles: the widest for full panels, narrower ones for a group's last few alternatives
// (a prompt's 2-4 answers would otherwise fill a 32-column tile with padding). The three compute every score
// with the same operations in the same order, so which one scores an alternative changes no result.
struct Kernel {
  const char* name;
  Tile wide, mid, narrow;  // at most 32, 16 and 8 columns; rows divide wide.rows
};

// The narrowest of a kernel's tiles that covers `left` alternatives (all of a wide tile when more are left): a
// panel's tiles, and so the lanes a group's minima use.
inline const Tile& tile_for(const Kernel& kernel, int64_t left) {
  return left > 16 ? kernel.wide : (left > 8 ? kernel.mid : kernel.narrow);
}

// Chosen by CPU features, not CPU model (GCC's target_clones("arch=haswell") would skip AMD CPUs with AVX2);
// __builtin_cpu_supports also checks that the OS saves the wide registers. Widest first.
std::vector<Kernel> supported_kernels() {
  std::vector<Kernel> out;
#ifdef FASTALIGN_X86_SIMD
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const Tile avx2_tile{micro_tile_avx2, Avx2Tile::R, 2 * Avx2Tile::W};
  const Tile fma128_tile{micro_tile_fma128, SseTile::R, 2 * SseTile::W};
  if (avx2 && cpu_isa_cap() >= 3 && __builtin_cpu_supports("avx512f"))
    out.push_back({"avx512", {micro_tile_avx512, Avx512Tile::R, 2 * Avx512Tile::W}, avx2_tile, fma128_tile});
  if (avx2) out.push_back({"avx2", avx2_tile, avx2_tile, fma128_tile});
#endif
  const Tile sse_tile{micro_tile_sse, SseTile::R, 2 * SseTile::W};
  out.push_back({"baseline", sse_tile, sse_tile, sse_tile});
  return out;
}

Kernel pick_kernel(const std::string& name) {
  const std::vector<Kernel> kernels = supported_kernels();
  if (name == "auto") return kernels.front();
  std::string names;
  for (const Kernel& k : kernels) {
    if (name == k.name) return k;
    names += names.empty() ? k.name : std::string(", ") + k.name;
  }
  TORCH_CHECK(false, "nn_count: kernel '", name, "' is not supported on this CPU; supported: auto, ", names);
}

// The nearest alternative of one sample from its lanes' minima: the lowest score, the lowest index among equal ones.
inline int32_t reduce_lanes(const float* best, const int32_t* best_idx, int lanes) {
  float v = best[0];
  int32_t i = best_idx[0];
  for (int l = 1; l < lanes; ++l)
    if (best[l] < v || (best[l] == v && best_idx[l] < i)) v = best[l], i = best_idx[l];
  return i;
}

}  // namespace

at::Tensor nn_count(const at::Tensor& points_in, const at::Tensor& sq_norms_in, const at::Tensor& group_start_in,
                    const at::Tensor& keys_in, const at::Tensor& width_in, int64_t num_samples,
                    int64_t block_samples, int64_t block_alternatives, const std::string& kernel_name) {
  TORCH_CHECK(points_in.dim() == 2 && points_in.scalar_type() == at::kFloat, "nn_count: points must be fp32 [M, d]");
  TORCH_CHECK(num_samples >= 1 && num_samples <= INT32_MAX, "nn_count: num_samples out of range");
  const Kernel kernel = pick_kernel(kernel_name);
  TORCH_CHECK(block_samples >= kMaxTileRows && block_samples % kMaxTileRows == 0,
              "nn_count: block_samples must be a multiple of ", kMaxTileRows, " (every micro-tile's rows)");
  TORCH_CHECK(block_alternatives >= kMaxTileCols && block_alternatives % kMaxTileCols == 0,
              "nn_count: block_alternatives must be a multiple of ", kMaxTileCols);
  TORCH_CHECK(points_in.size(0) + kMaxTileCols <= INT32_MAX, "nn_count: at most 2^31 - 33 alternatives");
  TORCH_CHECK(group_start_in.dim() == 1 && group_start_in.numel() >= 1, "nn_count: group_start must be [G+1]");
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
  TORCH_CHECK(start[0] == 0 && start[n_groups] == m_total, "nn_count: group_start must run from 0 to M = ", m_total,
              ", got ", start[0], " to ", start[n_groups]);
  for (int64_t g = 0; g < n_groups; ++g)
    TORCH_CHECK(start[g] <= start[g + 1], "nn_count: group_start must not decrease (group ", g, ")");
  const uint32_t* key = reinterpret_cast<const uint32_t*>(keys.data_ptr<int32_t>());
  const float* wid = width.data_ptr<float>();

  // Alternatives in panels of kMaxTileCols columns: a panel holds [d][kMaxTileCols] floats (transposed: a
  // micro-tile reads a row of it per k), zeros and +inf norms past its group's end. A group larger than one
  // cache block (block_alternatives) is packed once, here, before the parallel region: together about M x d
  // floats, like the points. A smaller group (clone-robust groups are a prompt's few answers) is packed by each
  // task for each block of samples into the task's own buffer, so no group is padded in memory beyond a panel
  // per task; the packing costs ~1/block_samples of the block's work.
  const int64_t panels_per_block = block_alternatives / kMaxTileCols;
  const int64_t panel_floats = d * kMaxTileCols;
  auto n_panels = [&](int64_t g) { return (start[g + 1] - start[g] + kMaxTileCols - 1) / kMaxTileCols; };
  auto packed_once = [&](int64_t g) { return n_panels(g) > panels_per_block; };
  std::vector<int64_t> first_panel(n_groups + 1, 0);
  for (int64_t g = 0; g < n_groups; ++g) first_panel[g + 1] = first_panel[g] + (packed_once(g) ? n_panels(g) : 0);
  std::vector<float> panels(static_cast<size_t>(first_panel[n_groups]) * panel_floats);
  std::vector<float> panel_sq(static_cast<size_t>(first_panel[n_groups]) * kMaxTileCols);
  auto pack = [&](int64_t m0, int64_t m_end, float* panel, float* psq) {  // one panel from alternative m0 on
    for (int64_t c = 0; c < kMaxTileCols; ++c) {
      const bool real = m0 + c < m_end;
      psq[c] = real ? sq[m0 + c] : std::numeric_limits<float>::infinity();
      for (int64_t k = 0; k < d; ++k) panel[k * kMaxTileCols + c] = real ? x[(m0 + c) * d + k] : 0.0f;
    }
  };
  at::parallel_for(0, first_panel[n_groups], 16, [&](int64_t p_begin, int64_t p_end) {
    for (int64_t p = p_begin; p < p_end; ++p) {
      const int64_t g = std::upper_bound(first_panel.begin(), first_panel.end(), p) - first_panel.begin() - 1;
      pack(start[g] + (p - first_panel[g]) * kMaxTileCols, start[g + 1], panels.data() + p * panel_floats,
           panel_sq.data() + p * kMaxTileCols);
    }
  });

  const int64_t blocks_per_group = (num_samples + block_samples - 1) / block_samples;
  const int64_t n_blocks = n_groups * blocks_per_group;
  const int n_threads = at::get_num_threads();
  std::vector<int64_t> thread_counts(static_cast<size_t>(n_threads) * m_total, 0);

  at::parallel_for(0, n_blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    int64_t* counts = thread_counts.data() + static_cast<size_t>(at::get_thread_num()) * m_total;
    std::vector<float> samples(block_samples * d);
    std::vector<float> own_panels(panels_per_block * panel_floats), own_sq(panels_per_block * kMaxTileCols);
    const int lanes = kMaxTileCols;  // per-lane running minima, [block_samples][lanes]
    std::vector<float> best(block_samples * lanes);
    std::vector<int32_t> best_idx(block_samples * lanes);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t g = b / blocks_per_group;
      const int64_t i0 = (b % blocks_per_group) * block_samples;
      const int64_t rows = std::min(block_samples, num_samples - i0);
      if (start[g] == start[g + 1]) continue;  // an empty group: no alternative to count
      for (int64_t r = 0; r < block_samples; ++r) {  // rows past num_samples are generated but never counted
        const uint32_t index = static_cast<uint32_t>(i0 + r);
        for (int64_t k = 0; k < d; ++k)
          samples[r * d + k] = (uniform(index, key[g * d + k]) - 0.5f) * wid[g * d + k];
      }
      // the lanes this group's tiles use (a 2-answer group: the narrow tile's 8), filled and reduced, no more
      const int used = tile_for(kernel, start[g + 1] - start[g]).cols;
      for (int64_t r = 0; r < block_samples; ++r) {
        std::fill_n(best.data() + r * lanes, used, std::numeric_limits<float>::infinity());
        std::fill_n(best_idx.data() + r * lanes, used, static_cast<int32_t>(start[g]));
      }
      const float* group_panels = panels.data() + first_panel[g] * panel_floats;
      const float* group_sq = panel_sq.data() + first_panel[g] * kMaxTileCols;
      if (!packed_once(g)) {
        for (int64_t p = 0; p < n_panels(g); ++p)
          pack(start[g] + p * kMaxTileCols, start[g + 1], own_panels.data() + p * panel_floats,
               own_sq.data() + p * kMaxTileCols);
        group_panels = own_panels.data();
        group_sq = own_sq.data();
      }
      for (int64_t p0 = 0; p0 < n_panels(g); p0 += panels_per_block) {
        const int64_t p1 = std::min(p0 + panels_per_block, n_panels(g));
        for (int64_t r = 0; r < block_samples; r += kernel.wide.rows) {
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t m0 = start[g] + p * kMaxTileCols;
            const int64_t real = std::min<int64_t>(kMaxTileCols, start[g + 1] - m0);  // alternatives in the panel
            for (int c = 0; c < real;) {  // the narrowest tile that covers what is left, no all-padding tile
              const Tile& t = tile_for(kernel, real - c);
              for (int rr = 0; rr < kernel.wide.rows; rr += t.rows)
                t.fn(samples.data() + (r + rr) * d, d, group_panels + p * panel_floats + c, kMaxTileCols,
                     group_sq + p * kMaxTileCols + c, best.data() + (r + rr) * lanes,
                     best_idx.data() + (r + rr) * lanes, static_cast<int32_t>(m0 + c), lanes);
              c += t.cols;
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        counts[reduce_lanes(best.data() + r * lanes, best_idx.data() + r * lanes, used)] += 1;
    }
  });

  at::Tensor out = at::zeros({m_total}, points.options().dtype(at::kLong));
  int64_t* total = out.data_ptr<int64_t>();
  for (int t = 0; t < n_threads; ++t)
    for (int64_t m = 0; m < m_total; ++m) total[m] += thread_counts[static_cast<size_t>(t) * m_total + m];
  return out;
}

std::vector<std::string> nn_count_kernels() {
  std::vector<std::string> names;
  for (const Kernel& k : supported_kernels()) names.push_back(k.name);
  return names;
}
