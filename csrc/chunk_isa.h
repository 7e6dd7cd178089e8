// The vector operations of the fused thin-chunk kernel's register tiles (chunk_tiles.h), once per instruction set:
// isa_avx512 (16 floats per register, 32 registers) and isa_avx2 (8 floats, AVX2 + FMA, 16 registers). chunk_tiles.h
// is written once against these names and compiled into one namespace per instruction set
// (linear_logprobs_chunk.cpp), each with its own target attribute (FASTALIGN_ISA), so that the AVX2 build of a tile
// holds no AVX-512 instruction and runs on CPUs without it (AMD Zen 2 and Zen 3, Intel before Skylake-SP).
//
// Per set, the tile shapes (accumulators held in registers; a few registers left for the operands):
//   (a) d_W's update: kALines lines x 3 registers (AVX-512: 8 x 48 columns, 24 accumulators; AVX2: 4 x 24, 12)
//   (b), (c): 6 lines x kTileVecs registers (AVX-512: 6 x 64 columns, 24 accumulators; AVX2: 6 x 16, 12)
#pragma once

#include "arch.h"

#ifdef FASTALIGN_X86_SIMD
#include "col_math.h"
#include "row_math.h"

#include <immintrin.h>

#include <cstdint>

#define FASTALIGN_AVX512 __attribute__((target("avx512f,avx512bw")))
#define FASTALIGN_AVX2 __attribute__((target("avx2,fma")))
#define FASTALIGN_VEC_INLINE inline __attribute__((always_inline))

namespace isa_avx512 {
using vec = __m512;
constexpr int64_t kLanes = 16, kALines = 8, kTileVecs = 4;
FASTALIGN_AVX512 FASTALIGN_VEC_INLINE vec vzero() { return _mm512_setzero_ps(); }
FASTALIGN_AVX512 FASTALIGN_VEC_INLINE vec vload(const float* p) { return _mm512_loadu_ps(p); }
FASTALIGN_AVX512 FASTALIGN_VEC_INLINE void vstore(float* p, vec x) { _mm512_storeu_ps(p, x); }
FASTALIGN_AVX512 FASTALIGN_VEC_INLINE vec vset1(float x) { return _mm512_set1_ps(x); }
FASTALIGN_AVX512 FASTALIGN_VEC_INLINE vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
FASTALIGN_AVX512 FASTALIGN_VEC_INLINE vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
FASTALIGN_AVX512 FASTALIGN_VEC_INLINE vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
FASTALIGN_AVX512 FASTALIGN_VEC_INLINE vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
FASTALIGN_AVX512 FASTALIGN_VEC_INLINE vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
FASTALIGN_AVX512 FASTALIGN_VEC_INLINE vec vexp(vec x) { return fastalign_rows::exp16(x); }
FASTALIGN_AVX512 FASTALIGN_VEC_INLINE float vsum(vec x) { return _mm512_reduce_add_ps(x); }
// The first n lanes (n < kLanes allowed): loads fill the rest with zeros, stores leave it alone
FASTALIGN_AVX512 FASTALIGN_VEC_INLINE __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
}
FASTALIGN_AVX512 FASTALIGN_VEC_INLINE vec vload_n(const float* p, int64_t n) {
  return _mm512_maskz_loadu_ps(lanes(n), p);
}
FASTALIGN_AVX512 FASTALIGN_VEC_INLINE void vstore_n(float* p, int64_t n, vec x) {
  _mm512_mask_storeu_ps(p, lanes(n), x);
}
}  // namespace isa_avx512

namespace isa_avx2 {
using vec = __m256;
constexpr int64_t kLanes = 8, kALines = 4, kTileVecs = 2;
FASTALIGN_AVX2 FASTALIGN_VEC_INLINE vec vzero() { return _mm256_setzero_ps(); }
FASTALIGN_AVX2 FASTALIGN_VEC_INLINE vec vload(const float* p) { return _mm256_loadu_ps(p); }
FASTALIGN_AVX2 FASTALIGN_VEC_INLINE void vstore(float* p, vec x) { _mm256_storeu_ps(p, x); }
FASTALIGN_AVX2 FASTALIGN_VEC_INLINE vec vset1(float x) { return _mm256_set1_ps(x); }
FASTALIGN_AVX2 FASTALIGN_VEC_INLINE vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
FASTALIGN_AVX2 FASTALIGN_VEC_INLINE vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
FASTALIGN_AVX2 FASTALIGN_VEC_INLINE vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
FASTALIGN_AVX2 FASTALIGN_VEC_INLINE vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
FASTALIGN_AVX2 FASTALIGN_VEC_INLINE vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
FASTALIGN_AVX2 FASTALIGN_VEC_INLINE vec vexp(vec x) { return fastalign_rows::exp8(x); }
FASTALIGN_AVX2 FASTALIGN_VEC_INLINE float vsum(vec x) { return fastalign_rows::hsum8(x); }
// The first n lanes as a maskload / maskstore mask (lane i on where i < n)
FASTALIGN_AVX2 FASTALIGN_VEC_INLINE __m256i lanes(int64_t n) {
  const __m256i count = _mm256_set1_epi32(static_cast<int>(n < 8 ? n : 8));
  return _mm256_cmpgt_epi32(count, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
FASTALIGN_AVX2 FASTALIGN_VEC_INLINE vec vload_n(const float* p, int64_t n) { return _mm256_maskload_ps(p, lanes(n)); }
FASTALIGN_AVX2 FASTALIGN_VEC_INLINE void vstore_n(float* p, int64_t n, vec x) { _mm256_maskstore_ps(p, lanes(n), x); }
}  // namespace isa_avx2

#endif
