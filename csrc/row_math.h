// Row primitives shared by the CPU kernels: max, sum of exp, scaled exp and softcap over one contiguous row.
// Scalar templates for any type; AVX2/FMA versions for float, chosen at run time (kHasAvx2) so that one
// build runs on every x86-64 CPU. Everything here is inline/internal to each translation unit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "arch.h"

#ifdef FASTALIGN_X86_SIMD
#include <immintrin.h>
#endif

namespace fastalign_rows {

constexpr int64_t kRowGrain = 8;  // rows per parallel task at least

// ---- row primitives: scalar for any type, AVX2/FMA for float when the CPU has it ----

template <typename T>
T row_max_scalar(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

template <typename T>
T exp_sum_scalar(const T* x, int64_t n, T shift) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}

// out[i] = scale * exp(x[i] - shift), in place allowed; returns max of exp(x[i] - shift).
template <typename T>
T scaled_exp_scalar(T* x, int64_t n, T shift, T scale) {
  T pmax = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T p = std::exp(x[i] - shift);
    pmax = std::max(pmax, p);
    x[i] = scale * p;
  }
  return pmax;
}

#ifdef FASTALIGN_X86_SIMD
// exp for 8 floats: Cephes' expf (range reduction by ln 2, degree-6 polynomial), within 2 ulp; inputs below
// -87.3 give 0 (softmax terms that small do not change an fp32 sum).
// Cephes' expf constants, shared by exp8 and col_math.h's exp16: clamp bounds, ln 2 split into a part exact in fp32
// and the rest, and the polynomial for e^r - 1 - r over r^2 on [-ln2/2, ln2/2] (highest degree first).
struct ExpPoly {
  static constexpr float kLo = -87.3365447504f, kHi = 88.3762626647949f, kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr float kCoeff[6] = {1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f,
                                      4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f};
};

__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(ExpPoly::kLo), hi = _mm256_set1_ps(ExpPoly::kHi);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(ExpPoly::kLog2e), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(ExpPoly::kLn2Hi), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(ExpPoly::kLn2Lo), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(ExpPoly::kCoeff[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(ExpPoly::kCoeff[i]));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n)));
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline float row_max_avx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  float r = hmax8(m);
  for (; i < n; ++i) r = std::max(r, x[i]);
  return r;
}

__attribute__((target("avx2,fma"))) inline float exp_sum_avx2(const float* x, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_add_ps(acc0, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh)));
    acc1 = _mm256_add_ps(acc1, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), sh)));
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_add_ps(acc0, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh)));
  float s = hsum8(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}

__attribute__((target("avx2,fma"))) inline float scaled_exp_avx2(float* x, int64_t n, float shift, float scale) {
  const __m256 sh = _mm256_set1_ps(shift), sc = _mm256_set1_ps(scale);
  __m256 pm = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
    pm = _mm256_max_ps(pm, p);
    _mm256_storeu_ps(x + i, _mm256_mul_ps(sc, p));
  }
  float pmax = hmax8(pm);
  for (; i < n; ++i) {
    const float p = std::exp(x[i] - shift);
    pmax = std::max(pmax, p);
    x[i] = scale * p;
  }
  return pmax;
}

inline bool cpu_has_avx2() {
  __builtin_cpu_init();  // may run before libgcc's own constructor: initialise explicitly
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
static const bool kHasAvx2 = cpu_has_avx2();
#else
static const bool kHasAvx2 = false;
#endif

template <typename T>
T row_max(const T* x, int64_t n) { return row_max_scalar(x, n); }
template <typename T>
T exp_sum(const T* x, int64_t n, T shift) { return exp_sum_scalar(x, n, shift); }
template <typename T>
T scaled_exp(T* x, int64_t n, T shift, T scale) { return scaled_exp_scalar(x, n, shift, scale); }
#ifdef FASTALIGN_X86_SIMD
template <>
inline float row_max<float>(const float* x, int64_t n) { return kHasAvx2 ? row_max_avx2(x, n) : row_max_scalar(x, n); }
template <>
inline float exp_sum<float>(const float* x, int64_t n, float shift) {
  return kHasAvx2 ? exp_sum_avx2(x, n, shift) : exp_sum_scalar(x, n, shift);
}
template <>
inline float scaled_exp<float>(float* x, int64_t n, float shift, float scale) {
  return kHasAvx2 ? scaled_exp_avx2(x, n, shift, scale) : scaled_exp_scalar(x, n, shift, scale);
}
#endif

template <typename T>
void softcap_row_scalar(T* x, int64_t n, T cap) {
  const T inv = T(1) / cap;
  for (int64_t i = 0; i < n; ++i) x[i] = cap * std::tanh(x[i] * inv);
}

#ifdef FASTALIGN_X86_SIMD
// x <- cap * tanh(x / cap) for 8 floats at a time: tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|), which
// never overflows and keeps the relative error near 1e-7 (at |u| < 0.01 the odd Taylor series u - u^3/3 + 2u^5/15
// avoids the cancellation in 1 - e). std::tanh per element made the softcap pass ~2x the GEMM's time (Gemma-2).
__attribute__((target("avx2,fma"))) inline void softcap_row_avx2(float* x, int64_t n, float cap) {
  const __m256 inv = _mm256_set1_ps(1.0f / cap), c = _mm256_set1_ps(cap), one = _mm256_set1_ps(1.0f);
  const __m256 sign_mask = _mm256_set1_ps(-0.0f), small = _mm256_set1_ps(0.01f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 u = _mm256_mul_ps(_mm256_loadu_ps(x + i), inv);
    const __m256 sign = _mm256_and_ps(u, sign_mask);
    const __m256 a = _mm256_andnot_ps(sign_mask, u);
    const __m256 e = exp8(_mm256_mul_ps(a, _mm256_set1_ps(-2.0f)));
    __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    const __m256 a2 = _mm256_mul_ps(a, a);
    const __m256 series = _mm256_mul_ps(a, _mm256_fmadd_ps(a2, _mm256_fmadd_ps(a2, _mm256_set1_ps(2.0f / 15.0f),
                                                                                 _mm256_set1_ps(-1.0f / 3.0f)), one));
    t = _mm256_blendv_ps(t, series, _mm256_cmp_ps(a, small, _CMP_LT_OQ));
    _mm256_storeu_ps(x + i, _mm256_mul_ps(c, _mm256_or_ps(t, sign)));
  }
  for (; i < n; ++i) x[i] = cap * std::tanh(x[i] / cap);
}
#endif

template <typename T>
void softcap_row(T* x, int64_t n, T cap) { softcap_row_scalar(x, n, cap); }
#ifdef FASTALIGN_X86_SIMD
template <>
inline void softcap_row<float>(float* x, int64_t n, float cap) {
  if (kHasAvx2) softcap_row_avx2(x, n, cap); else softcap_row_scalar(x, n, cap);
}
#endif

}  // namespace fastalign_rows
