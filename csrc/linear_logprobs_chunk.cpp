// The GEMM work of one chunk of the gradient-in-forward loss path (fastalign/chunk_pass_fused.py), fp32, in one
// pass over the vocabulary, for thin chunks (C <= 128 rows), where three BLAS calls per chunk lose speed: each
// streams all of W or d_W from memory again for only C rows of work (2-core Xeon, N=2048 H=1024 V=32000, 64 rows,
// forward+backward of the NLL: 1.60x the three unchunked GEMMs' time with BLAS chunks, 1.21x with this kernel;
// bench/results/linear_logprobs-goal-thin-cpu-2026-12-03.json).
//
//   chunk_gemms_(tile [V, ld] (the whole buffer), rows C, scaled_hidden [C, H] | None, d_weight [V, H] | None,
//                first, need_p, next_hidden [Cn, H] | None, bias [V] | None, alpha) -> P [C, H] (need_p) | [0, H]
//
// For each block of block_v vocabulary lines b, in this order (the tile holds E = exp(l - shift) in its first C
// columns on entry):
//   (a) d_weight_b (+)= E_b scaled_hidden      [block_v, H], K = C        (written when first, else added to)
//   (b) P_thread  +=    E_b^T W_b              [C, H],       K = block_v  (per-thread, summed at the end)
//   (c) tile_b     =    alpha W_b next_hidden^T + bias_b   [block_v, ld], K = H: the next chunk's logits, written
//       over E_b, which (a) and (b) have consumed; columns >= Cn are 0 (the padding stays zero, see
//       chunk_pass.padded_buffer), the bias goes to columns < Cn only.
// So W and d_W stream from memory once per chunk (three BLAS calls read W twice and d_W once each way), the thin
// operands are packed once per chunk into 48-column strips, the block's W into the same strips for (b), and the
// next block's W and d_W lines are prefetched while this block computes. Threads take contiguous ranges of blocks.
//
// AVX-512 register tiles (24 of the 32 zmm registers accumulate): (a) 8 lines x 48 columns, (b) 8 rows x 48
// columns, (c) 6 lines x 64 columns. H must be a multiple of 16 and ld of 16; chunk_gemms_supported() says whether
// this CPU has AVX-512F. The caller (Python) falls back to BLAS calls otherwise.
#include "fastalign.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <string>

#define FASTALIGN_AVX512 __attribute__((target("avx512f")))

namespace {

constexpr int64_t kStrip = 48;    // columns of a packed strip: 3 zmm of 16 floats
constexpr int64_t kBlockK = 128;  // (c)'s slice of H: 6 lines of W and a [128, 64] slice of next_hidden^T in L1

// (a) d[0:M, 0:16NV] (+)= sum_{r < C} e[0:M, r] hs[r, 0:16NV]; e: lines of ld floats; hs: a packed strip (48 / row)
template <int M, int NV>
FASTALIGN_AVX512 void weight_tile(const float* e, int64_t ld, const float* hs, int64_t C, float* d, int64_t H,
                                  bool first) {
  __m512 acc[M][NV];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(d + i * H + j * 16);
  for (int64_t r = 0; r < C; ++r) {
    __m512 b[NV];
    for (int j = 0; j < NV; ++j) b[j] = _mm512_loadu_ps(hs + r * kStrip + j * 16);
    for (int i = 0; i < M; ++i) {
      const __m512 a = _mm512_set1_ps(e[i * ld + r]);
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(d + i * H + j * 16, acc[i][j]);
}

// (b) p[0:8, 0:16NV] += sum_{v < m} e[v, 0:8] w[v, 0:16NV]; e: lines of ld floats; w, p: packed strips
template <int NV>
FASTALIGN_AVX512 void p_tile(const float* e, int64_t ld, const float* w, int64_t m, float* p) {
  constexpr int M = 8;
  __m512 acc[M][NV];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_loadu_ps(p + i * kStrip + j * 16);
  for (int64_t v = 0; v < m; ++v) {
    __m512 b[NV];
    for (int j = 0; j < NV; ++j) b[j] = _mm512_loadu_ps(w + v * kStrip + j * 16);
    for (int i = 0; i < M; ++i) {
      const __m512 a = _mm512_set1_ps(e[v * ld + i]);
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(p + i * kStrip + j * 16, acc[i][j]);
}

// (c) l[0:M, 0:16NV] (+)= alpha sum_{k < kc} w[0:M, k] ht[k, 0:16NV]; w: lines of H floats; ht, l: lines of ld
template <int M, int NV>
FASTALIGN_AVX512 void logits_tile(const float* w, int64_t H, const float* ht, int64_t ld, int64_t kc, float alpha,
                                  float* l, bool first) {
  __m512 acc[M][NV];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m512 b[NV];
    for (int j = 0; j < NV; ++j) b[j] = _mm512_loadu_ps(ht + k * ld + j * 16);
    for (int i = 0; i < M; ++i) {
      const __m512 a = _mm512_set1_ps(w[i * H + k]);
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) {
      float* dst = l + i * ld + j * 16;
      const __m512 x = _mm512_mul_ps(acc[i][j], va);
      _mm512_storeu_ps(dst, first ? x : _mm512_add_ps(_mm512_loadu_ps(dst), x));
    }
}

// Run-time tile shapes -> template instances (the last lines of a block, the last columns of H or of the tile).
template <int NV>
void weight_rows(int m, const float* e, int64_t ld, const float* hs, int64_t C, float* d, int64_t H, bool first) {
  switch (m) {
    case 8: return weight_tile<8, NV>(e, ld, hs, C, d, H, first);
    case 7: return weight_tile<7, NV>(e, ld, hs, C, d, H, first);
    case 6: return weight_tile<6, NV>(e, ld, hs, C, d, H, first);
    case 5: return weight_tile<5, NV>(e, ld, hs, C, d, H, first);
    case 4: return weight_tile<4, NV>(e, ld, hs, C, d, H, first);
    case 3: return weight_tile<3, NV>(e, ld, hs, C, d, H, first);
    case 2: return weight_tile<2, NV>(e, ld, hs, C, d, H, first);
    default: return weight_tile<1, NV>(e, ld, hs, C, d, H, first);
  }
}

void weight_strip(int m, int nv, const float* e, int64_t ld, const float* hs, int64_t C, float* d, int64_t H,
                  bool first) {
  if (nv == 3) return weight_rows<3>(m, e, ld, hs, C, d, H, first);
  if (nv == 2) return weight_rows<2>(m, e, ld, hs, C, d, H, first);
  return weight_rows<1>(m, e, ld, hs, C, d, H, first);
}

void p_strip(int nv, const float* e, int64_t ld, const float* w, int64_t m, float* p) {
  if (nv == 3) return p_tile<3>(e, ld, w, m, p);
  if (nv == 2) return p_tile<2>(e, ld, w, m, p);
  return p_tile<1>(e, ld, w, m, p);
}

template <int NV>
void logits_rows(int m, const float* w, int64_t H, const float* ht, int64_t ld, int64_t kc, float alpha, float* l,
                 bool first) {
  switch (m) {
    case 6: return logits_tile<6, NV>(w, H, ht, ld, kc, alpha, l, first);
    case 5: return logits_tile<5, NV>(w, H, ht, ld, kc, alpha, l, first);
    case 4: return logits_tile<4, NV>(w, H, ht, ld, kc, alpha, l, first);
    case 3: return logits_tile<3, NV>(w, H, ht, ld, kc, alpha, l, first);
    case 2: return logits_tile<2, NV>(w, H, ht, ld, kc, alpha, l, first);
    default: return logits_tile<1, NV>(w, H, ht, ld, kc, alpha, l, first);
  }
}

void logits_strip(int m, int nv, const float* w, int64_t H, const float* ht, int64_t ld, int64_t kc, float alpha,
                  float* l, bool first) {
  if (nv == 4) return logits_rows<4>(m, w, H, ht, ld, kc, alpha, l, first);
  if (nv == 3) return logits_rows<3>(m, w, H, ht, ld, kc, alpha, l, first);
  if (nv == 2) return logits_rows<2>(m, w, H, ht, ld, kc, alpha, l, first);
  return logits_rows<1>(m, w, H, ht, ld, kc, alpha, l, first);
}

// [rows, H] -> [strips][rows_padded][48] (zeros past H and past rows)
at::Tensor pack_strips(const at::Tensor& x, int64_t rows_padded) {
  const int64_t rows = x.size(0), H = x.size(1), strips = (H + kStrip - 1) / kStrip;
  at::Tensor out = at::zeros({strips, rows_padded, kStrip}, x.options());
  for (int64_t s = 0; s < strips; ++s) {
    const int64_t w = std::min(kStrip, H - s * kStrip);
    out[s].narrow(0, 0, rows).narrow(1, 0, w).copy_(x.narrow(1, s * kStrip, w));
  }
  return out;
}

// Vocabulary lines per block: its W lines (192 KB) stay in L2 from (b)'s packing to (c); a multiple of 24 (8 and 6,
// the tiles' lines).
int64_t block_lines(int64_t H) { return std::max<int64_t>(24, std::min<int64_t>(192, (49152 / H) / 24 * 24)); }

void check_operand(const c10::optional<at::Tensor>& t, int64_t rows, int64_t H, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                  t->size(1) == H &&
                  (rows < 0 || t->size(0) == rows),
              "fastalign._C.chunk_gemms_: ", name, " must be a contiguous fp32 CPU [",
              rows < 0 ? "rows" : std::to_string(rows), ", ", H, "] tensor, got ", t->sizes(), " ", t->scalar_type(),
              " on ", t->device());
}

}  // namespace

bool chunk_gemms_supported() { return __builtin_cpu_supports("avx512f"); }

at::Tensor chunk_gemms_(at::Tensor& tile, int64_t rows, const c10::optional<at::Tensor>& scaled_hidden,
                        const at::Tensor& weight, const c10::optional<at::Tensor>& d_weight, bool first, bool need_p,
                        const c10::optional<at::Tensor>& next_hidden, const c10::optional<at::Tensor>& bias,
                        double alpha) {
  TORCH_CHECK(chunk_gemms_supported(), "fastalign._C.chunk_gemms_ needs a CPU with AVX-512F (chunk_gemms_supported())");
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  weight.dim() == 2 && weight.size(1) > 0 && weight.size(1) % 16 == 0,
              "fastalign._C.chunk_gemms_: weight must be a contiguous fp32 [V, H] CPU tensor with H a positive "
              "multiple of 16, "
              "got ", weight.sizes(), " ", weight.scalar_type());
  const int64_t V = weight.size(0), H = weight.size(1);
  // the whole padded buffer, not a narrower view of it: (c) writes every one of its ld columns
  TORCH_CHECK(tile.device().is_cpu() && tile.scalar_type() == at::kFloat && tile.is_contiguous() && tile.dim() == 2 &&
                  tile.size(0) == V && tile.size(1) % 16 == 0,
              "fastalign._C.chunk_gemms_: tile must be a contiguous fp32 CPU [V, ld] buffer with ld a multiple of 16, "
              "got ", tile.sizes(), " (stride ", tile.strides(), ") ", tile.scalar_type(), " on ", tile.device());
  const int64_t ld = tile.size(1);
  TORCH_CHECK(rows >= 0 && rows <= ld, "fastalign._C.chunk_gemms_: rows must be in [0, ", ld, "], got ", rows);
  check_operand(scaled_hidden, rows, H, "scaled_hidden");
  check_operand(next_hidden, -1, H, "next_hidden");
  TORCH_CHECK(!next_hidden.has_value() || next_hidden->size(0) <= ld,
              "fastalign._C.chunk_gemms_: next_hidden has more rows than the tile's lines hold");
  TORCH_CHECK(scaled_hidden.has_value() == d_weight.has_value(),
              "fastalign._C.chunk_gemms_: scaled_hidden and d_weight come together");
  if (d_weight.has_value())
    TORCH_CHECK(d_weight->device().is_cpu() && d_weight->scalar_type() == at::kFloat && d_weight->is_contiguous() &&
                    d_weight->sizes() == weight.sizes(),
                "fastalign._C.chunk_gemms_: d_weight must be a contiguous fp32 CPU tensor shaped like weight");
  if (bias.has_value())
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->dim() == 1 && bias->size(0) == V,
                "fastalign._C.chunk_gemms_: bias must be a contiguous fp32 CPU [V] tensor");

  const int64_t C = rows, Cp = (C + 7) / 8 * 8, strips = (H + kStrip - 1) / kStrip;
  const bool do_weight = d_weight.has_value(),  // rows = 0 and first: zeros
             do_p = need_p && C > 0, do_logits = next_hidden.has_value();
  const int64_t Cn = do_logits ? next_hidden->size(0) : 0;
  const int64_t vb = block_lines(H), blocks = (V + vb - 1) / vb, threads = at::get_num_threads();
  at::Tensor hs_packed = do_weight ? pack_strips(*scaled_hidden, C) : at::Tensor();
  at::Tensor hn_t;  // next_hidden^T [H, ld], zeros past Cn
  if (do_logits) {
    hn_t = at::zeros({H, ld}, weight.options());
    hn_t.narrow(1, 0, Cn).copy_(next_hidden->t());
  }
  at::Tensor p_parts = do_p ? at::zeros({threads, strips, Cp, kStrip}, weight.options()) : at::Tensor();
  at::Tensor w_packed = do_p ? at::empty({threads, strips, vb, kStrip}, weight.options()) : at::Tensor();
  const float* W = weight.data_ptr<float>();
  float* E = tile.data_ptr<float>();
  float* dW = do_weight ? d_weight->data_ptr<float>() : nullptr;
  const float* hs = do_weight ? hs_packed.data_ptr<float>() : nullptr;
  const float* ht = do_logits ? hn_t.data_ptr<float>() : nullptr;
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float a = static_cast<float>(alpha);

  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t last_block) {
    const int64_t t = at::get_thread_num();
    float* P = do_p ? p_parts.data_ptr<float>() + t * strips * Cp * kStrip : nullptr;
    float* Wp = do_p ? w_packed.data_ptr<float>() + t * strips * vb * kStrip : nullptr;
    for (int64_t blk = first_block; blk < last_block; ++blk) {
      const int64_t v0 = blk * vb, m = std::min(vb, V - v0);
      if (do_weight) {  // (a): lines of 8, all strips, then the next 8 (d_W streams line by line)
        for (int64_t i = 0; i < m; i += 8) {
          const int mi = static_cast<int>(std::min<int64_t>(8, m - i));
          const float* e = E + (v0 + i) * ld;
          for (int64_t s = 0; s < strips; ++s) {
            const int nv = static_cast<int>(std::min<int64_t>(kStrip, H - s * kStrip) / 16);
            float* d = dW + (v0 + i) * H + s * kStrip;
            if (v0 + i + 16 <= V)  // the next 8 lines' share of this strip: in L1 when their turn comes
              for (int q = 0; q < 8; ++q)
                for (int c = 0; c < nv; ++c)
                  _mm_prefetch(reinterpret_cast<const char*>(d + (8 + q) * H + c * 16), _MM_HINT_T0);
            weight_strip(mi, nv, e, ld, hs + s * C * kStrip, C, d, H, first);
          }
        }
      }
      if (do_p) {  // (b): pack the block's W into strips, then P += E_b^T W_b, prefetching the next block's W
        for (int64_t v = 0; v < m; ++v)
          for (int64_t s = 0; s < strips; ++s) {
            const float* src = W + (v0 + v) * H + s * kStrip;
            std::copy(src, src + std::min(kStrip, H - s * kStrip), Wp + (s * vb + v) * kStrip);
          }
        const float* w_next = W + (v0 + m) * H;
        const int64_t lines = std::max<int64_t>(0, std::min(vb, V - v0 - m)) * H / 16, calls = strips * (Cp / 8);
        int64_t call = 0;
        for (int64_t s = 0; s < strips; ++s) {
          const int nv = static_cast<int>(std::min<int64_t>(kStrip, H - s * kStrip) / 16);
          for (int64_t r = 0; r < Cp; r += 8, ++call) {
            for (int64_t l = call * lines / calls; l < (call + 1) * lines / calls; ++l)
              _mm_prefetch(reinterpret_cast<const char*>(w_next + l * 16), _MM_HINT_T1);
            p_strip(nv, E + v0 * ld + r, ld, Wp + s * vb * kStrip, m, P + (s * Cp + r) * kStrip);
          }
        }
      }
      if (do_logits) {  // (c): over E_b, now consumed; all ld columns (zeros past Cn), then the bias
        for (int64_t k0 = 0; k0 < H; k0 += kBlockK) {
          const int64_t kc = std::min(kBlockK, H - k0);
          for (int64_t r = 0; r < ld; r += 64) {
            const int nv = static_cast<int>(std::min<int64_t>(64, ld - r) / 16);
            for (int64_t i = 0; i < m; i += 6)
              logits_strip(static_cast<int>(std::min<int64_t>(6, m - i)), nv, W + (v0 + i) * H + k0, H,
                           ht + k0 * ld + r, ld, kc, a, E + (v0 + i) * ld + r, k0 == 0);
          }
        }
        if (b != nullptr)
          for (int64_t v = v0; v < v0 + m; ++v)
            for (int64_t r = 0; r < Cn; ++r) E[v * ld + r] += b[v];
      }
    }
  });
  if (!do_p) return at::empty({0, H}, weight.options());
  // [threads, strips, Cp, 48] -> [C, H]: the threads' partial sums in a fixed order (thread 0 first)
  at::Tensor p = p_parts.sum(0);
  return p.permute({1, 0, 2}).reshape({Cp, strips * kStrip}).narrow(0, 0, C).narrow(1, 0, H).contiguous();
}
