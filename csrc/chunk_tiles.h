// The AVX-512 register tiles of the fused thin-chunk kernel (linear_logprobs_chunk.cpp, which says what (a), (b)
// and (c) are and how its blocks are walked), the prefetch schedule they carry, and the per-block passes over the
// tile (logits -> E', the next logits' column statistics). Included by that file only.
#pragma once

#include "col_math.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#define FASTALIGN_AVX512 __attribute__((target("avx512f,avx512bw")))

// Internal linkage (the only file that includes this is linear_logprobs_chunk.cpp): the compiler sees and inlines
// them as it did when they lived in that file.
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

}  // namespace
