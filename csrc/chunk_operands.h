// How one call of the fused thin-chunk kernel (linear_logprobs_chunk.cpp) lays out its operands before the block
// loop: scaled_hidden in packed strips ((a) on AVX-512 / AVX2), next_hidden transposed ((c)), the AMX panels ((a)'s
// and (c)'s B operands), and the vocabulary lines per block. x86-64 only (included under FASTALIGN_X86_SIMD).
#pragma once

#include "chunk_amx.h"
#include "chunk_layout.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace fastalign_chunk {

// [rows, H] -> [strips][rows][48], zeros past H (one pass: a narrow/copy per strip cost more than the copy)
inline at::Tensor pack_strips(const at::Tensor& x) {
  const int64_t rows = x.size(0), H = x.size(1), strips = (H + kStrip - 1) / kStrip;
  at::Tensor out = at::empty({strips, rows, kStrip}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t st = 0; st < strips; ++st) {
    const int64_t w = std::min(kStrip, H - st * kStrip);
    for (int64_t r = 0; r < rows; ++r) {
      float* d = dst + (st * rows + r) * kStrip;
      std::copy(src + r * H + st * kStrip, src + r * H + st * kStrip + w, d);
      std::fill(d + w, d + kStrip, 0.0f);
    }
  }
  return out;
}

// next_hidden [Cn, H] -> its transpose [H, ld], zeros past Cn (the threads take ranges of H)
inline at::Tensor transposed_padded(const at::Tensor& x, int64_t ld) {
  const int64_t Cn = x.size(0), H = x.size(1);
  at::Tensor out = at::empty({H, ld}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, H, 64, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t r = 0; r < Cn; ++r) dst[k * ld + r] = src[r * H + k];
      std::fill(dst + k * ld + Cn, dst + (k + 1) * ld, 0.0f);
    }
  });
  return out;
}

// Vocabulary lines per block: about `floats` floats of W (lines = floats / H), a multiple of the tiles' lines.
// AVX-512: about 192 KB of W (48 lines at H=1024, 96 at H=512), which stay in L2 from (b) to (c), a multiple of 24 (8
// and 6, the AVX-512 tiles' lines); longer blocks let (b) load and store its P^T accumulators less often. With AMX
// (for (a) or (c)) about 96 KB, a multiple of 48 (its 16-line tiles; 24-line blocks would leave 8 of each to
// AVX-512): 48 lines at H=512 and at H=1024. Measured on two CPUs, two threads, one 64-row chunk's three parts (ad
// hoc, medians of interleaved rounds):
// - AMD EPYC Zen 4 (2026-12-07): 174 / 185 / 185 / 186 GFLOP/s with 24 / 48 / 72 / 96-line blocks at H=1024 (170 /
//   179 at 32 rows, 178 / 183 at 128; 175 / 179 at H=512), and the whole step at N=2048 H=1024 1.11x / 1.01x the
//   3-GEMM floor with 24 / 48 lines (bench, paired).
// - Intel Xeon with AMX, AMX off (2026-12-07, 12 rounds, paired): 48 and 72 lines took 0.976x and 0.986x the time of
//   24 at H=1024; 48 and 96 took 0.992x and 0.984x at H=512. With AMX, 96 lines took 1.03x (H=512) and 1.30x
//   (H=1024) the time of 48.
// AVX2: blocks of about 576 KB of W (144 lines at H=1024, 192 at H=512): (b)'s narrower tiles load and store their
// P^T accumulators once per block, and longer blocks pay that less often. On a 2-core AMD EPYC (Zen 3, 2026-12-07, ad
// hoc, one 64-row chunk at H=1024): 127 GFLOP/s with 24-line blocks, 140-143 with 96-192, 116-121 with 288; at H=512,
// the whole step 1.19x the 3-GEMM floor with 48 lines, 1.13x with 192. The Xeon above, AVX2 tiles (8 rounds, paired):
// 48 / 96 / 192 lines took 0.975x / 0.957x / 1.044x the time of 144 at H=1024, and 96 took 0.979x that of 192 at
// H=512: within its noise, so unchanged.
inline int64_t block_lines(int64_t H, bool amx, bool wide) {
  const int64_t unit = amx ? 48 : 24, floats = !wide ? 147456 : amx ? 24576 : 49152;
  return std::max<int64_t>(unit, std::min<int64_t>(192, (floats / H) / unit * unit));
}

// A B panel for AMX (chunk_amx.h's pack_b_rows), its three bf16 parts: src [rows_k, N] fp32 (lines of ld_src
// floats), N a multiple of 16. The threads take ranges of 16-column tiles: each tile's panel is contiguous.
struct AmxPanel {
  at::Tensor storage;
  uint16_t* parts[3] = {nullptr, nullptr, nullptr};

  void pack(const float* src, int64_t ld_src, int64_t rows_k, int64_t N, bool k_halves, const at::TensorOptions& opt) {
    const int64_t kts = (rows_k + 31) / 32;
    storage = at::empty({3, kts * 32 * N}, opt.dtype(at::kShort));
    uint16_t* panel = reinterpret_cast<uint16_t*>(storage.data_ptr<int16_t>());
    for (int s = 0; s < 3; ++s) parts[s] = panel + s * kts * 32 * N;
    at::parallel_for(0, N / 16, 1, [&](int64_t t0, int64_t t1) {
      uint16_t* tile_parts[3];
      for (int s = 0; s < 3; ++s) tile_parts[s] = parts[s] + t0 * kts * 512;
      fastalign_amx::pack_b_rows(src + t0 * 16, ld_src, rows_k, (t1 - t0) * 16, tile_parts, k_halves);
    });
  }
};

}  // namespace fastalign_chunk
