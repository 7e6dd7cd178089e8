// Column primitives for a vocabulary-major tile [V, C] (one contiguous line of C values per vocabulary entry,
// column c = row c of the chunk): each function updates one line x [C] against per-column vectors [C], so the
// reductions over the vocabulary run 8 columns at a time without horizontal sums. Scalar templates for any type,
// AVX2/FMA versions for float chosen at run time (kHasAvx2), as in row_math.h.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "row_math.h"

namespace fastalign_rows {

// acc[c] = max(acc[c], x[c])
template <typename T>
void col_max_scalar(const T* x, T* acc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) acc[c] = std::max(acc[c], x[c]);
}

// x[c] <- exp(x[c] - shift[c]) if store; acc[c] += exp(x[c] - shift[c])
template <typename T>
void col_exp_acc_scalar(T* x, const T* shift, T* acc, int64_t n, bool store) {
  for (int64_t c = 0; c < n; ++c) {
    const T e = std::exp(x[c] - shift[c]);
    if (store) x[c] = e;
    acc[c] += e;
  }
}

// x[c] <- x[c] * f[c]
template <typename T>
void col_scale_scalar(T* x, const T* f, int64_t n) {
  for (int64_t c = 0; c < n; ++c) x[c] *= f[c];
}

// x[c] = l (softcapped logit) <- g[c] * exp(l - lse[c]) * (1 - (l / cap)^2)   (g already carries the minus sign)
template <typename T>
void col_softcap_grad_scalar(T* x, const T* lse, const T* g, int64_t n, T inv_cap) {
  for (int64_t c = 0; c < n; ++c) {
    const T r = x[c] * inv_cap;
    x[c] = g[c] * std::exp(x[c] - lse[c]) * (T(1) - r * r);
  }
}

#ifdef FASTALIGN_X86_SIMD
__attribute__((target("avx2,fma"))) inline void col_max_avx2(const float* x, float* acc, int64_t n) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    _mm256_storeu_ps(acc + c, _mm256_max_ps(_mm256_loadu_ps(acc + c), _mm256_loadu_ps(x + c)));
  col_max_scalar(x + c, acc + c, n - c);
}

__attribute__((target("avx2,fma"))) inline void col_exp_acc_avx2(float* x, const float* shift, float* acc, int64_t n,
                                                                 bool store) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + c), _mm256_loadu_ps(shift + c)));
    if (store) _mm256_storeu_ps(x + c, e);
    _mm256_storeu_ps(acc + c, _mm256_add_ps(_mm256_loadu_ps(acc + c), e));
  }
  col_exp_acc_scalar(x + c, shift + c, acc + c, n - c, store);
}

__attribute__((target("avx2,fma"))) inline void col_scale_avx2(float* x, const float* f, int64_t n) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) _mm256_storeu_ps(x + c, _mm256_mul_ps(_mm256_loadu_ps(x + c), _mm256_loadu_ps(f + c)));
  col_scale_scalar(x + c, f + c, n - c);
}

__attribute__((target("avx2,fma"))) inline void col_softcap_grad_avx2(float* x, const float* lse, const float* g,
                                                                      int64_t n, float inv_cap) {
  const __m256 ic = _mm256_set1_ps(inv_cap), one = _mm256_set1_ps(1.0f);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 l = _mm256_loadu_ps(x + c);
    const __m256 r = _mm256_mul_ps(l, ic);
    const __m256 e = exp8(_mm256_sub_ps(l, _mm256_loadu_ps(lse + c)));
    _mm256_storeu_ps(x + c, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(g + c), e), _mm256_fnmadd_ps(r, r, one)));
  }
  col_softcap_grad_scalar(x + c, lse + c, g + c, n - c, inv_cap);
}
#endif

#ifdef FASTALIGN_X86_SIMD
// AVX-512 versions of the exp passes (the column passes' cost): the same Cephes polynomial as exp8, 16 lanes, 2^n by
// vscalefps; inputs below -87.3 give 0 as in exp8. 1.65x the AVX2 pass's speed on a Zen 4 core (bf16 tile), same
// results bit for bit.
__attribute__((target("avx512f,avx512bw"))) inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(ExpPoly::kLo), hi = _mm512_set1_ps(ExpPoly::kHi);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_max_ps(_mm512_min_ps(x, hi), lo);
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(ExpPoly::kLog2e), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(ExpPoly::kLn2Hi), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(ExpPoly::kLn2Lo), x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(ExpPoly::kCoeff[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(ExpPoly::kCoeff[i]));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, z, x), _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(y, fx));
}

__attribute__((target("avx512f,avx512bw"))) inline void col_exp_acc_avx512(float* x, const float* shift, float* acc,
                                                                           int64_t n, bool store) {
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + c), _mm512_loadu_ps(shift + c)));
    if (store) _mm512_storeu_ps(x + c, e);
    _mm512_storeu_ps(acc + c, _mm512_add_ps(_mm512_loadu_ps(acc + c), e));
  }
  if (c < n) col_exp_acc_avx2(x + c, shift + c, acc + c, n - c, store);
}

inline bool cpu_has_avx512() {
  __builtin_cpu_init();
  return kHasAvx2 && cpu_isa_cap() >= 3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}
static const bool kHasAvx512 = cpu_has_avx512();
#endif

template <typename T>
void col_max(const T* x, T* acc, int64_t n) { col_max_scalar(x, acc, n); }
template <typename T>
void col_exp_acc(T* x, const T* shift, T* acc, int64_t n, bool store) { col_exp_acc_scalar(x, shift, acc, n, store); }
template <typename T>
void col_scale(T* x, const T* f, int64_t n) { col_scale_scalar(x, f, n); }
template <typename T>
void col_softcap_grad(T* x, const T* lse, const T* g, int64_t n, T inv_cap) {
  col_softcap_grad_scalar(x, lse, g, n, inv_cap);
}
#ifdef FASTALIGN_X86_SIMD
template <>
inline void col_max<float>(const float* x, float* acc, int64_t n) {
  if (kHasAvx2) col_max_avx2(x, acc, n); else col_max_scalar(x, acc, n);
}
template <>
inline void col_exp_acc<float>(float* x, const float* shift, float* acc, int64_t n, bool store) {
  if (kHasAvx512) col_exp_acc_avx512(x, shift, acc, n, store);
  else if (kHasAvx2) col_exp_acc_avx2(x, shift, acc, n, store);
  else col_exp_acc_scalar(x, shift, acc, n, store);
}
template <>
inline void col_scale<float>(float* x, const float* f, int64_t n) {
  if (kHasAvx2) col_scale_avx2(x, f, n); else col_scale_scalar(x, f, n);
}
template <>
inline void col_softcap_grad<float>(float* x, const float* lse, const float* g, int64_t n, float inv_cap) {
  if (kHasAvx2) col_softcap_grad_avx2(x, lse, g, n, inv_cap); else col_softcap_grad_scalar(x, lse, g, n, inv_cap);
}
#endif

}  // namespace fastalign_rows

// ---- the same two reductions on a bf16 / fp16 tile (no softcap): statistics in fp32, exp(l - shift) stored back
// in the tile's type (it feeds the GEMMs that run in that type) ----

namespace fastalign_rows {

template <typename S>
void col_max_narrow_scalar(const S* x, float* acc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) acc[c] = std::max(acc[c], static_cast<float>(x[c]));
}

template <typename S>
void col_exp_store_narrow_scalar(S* x, const float* shift, float* acc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const float e = std::exp(static_cast<float>(x[c]) - shift[c]);
    x[c] = static_cast<S>(e);
    acc[c] += e;  // the unrounded value: lse (hence logp) as exact as with an fp32 tile
  }
}

#ifdef FASTALIGN_X86_SIMD
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// round to nearest even (finite inputs: here values of exp in [0, 1])
__attribute__((target("avx2,fma,f16c"))) inline void store8(c10::BFloat16* p, __m256 v) {
  __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
__attribute__((target("avx2,fma,f16c"))) inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

template <typename S>
__attribute__((target("avx2,fma,f16c"))) void col_max_narrow_avx2(const S* x, float* acc, int64_t n) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) _mm256_storeu_ps(acc + c, _mm256_max_ps(_mm256_loadu_ps(acc + c), load8(x + c)));
  col_max_narrow_scalar(x + c, acc + c, n - c);
}

template <typename S>
__attribute__((target("avx2,fma,f16c"))) void col_exp_store_narrow_avx2(S* x, const float* shift, float* acc,
                                                                       int64_t n) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 e = exp8(_mm256_sub_ps(load8(x + c), _mm256_loadu_ps(shift + c)));
    store8(x + c, e);
    _mm256_storeu_ps(acc + c, _mm256_add_ps(_mm256_loadu_ps(acc + c), e));
  }
  col_exp_store_narrow_scalar(x + c, shift + c, acc + c, n - c);
}

__attribute__((target("avx512f,avx512bw"))) inline __m512 load16(const c10::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
__attribute__((target("avx512f,avx512bw"))) inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
__attribute__((target("avx512f,avx512bw"))) inline void store16(c10::BFloat16* p, __m512 v) {
  __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(b));
}
__attribute__((target("avx512f,avx512bw"))) inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

template <typename S>
__attribute__((target("avx512f,avx512bw"))) void col_exp_store_narrow_avx512(S* x, const float* shift, float* acc,
                                                                            int64_t n) {
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 e = exp16(_mm512_sub_ps(load16(x + c), _mm512_loadu_ps(shift + c)));
    store16(x + c, e);
    _mm512_storeu_ps(acc + c, _mm512_add_ps(_mm512_loadu_ps(acc + c), e));
  }
  if (c < n) col_exp_store_narrow_avx2(x + c, shift + c, acc + c, n - c);
}

inline bool cpu_has_f16c() {
  __builtin_cpu_init();
  return kHasAvx2 && __builtin_cpu_supports("f16c");
}
static const bool kHasF16c = cpu_has_f16c();
#else
static const bool kHasF16c = false;
#endif

template <typename S>
void col_max_narrow(const S* x, float* acc, int64_t n) {
#ifdef FASTALIGN_X86_SIMD
  if (kHasF16c) return col_max_narrow_avx2(x, acc, n);
#endif
  col_max_narrow_scalar(x, acc, n);
}

template <typename S>
void col_exp_store_narrow(S* x, const float* shift, float* acc, int64_t n) {
#ifdef FASTALIGN_X86_SIMD
  if (kHasAvx512 && kHasF16c) return col_exp_store_narrow_avx512(x, shift, acc, n);
  if (kHasF16c) return col_exp_store_narrow_avx2(x, shift, acc, n);
#endif
  col_exp_store_narrow_scalar(x, shift, acc, n);
}

}  // namespace fastalign_rows
