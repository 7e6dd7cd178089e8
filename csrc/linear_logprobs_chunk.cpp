// The GEMM work of one chunk of the gradient-in-forward loss path (fastalign/chunk_pass_fused.py), fp32, in one
// pass over the vocabulary, for thin chunks (C <= 128 rows), where three BLAS calls per chunk lose speed: each
// streams all of W or d_W from memory again for only C rows of work (2-core Xeon, fp32, N=2048 H=1024 V=32000, 64
// rows, forward+backward of the NLL against the three unchunked GEMMs: BLAS chunks 1.69x, this kernel 1.13x, 1.19x
// without AMX; bench/results/linear_logprobs-goal-step-shuffled-cpu-2026-12-07.json).
//
//   chunk_gemms_(tile [V, ld] (the whole buffer), rows C, scaled_hidden [C, H] | None, d_weight [V, H] | None,
//                first, need_p, next_hidden [Cn, H] | None, bias [V] | None, alpha,
//                exp_shift [C] | None, targets [C] | None, d_bias [V] | None, bias_scale [C] | None,
//                target_values [C] | None)
//       -> {P [C, H] (need_p) | [0, H], next_max [Cn], next_sumexp [Cn]}
//
// For each block of block_v vocabulary lines b, in this order:
//   (x) with exp_shift: the block's logits l (first C columns) become E' = exp(l - exp_shift), each labelled row's
//       target entry target_values[c] (0 without them: the caller's d logits = E' diag(f) + onehot diag(t) then
//       puts t / f there, so every product below carries the target's term); without exp_shift the tile holds E'
//       already. With d_bias: d_bias_b (+)= E'_b bias_scale.
//   (a) d_weight_b (+)= E'_b scaled_hidden      [block_v, H], K = C        (written when first, else added to)
//   (b) P^T_thread +=   W_b^T E'_b              [H, C],       K = block_v  (per-thread, summed at the end)
//   (c) tile_b     =    alpha W_b next_hidden^T + bias_b   [block_v, ld], K = H: the next chunk's logits, written
//       over E'_b, which (a) and (b) have consumed; columns >= Cn are 0 (the padding stays zero, see
//       chunk_pass.padded_buffer), the bias goes to columns < Cn only. Then the block's logits update the thread's
//       running column max and sum of exp (online, rescaled as the max grows): the caller gets lse = max + log(sum)
//       for the next chunk with no pass of its own over the tile, and (x) of the next call reads each line once,
//       just before (a) and (b) use it.
// So W and d_W stream from memory once per chunk (three BLAS calls read W twice and d_W once each way), the tile
// is read and written once per chunk (a row pass of its own would read it twice more and write it once), (a)'s
// thin operand is packed once per chunk into 48-column strips, and the coming blocks' W and d_W lines are
// prefetched while this block computes, a line every few K steps of each tile (struct Prefetch). Threads take
// contiguous ranges of blocks.
//
// Where the CPU has AMX (chunk_amx.h; set_chunk_amx turns it off), (a) runs on AMX tiles at fp32 accuracy (each
// fp32 value split into three bf16 parts, six part products): the block's E' lines are split into a small panel,
// scaled_hidden once per chunk, and d_W's 16 x 16 tiles are loaded, added to and stored by the tile unit (blocks are
// then a multiple of 48 lines). (a) alone took 0.8x its AVX-512 time (ad hoc, one 64-row chunk, H=1024).
//
// AVX-512 register tiles (24 of the 32 zmm registers accumulate): (a) 8 lines x 48 columns, (b) and (c) 6 lines x
// 64 columns (one micro-kernel; (b) broadcasts W[v, h..h+5] along a line of W instead of down a column; it took
// 0.9x the time of (b) with W packed into strips, ad hoc). H must be a multiple of 16 and ld of 16;
// chunk_gemms_supported() says whether this CPU has AVX-512F and AVX-512BW. The caller (Python) falls back to BLAS
// calls otherwise.
#include "fastalign.h"

#include "chunk_amx.h"
#include "col_math.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#define FASTALIGN_AVX512 __attribute__((target("avx512f,avx512bw")))

namespace {

constexpr int64_t kStrip = 48;    // columns of a packed strip: 3 zmm of 16 floats
constexpr int64_t kBlockK = 128;  // (c)'s slice of H: 6 lines of W and a [128, 64] slice of next_hidden^T in L1

// (a) d[0:M, 0:16NV] (+)= sum_{r < C} e[0:M, r] hs[r, 0:16NV]; e: lines of ld floats; hs: a packed strip (48 / row)
template <int M, int NV>
FASTALIGN_AVX512 void weight_tile(const float* e, int64_t ld, const float* hs, int64_t C, float* d, int64_t H,
                                  bool first) {
  __m512 acc[M][NV];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t r = 0; r < C; ++r) {
    __m512 b[NV];
    for (int j = 0; j < NV; ++j) b[j] = _mm512_loadu_ps(hs + r * kStrip + j * 16);
    for (int i = 0; i < M; ++i) {
      const __m512 a = _mm512_set1_ps(e[i * ld + r]);
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
  // d is read only now, after the products: its lines (from memory, prefetched a tile ahead) had time to arrive
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j)
      _mm512_storeu_ps(d + i * H + j * 16, first ? acc[i][j] : _mm512_add_ps(_mm512_loadu_ps(d + i * H + j * 16), acc[i][j]));
}

// Lines of a coming block (W's, d_W's) to bring into L2 while a tile computes, spread over its K steps: na lines
// of stream a, one every kc / na steps, and nb of stream b (at most one line per stream and step: at H=512-4096
// a tile's share is 18-48 lines for 48-128 steps; past kc, the rest would be left to the hardware). Issued in
// a burst per tile instead, they took the L1 fill buffers that the tile's own W lines (4 KB apart at H=1024: one
// L1 set, so they come from L2 again for each tile) needed: the step took 1.15x the floor at N=2048 H=1024 64 rows,
// 1.07x spread (ad hoc, paired).
struct Prefetch {
  const char* a = nullptr;
  const char* b = nullptr;
  int64_t na = 0, nb = 0;          // lines of a, of b
  int64_t due_a = 0, due_b = 0;    // each stream's share of the K steps so far, in kc-ths of a line

  // K step of kc: the lines now due
  inline void step(int64_t kc) {
    if ((due_a += na) >= kc) due_a -= kc, _mm_prefetch(a, _MM_HINT_T1), a += 64;
    if ((due_b += nb) >= kc) due_b -= kc, _mm_prefetch(b, _MM_HINT_T1), b += 64;
  }
};

// (c) l[0:M, 0:16NV] (+)= alpha sum_{k < kc} w[i wi + k wk] ht[k, 0:16NV]; ht, l: lines of ld floats
template <int M, int NV>
FASTALIGN_AVX512 void logits_tile(const float* w, int64_t wi, int64_t wk, const float* ht, int64_t ld, int64_t kc, float alpha,
                                  float* l, bool first, Prefetch pf) {
  __m512 acc[M][NV];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m512 b[NV];
    for (int j = 0; j < NV; ++j) b[j] = _mm512_loadu_ps(ht + k * ld + j * 16);
    pf.step(kc);
    for (int i = 0; i < M; ++i) {
      const __m512 a = _mm512_set1_ps(w[i * wi + k * wk]);
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

// (b), transposed: P^T[0:M, 0:16NV] (+)= sum_{k < kc} W[k, 0:M] E[k, 0:16NV] (W lines of H floats, E and P^T lines
// of ld floats), P^T loaded into the accumulators (first: zeros)
template <int M, int NV>
FASTALIGN_AVX512 void p_tile(const float* w, int64_t H, const float* e, int64_t ld, int64_t kc, float* p, bool first,
                             Prefetch pf) {
  __m512 acc[M][NV];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(p + i * ld + j * 16);
  for (int64_t k = 0; k < kc; ++k) {
    __m512 b[NV];
    for (int j = 0; j < NV; ++j) b[j] = _mm512_loadu_ps(e + k * ld + j * 16);
    pf.step(kc);
    for (int i = 0; i < M; ++i) {
      const __m512 a = _mm512_set1_ps(w[i + k * H]);
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(p + i * ld + j * 16, acc[i][j]);
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

template <int NV>
void logits_rows(int m, const float* w, int64_t wi, int64_t wk, const float* ht, int64_t ld, int64_t kc, float alpha, float* l,
                 bool first, Prefetch pf) {
  switch (m) {
    case 6: return logits_tile<6, NV>(w, wi, wk, ht, ld, kc, alpha, l, first, pf);
    case 5: return logits_tile<5, NV>(w, wi, wk, ht, ld, kc, alpha, l, first, pf);
    case 4: return logits_tile<4, NV>(w, wi, wk, ht, ld, kc, alpha, l, first, pf);
    case 3: return logits_tile<3, NV>(w, wi, wk, ht, ld, kc, alpha, l, first, pf);
    case 2: return logits_tile<2, NV>(w, wi, wk, ht, ld, kc, alpha, l, first, pf);
    default: return logits_tile<1, NV>(w, wi, wk, ht, ld, kc, alpha, l, first, pf);
  }
}

void logits_strip(int m, int nv, const float* w, int64_t wi, int64_t wk, const float* ht, int64_t ld, int64_t kc, float alpha,
                  float* l, bool first, Prefetch pf) {
  if (nv == 4) return logits_rows<4>(m, w, wi, wk, ht, ld, kc, alpha, l, first, pf);
  if (nv == 3) return logits_rows<3>(m, w, wi, wk, ht, ld, kc, alpha, l, first, pf);
  if (nv == 2) return logits_rows<2>(m, w, wi, wk, ht, ld, kc, alpha, l, first, pf);
  return logits_rows<1>(m, w, wi, wk, ht, ld, kc, alpha, l, first, pf);
}

template <int NV>
void p_rows(int m, const float* w, int64_t H, const float* e, int64_t ld, int64_t kc, float* p, bool first, Prefetch pf) {
  switch (m) {
    case 6: return p_tile<6, NV>(w, H, e, ld, kc, p, first, pf);
    case 5: return p_tile<5, NV>(w, H, e, ld, kc, p, first, pf);
    case 4: return p_tile<4, NV>(w, H, e, ld, kc, p, first, pf);
    case 3: return p_tile<3, NV>(w, H, e, ld, kc, p, first, pf);
    case 2: return p_tile<2, NV>(w, H, e, ld, kc, p, first, pf);
    default: return p_tile<1, NV>(w, H, e, ld, kc, p, first, pf);
  }
}

void p_strip(int m, int nv, const float* w, int64_t H, const float* e, int64_t ld, int64_t kc, float* p, bool first,
             Prefetch pf) {
  if (nv == 4) return p_rows<4>(m, w, H, e, ld, kc, p, first, pf);
  if (nv == 3) return p_rows<3>(m, w, H, e, ld, kc, p, first, pf);
  if (nv == 2) return p_rows<2>(m, w, H, e, ld, kc, p, first, pf);
  return p_rows<1>(m, w, H, e, ld, kc, p, first, pf);
}

// Tile `call` of `calls`' share of the lines to prefetch: stream a's lines [call na / calls, (call + 1) na / calls)
// (na in all), the same for b; a null stream has none
Prefetch prefetch_share(const float* a, int64_t na, const float* b, int64_t nb, int64_t call, int64_t calls) {
  Prefetch pf;
  if (a != nullptr && na > 0) {
    const int64_t l0 = call * na / calls;
    pf.a = reinterpret_cast<const char*>(a + l0 * 16);
    pf.na = (call + 1) * na / calls - l0;
  }
  if (b != nullptr && nb > 0) {
    const int64_t l0 = call * nb / calls;
    pf.b = reinterpret_cast<const char*>(b + l0 * 16);
    pf.nb = (call + 1) * nb / calls - l0;
  }
  return pf;
}

// Mask of the first n (< 16 allowed) of 16 lanes.
inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// Before (a) and (b): the block's lines of logits l become E' = exp(l - shift), each labelled row's target entry
// set to tv[c] (0 without tv); columns >= C stay 0. y: targets [C] (-1: ignored row, nothing set). While the lines
// are in L1, d_bias[v] (+)= sum_c E'[v, c] f[c].
FASTALIGN_AVX512 void exp_lines(float* E, int64_t ld, int64_t v0, int64_t m, int64_t C, const float* shift,
                                const int64_t* y, const float* tv, const float* f, float* d_bias, bool first) {
  for (int64_t v = 0; v < m; ++v) {
    float* x = E + (v0 + v) * ld;
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 k = lanes(C - c);
      const __m512 e = fastalign_rows::exp16(
          _mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + c), _mm512_maskz_loadu_ps(k, shift + c)));
      _mm512_mask_storeu_ps(x + c, k, e);
    }
  }
  for (int64_t c = 0; c < C; ++c)
    if (y[c] >= v0 && y[c] < v0 + m) E[y[c] * ld + c] = tv != nullptr ? tv[c] : 0.0f;
  if (d_bias == nullptr) return;
  for (int64_t v = 0; v < m; ++v) {
    const float* x = E + (v0 + v) * ld;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 k = lanes(C - c);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, x + c), _mm512_maskz_loadu_ps(k, f + c), acc);
    }
    const float dot = _mm512_reduce_add_ps(acc);
    d_bias[v0 + v] = first ? dot : d_bias[v0 + v] + dot;
  }
}

// After (c): the block's new logits (columns < Cn) into the thread's running column statistics, online: mx = max so
// far, se = sum of exp(l - mx) so far (rescaled when mx grows). Lines are in L1; one exp per logit.
FASTALIGN_AVX512 void block_stats(const float* E, int64_t ld, int64_t v0, int64_t m, int64_t Cn, float* mx,
                                  float* se) {
  for (int64_t c = 0; c < Cn; c += 16) {
    const __mmask16 k = lanes(Cn - c);
    __m512 bm = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t v = 0; v < m; ++v) bm = _mm512_max_ps(bm, _mm512_maskz_loadu_ps(k, E + (v0 + v) * ld + c));
    const __m512 old = _mm512_maskz_loadu_ps(k, mx + c), nm = _mm512_max_ps(old, bm);
    __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, se + c), fastalign_rows::exp16(_mm512_sub_ps(old, nm)));
    for (int64_t v = 0; v < m; ++v)
      s = _mm512_add_ps(s, fastalign_rows::exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, E + (v0 + v) * ld + c), nm)));
    _mm512_mask_storeu_ps(mx + c, k, nm);
    _mm512_mask_storeu_ps(se + c, k, s);
  }
}

// [rows, H] -> [strips][rows][48], zeros past H (one pass: a narrow/copy per strip cost more than the copy)
at::Tensor pack_strips(const at::Tensor& x) {
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
at::Tensor transposed_padded(const at::Tensor& x, int64_t ld) {
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

// Vocabulary lines per block: its W lines (about 96 KB; 192 KB with AMX at H=1024) stay in L2 from (b) to (c); a
// multiple of 24 (8 and 6, the AVX-512 tiles' lines), and of 48 with AMX (its 16-line tiles; 24-line blocks would
// leave 8 of each to AVX-512)
int64_t block_lines(int64_t H, bool amx) {
  const int64_t unit = amx ? 48 : 24;
  return std::max<int64_t>(unit, std::min<int64_t>(192, (24576 / H) / unit * unit));
}

void check_operand(const c10::optional<at::Tensor>& t, int64_t rows, int64_t H, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                  t->size(1) == H &&
                  (rows < 0 || t->size(0) == rows),
              "fastalign._C.chunk_gemms_: ", name, " must be a contiguous fp32 CPU [",
              rows < 0 ? "rows" : std::to_string(rows), ", ", H, "] tensor, got ", t->sizes(), " ", t->scalar_type(),
              " on ", t->device());
}

void check_vector(const c10::optional<at::Tensor>& t, int64_t n, at::ScalarType dtype, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dtype && t->is_contiguous() && t->dim() == 1 &&
                  t->size(0) == n,
              "fastalign._C.chunk_gemms_: ", name, " must be a contiguous ", dtype, " CPU [", n, "] tensor, got ",
              t->sizes(), " ", t->scalar_type(), " on ", t->device());
}

}  // namespace

bool chunk_gemms_supported() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }

bool chunk_amx_supported() { return chunk_gemms_supported() && fastalign_amx::supported(); }

bool set_chunk_amx(bool enabled) { return fastalign_amx::enabled().exchange(enabled); }

std::vector<at::Tensor> chunk_gemms_(at::Tensor& tile, int64_t rows, const c10::optional<at::Tensor>& scaled_hidden,
                                     const at::Tensor& weight, const c10::optional<at::Tensor>& d_weight, bool first,
                                     bool need_p, const c10::optional<at::Tensor>& next_hidden,
                                     const c10::optional<at::Tensor>& bias, double alpha,
                                     const c10::optional<at::Tensor>& exp_shift,
                                     const c10::optional<at::Tensor>& targets,
                                     const c10::optional<at::Tensor>& d_bias,
                                     const c10::optional<at::Tensor>& bias_scale,
                                     const c10::optional<at::Tensor>& target_values) {
  TORCH_CHECK(chunk_gemms_supported(),
              "fastalign._C.chunk_gemms_ needs a CPU with AVX-512F and AVX-512BW (chunk_gemms_supported())");
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
  check_vector(bias, V, at::kFloat, "bias");
  check_vector(exp_shift, rows, at::kFloat, "exp_shift");
  check_vector(targets, rows, at::kLong, "targets");
  check_vector(d_bias, V, at::kFloat, "d_bias");
  check_vector(bias_scale, rows, at::kFloat, "bias_scale");
  check_vector(target_values, rows, at::kFloat, "target_values");
  TORCH_CHECK(!target_values.has_value() || exp_shift.has_value(),
              "fastalign._C.chunk_gemms_: target_values needs exp_shift and targets");
  TORCH_CHECK(exp_shift.has_value() == targets.has_value(),
              "fastalign._C.chunk_gemms_: exp_shift and targets come together");
  TORCH_CHECK(d_bias.has_value() == bias_scale.has_value(),
              "fastalign._C.chunk_gemms_: d_bias and bias_scale come together");

  const int64_t C = rows, C16 = (C + 15) / 16 * 16, strips = (H + kStrip - 1) / kStrip;
  const bool do_weight = d_weight.has_value(),  // rows = 0 and first: zeros
             do_p = need_p && C > 0, do_logits = next_hidden.has_value(), do_exp = exp_shift.has_value() && C > 0,
             do_bias = d_bias.has_value();
  const int64_t Cn = do_logits ? next_hidden->size(0) : 0;
  // (a) on AMX where this CPU has it: [C, H] scaled_hidden split once into a B panel; each block's E' lines into a
  // per-thread A panel
  const bool amx = do_weight && C > 0 && H % 32 == 0 && fastalign_amx::active();
  const int64_t vb = block_lines(H, amx), blocks = (V + vb - 1) / vb, threads = at::get_num_threads();
  const int64_t kts = (C + 31) / 32;  // AMX's K steps over the chunk's rows
  at::Tensor hs_packed = do_weight && !amx ? pack_strips(*scaled_hidden) : at::Tensor();
  at::Tensor hs_panel = amx ? at::empty({3, kts * 32 * H}, weight.options().dtype(at::kShort)) : at::Tensor();
  uint16_t* hs_parts[3] = {nullptr, nullptr, nullptr};
  if (amx) {
    uint16_t* panel = reinterpret_cast<uint16_t*>(hs_panel.data_ptr<int16_t>());
    for (int s = 0; s < 3; ++s) hs_parts[s] = panel + s * kts * 32 * H;
    // the threads take ranges of 16-column tiles: each tile's panel is contiguous (see chunk_amx.h)
    at::parallel_for(0, H / 16, 8, [&](int64_t t0, int64_t t1) {
      uint16_t* parts[3];
      for (int s = 0; s < 3; ++s) parts[s] = hs_parts[s] + t0 * kts * 512;
      fastalign_amx::pack_b_rows(scaled_hidden->data_ptr<float>() + t0 * 16, H, C, (t1 - t0) * 16, parts);
    });
  }
  at::Tensor hn_t = do_logits ? transposed_padded(*next_hidden, ld) : at::Tensor();
  // per thread: P^T [H, ld] partial sums; running max / sum of exp of the next chunk's logits [ld]
  // (each thread's first block writes its P^T, no zero fill; a thread with no block is left out of the sum)
  at::Tensor p_parts = do_p ? at::empty({threads, H, ld}, weight.options()) : at::Tensor();
  std::vector<char> p_written(threads, 0);
  at::Tensor mx_parts = at::full({threads, ld}, -std::numeric_limits<float>::infinity(), weight.options());
  at::Tensor se_parts = at::zeros({threads, ld}, weight.options());
  const float* W = weight.data_ptr<float>();
  float* E = tile.data_ptr<float>();
  float* dW = do_weight ? d_weight->data_ptr<float>() : nullptr;
  const float* hs = hs_packed.defined() ? hs_packed.data_ptr<float>() : nullptr;
  const float* ht = do_logits ? hn_t.data_ptr<float>() : nullptr;
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float* shift = do_exp ? exp_shift->data_ptr<float>() : nullptr;
  const int64_t* y = do_exp ? targets->data_ptr<int64_t>() : nullptr;
  float* db = do_bias ? d_bias->data_ptr<float>() : nullptr;
  const float* f = do_bias ? bias_scale->data_ptr<float>() : nullptr;
  const float* tv = do_exp && target_values.has_value() ? target_values->data_ptr<float>() : nullptr;
  const float a = static_cast<float>(alpha);

  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t last_block) {
    const int64_t t = at::get_thread_num();
    float* P = do_p ? p_parts.data_ptr<float>() + t * H * ld : nullptr;
    float* mx = mx_parts.data_ptr<float>() + t * ld;
    float* se = se_parts.data_ptr<float>() + t * ld;
    std::vector<uint16_t> e_split(amx ? 3 * vb * kts * 32 : 0);  // the block's E' lines, split (AMX)
    uint16_t* e_parts[3] = {nullptr, nullptr, nullptr};
    if (amx)
      for (int s = 0; s < 3; ++s) e_parts[s] = e_split.data() + s * vb * kts * 32;
    const fastalign_amx::TileScope tiles(amx);
    for (int64_t blk = first_block; blk < last_block; ++blk) {
      const int64_t v0 = blk * vb, m = std::min(vb, V - v0);
      if (do_exp) {  // logits -> E' (and d_bias) while the lines are on their way into the cache
        exp_lines(E, ld, v0, m, C, shift, y, tv, f, db, first);
      } else if (do_bias) {
        for (int64_t v = v0; v < v0 + m; ++v) {
          float dot = 0.0f;
          for (int64_t c = 0; c < C; ++c) dot += E[v * ld + c] * f[c];
          db[v] = first ? dot : db[v] + dot;
        }
      }
      const int64_t m_amx = amx ? m / 16 * 16 : 0;  // (a)'s lines on AMX, the rest on AVX-512
      if (m_amx > 0) {  // (a) on AMX: d_W's tiles loaded, E'_b scaled_hidden added, stored
        fastalign_amx::split_rows(E + v0 * ld, ld, m_amx, C, e_parts);
        fastalign_amx::tile_gemm(e_parts, m_amx, hs_parts, H, C, dW + v0 * H, H, !first);
      }
      if (do_weight && m_amx < m) {  // (a): lines of 8, all strips, then the next 8 (d_W streams line by line)
        at::Tensor hs_rest;  // AMX's last lines (the vocabulary's end): strips of their own
        if (amx) hs_rest = pack_strips(*scaled_hidden);
        const float* hs_strips = amx ? hs_rest.data_ptr<float>() : hs;
        for (int64_t i = m_amx; i < m; i += 8) {
          const int mi = static_cast<int>(std::min<int64_t>(8, m - i));
          const float* e = E + (v0 + i) * ld;
          for (int64_t s = 0; s < strips; ++s) {
            const int nv = static_cast<int>(std::min<int64_t>(kStrip, H - s * kStrip) / 16);
            float* d = dW + (v0 + i) * H + s * kStrip;
            if (v0 + i + 16 <= V)  // the next 8 lines' share of this strip: in L1 when their turn comes
              for (int q = 0; q < 8; ++q)
                for (int c = 0; c < nv; ++c)
                  _mm_prefetch(reinterpret_cast<const char*>(d + (8 + q) * H + c * 16), _MM_HINT_T0);
            weight_strip(mi, nv, e, ld, hs_strips + s * C * kStrip, C, d, H, first);
          }
        }
      }
      // Prefetched into L2, spread over the tiles: the next block's W lines during (b) (during (c) without (b)),
      // and d_W's lines two blocks ahead during (c) (during (b) without (c); none on the first call, which writes
      // d_W without reading it). With d_W one block ahead the chunks took 37.4-38.0 ms against 36.4 ms (N=2048
      // H=1024 64 rows, ad hoc, paired).
      const int64_t next_lines = std::max<int64_t>(0, std::min(vb, V - v0 - m)) * H / 16;
      const float* w_next = W + (v0 + m) * H;
      const int64_t dw_lines = std::max<int64_t>(0, std::min(vb, V - v0 - 2 * vb)) * H / 16;
      const float* dw_next = do_weight && !first && dw_lines > 0 ? dW + (v0 + 2 * vb) * H : nullptr;
      if (do_p) {  // (b), transposed: P^T[h, 0:C] += sum_v W_b[v, h] E_b[v, 0:C]
        const int64_t calls = (H + 5) / 6 * ((C16 + 63) / 64);
        int64_t call = 0;
        for (int64_t h0 = 0; h0 < H; h0 += 6)
          for (int64_t r = 0; r < C16; r += 64, ++call)
            p_strip(static_cast<int>(std::min<int64_t>(6, H - h0)), static_cast<int>(std::min<int64_t>(64, C16 - r) / 16),
                    W + v0 * H + h0, H, E + v0 * ld + r, ld, m, P + h0 * ld + r, blk == first_block,
                    prefetch_share(w_next, next_lines, do_logits ? nullptr : dw_next, dw_lines, call, calls));
        p_written[t] = 1;
      }
      if (do_logits) {  // (c): over E_b, now consumed; all ld columns (zeros past Cn), then the bias
        const int64_t calls = (H + kBlockK - 1) / kBlockK * ((ld + 63) / 64) * ((m + 5) / 6);
        int64_t call = 0;
        for (int64_t k0 = 0; k0 < H; k0 += kBlockK) {
          const int64_t kc = std::min(kBlockK, H - k0);
          for (int64_t r = 0; r < ld; r += 64) {
            const int nv = static_cast<int>(std::min<int64_t>(64, ld - r) / 16);
            for (int64_t i = 0; i < m; i += 6, ++call)
              logits_strip(static_cast<int>(std::min<int64_t>(6, m - i)), nv, W + (v0 + i) * H + k0, H, 1,
                           ht + k0 * ld + r, ld, kc, a, E + (v0 + i) * ld + r, k0 == 0,
                           prefetch_share(do_p ? nullptr : w_next, next_lines, dw_next, dw_lines, call, calls));
          }
        }
        if (b != nullptr)
          for (int64_t v = v0; v < v0 + m; ++v)
            for (int64_t r = 0; r < Cn; ++r) E[v * ld + r] += b[v];
        block_stats(E, ld, v0, m, Cn, mx, se);
      }
    }
  });
  // the threads' partial results, combined in a fixed order (thread 0 first): results do not depend on scheduling
  at::Tensor next_max = at::empty({Cn}, weight.options()), next_sumexp = at::empty({Cn}, weight.options());
  {
    const float* mxp = mx_parts.data_ptr<float>();
    const float* sep = se_parts.data_ptr<float>();
    float* nm = next_max.data_ptr<float>();
    float* ns = next_sumexp.data_ptr<float>();
    for (int64_t c = 0; c < Cn; ++c) {
      float m = mxp[c];
      for (int64_t t = 1; t < threads; ++t) m = std::max(m, mxp[t * ld + c]);
      double s = 0.0;
      for (int64_t t = 0; t < threads; ++t)
        if (sep[t * ld + c] > 0.0f) s += static_cast<double>(sep[t * ld + c]) * std::exp(double(mxp[t * ld + c]) - m);
      nm[c] = m;
      ns[c] = static_cast<float>(s);
    }
  }
  at::Tensor p = at::empty({do_p ? C : 0, H}, weight.options());
  if (do_p) {  // P [c, h] = sum over threads (in order) of P^T_t [h, c]
    const float* pp = p_parts.data_ptr<float>();
    float* out = p.data_ptr<float>();
    bool any = false;
    for (int64_t t = 0; t < threads; ++t) any = any || p_written[t];
    if (!any) p.zero_();
    else
      at::parallel_for(0, H, 64, [&](int64_t h0, int64_t h1) {  // the threads take ranges of H
        bool seen = false;
        for (int64_t t = 0; t < threads; ++t) {
          if (!p_written[t]) continue;
          const float* pt = pp + t * H * ld;
          for (int64_t c = 0; c < C; ++c)
            for (int64_t h = h0; h < h1; ++h) out[c * H + h] = seen ? out[c * H + h] + pt[h * ld + c] : pt[h * ld + c];
          seen = true;
        }
      });
  }
  return {p, next_max, next_sumexp};
}
