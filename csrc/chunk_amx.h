// fp32 products on AMX (Intel Advanced Matrix Extensions, Sapphire Rapids and later) for the fused thin-chunk
// kernel's d_weight update (linear_logprobs_chunk.cpp, part (a)), at fp32 accuracy: each fp32 operand x is split
// exactly into three bf16 parts, x = x1 + x2 + x3 (8 significant bits each, each rounded to nearest), and a b is
// summed as the six part products whose orders add up to at most 2 (a1 b1 + a1 b2 + a2 b1 + a1 b3 + a2 b2 + a3 b1)
// in AMX's fp32 accumulators. bf16 x bf16 products are exact in fp32; what is left out (a2 b3, a3 b2, a3 b3) is below
// 2^-24 of |a b|. Not IEEE fp32 at the edges: an infinite (or > 3.39e38, which rounds to infinity in bf16) operand
// gives NaN (inf - inf in the split) where fp32 gives inf, and AMX takes bf16 denormals as 0, so the parts of values
// below about 2^-110 are dropped (an absolute error under 1e-33). Measured against float64 on [256, 1024] x
// [1024, 256] N(0, 1) matrices (the six products emulated in torch, summed in fp32): relative Frobenius error 1.5e-7,
// torch.mm in fp32 3.4e-7 (ad hoc, this 2-core Xeon).
//
// One tile product does 16 x 16 x 32 multiply-adds: 3.1 TFLOP/s of bf16 per core here with the tiles in registers,
// so six of them still outrun AVX-512's fp32 FMAs (236 GFLOP/s per core) where the operands come from L1 / L2. They
// did for (a) (its A operand, a block's E' lines, is small; its B operand, the chunk's scaled hidden rows, is split
// once per chunk), and they do for (c) (logits_gemm below), whose W lines are split as they are used. Splitting W's
// block into panels first, for (b) and (c) together (ad hoc, N=2048 H=1024 64 rows: 1.26x the floor against 1.15x
// with AMX for (a) alone) or for (b) alone (middle chunks 61.6 against 47.3 ms), was slower than AVX-512: (b) stays
// on AVX-512 (2026-12-07; see the README's CPU goal).
//
// Layouts (bf16 as uint16_t), per part s:
//   A panel (split_rows): per 16-row tile rt and 32-deep K step kt one contiguous 1 KB tile [16][32] at
//     (rt kts + kt) 512 (kts = K / 32): a tile load reads 1 KB in a row.
//   B panel (pack_b_rows): the VNNI layout, per 16-column tile ct and K step kt one 1 KB tile [16][32] at
//     (ct kts + kt) 512: element (k, n) at row (k % 32) / 2, column 2 (n % 16) + k % 2.
#pragma once

// AMX intrinsics: gcc >= 11, clang >= 12; the tile state's permission: Linux (arch_prctl). Elsewhere the AVX-512 path
// runs and the functions below are stubs that are never called (supported() is false). FASTALIGN_NO_AMX builds that
// variant here (tests/test_portable_build.py).
#include "arch.h"

#if defined(FASTALIGN_X86_SIMD) && defined(__linux__) && !defined(FASTALIGN_NO_AMX) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define FASTALIGN_HAVE_AMX 1
#else
#define FASTALIGN_HAVE_AMX 0
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#if FASTALIGN_HAVE_AMX
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FASTALIGN_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")))
#endif

namespace fastalign_amx {

// set_chunk_amx(False) turns the AMX path off (the AVX-512 one then runs everywhere; results differ in rounding)
inline std::atomic<bool>& enabled() {
  static std::atomic<bool> on{true};
  return on;
}

#if FASTALIGN_HAVE_AMX

// Linux hands out AMX's 8 KB of tile state only to a process that asks for it (arch_prctl, once per process).
inline bool request_tile_state() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// CPUID leaf 7: AMX-BF16 (sub-leaf 0, EDX bit 22), AMX-TILE (EDX bit 24), AVX512-BF16 (sub-leaf 1, EAX bit 5). Read
// directly: clang before 18 rejects these names in __builtin_cpu_supports.
inline bool cpu_has_amx_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tiles = (d >> 22 & 1u) && (d >> 24 & 1u);
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return tiles && (a >> 5 & 1u);
}

// Whether this CPU and OS can run the AMX path: AMX-TILE, AMX-BF16 and AVX512-BF16, and the kernel's permission (a
// kernel without AMX support refuses it).
inline bool supported() {
  static const bool ok = cpu_isa_cap() >= 4 && cpu_has_amx_bf16() && request_tile_state();
  return ok;
}

// All 8 tiles as 16 rows of 64 bytes (C: 16 x 16 fp32; A: 16 x 32 bf16; B: 16 pairs of K x 16 columns). Each thread
// that runs tile instructions configures its own tiles and releases them when done.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

FASTALIGN_AMX inline void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // GCC 12's _tile_loadconfig tells the compiler it reads 8 bytes of the config: without this barrier the stores
  // above are dropped as dead and the tiles stay unconfigured (SIGILL at the first tile instruction)
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

FASTALIGN_AMX inline void release_tiles() { _tile_release(); }

// Tiles configured for a scope (a thread's share of the blocks), released however it ends
struct TileScope {
  bool on;
  explicit TileScope(bool use) : on(use) {
    if (on) configure_tiles();
  }
  ~TileScope() {
    if (on) release_tiles();
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// bf16 -> fp32 is exact: the bf16 bits are the fp32's upper half
FASTALIGN_AMX inline __m512 widen(__m256i b) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// x = x1 + x2 + x3 exactly (round to nearest each time; each remainder is exact in fp32)
FASTALIGN_AMX inline void split16(__m512 x, __m256i& x1, __m256i& x2, __m256i& x3) {
  x1 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
  const __m512 r1 = _mm512_sub_ps(x, widen(x1));
  x2 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(r1));
  x3 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_sub_ps(r1, widen(x2))));
}

// src [rows, n] fp32 (lines of ld_src floats), rows a multiple of 16 -> parts: an A panel of K = n rounded up to 32,
// zeros past n (src's columns past n are not read: whatever they hold, NaN included, cannot reach a product)
FASTALIGN_AMX inline void split_rows(const float* src, int64_t ld_src, int64_t rows, int64_t n,
                                     uint16_t* const parts[3]) {
  const int64_t kts = (n + 31) / 32, n16 = (n + 15) / 16 * 16;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < n; k += 16) {
      __m256i x[3];
      const __mmask16 valid = n - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - k)) - 1u);
      split16(_mm512_maskz_loadu_ps(valid, src + r * ld_src + k), x[0], x[1], x[2]);
      const int64_t off = ((r / 16) * kts + k / 32) * 512 + (r % 16) * 32 + k % 32;
      for (int s = 0; s < 3; ++s) _mm256_storeu_si256(reinterpret_cast<__m256i*>(parts[s] + off), x[s]);
    }
    if (n16 % 32 != 0) {
      const int64_t off = ((r / 16) * kts + n16 / 32) * 512 + (r % 16) * 32 + 16;
      for (int s = 0; s < 3; ++s)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(parts[s] + off), _mm256_setzero_si256());
    }
  }
}

// src [rows_k, N] fp32 (lines of ld_src floats), N a multiple of 16 -> parts: a B panel of K = rows_k rounded up to
// 32 (zeros past rows_k); k_halves: each K step's pairs are (k, k + 16) for k < 16, split_w_tile's order
FASTALIGN_AMX inline void pack_b_rows(const float* src, int64_t ld_src, int64_t rows_k, int64_t N,
                                      uint16_t* const parts[3], bool k_halves = false) {
  const int64_t kts = (rows_k + 31) / 32;
  for (int s = 0; s < 3; ++s) std::memset(parts[s], 0, sizeof(uint16_t) * kts * 32 * N);
  alignas(32) uint16_t p[3][16];
  for (int64_t k = 0; k < rows_k; ++k)
    for (int64_t n = 0; n < N; n += 16) {
      __m256i x[3];
      split16(_mm512_loadu_ps(src + k * ld_src + n), x[0], x[1], x[2]);
      for (int s = 0; s < 3; ++s) _mm256_store_si256(reinterpret_cast<__m256i*>(p[s]), x[s]);
      const int64_t kk = k % 32, base = ((n / 16) * kts + k / 32) * 512 +
                                        (k_halves ? (kk % 16) * 32 + kk / 16 : (kk / 2) * 32 + kk % 2);
      for (int64_t q = 0; q < 16; ++q)
        for (int s = 0; s < 3; ++s) parts[s][base + 2 * q] = p[s][q];
    }
}

// C[R 16 rows, Q 16 columns] (+)= A B over kts K steps, with the six part products; A from row tile rt0, B from
// column tile ct0; C: fp32 lines of ldc floats. Tiles: C in 0..3, A in 4..5, B in 6..7.
template <int R, int Q>
FASTALIGN_AMX inline void tile_product(uint16_t* const a_parts[3], int64_t rt0, uint16_t* const b_parts[3], int64_t ct0,
                                       int64_t kts, float* c, int64_t ldc, bool accumulate) {
  const int64_t c_stride = ldc * 4;
  if (accumulate) {
    _tile_loadd(0, c, c_stride);
    if (Q == 2) _tile_loadd(1, c + 16, c_stride);
    if (R == 2) _tile_loadd(2, c + 16 * ldc, c_stride);
    if (R == 2 && Q == 2) _tile_loadd(3, c + 16 * ldc + 16, c_stride);
  } else {
    _tile_zero(0);
    if (Q == 2) _tile_zero(1);
    if (R == 2) _tile_zero(2);
    if (R == 2 && Q == 2) _tile_zero(3);
  }
  for (int64_t kt = 0; kt < kts; ++kt)
    for (int i = 0; i < 3; ++i) {
      const uint16_t* a = a_parts[i] + (rt0 * kts + kt) * 512;
      _tile_loadd(4, a, 64);
      if (R == 2) _tile_loadd(5, a + kts * 512, 64);
      for (int j = 0; j < 3 - i; ++j) {
        const uint16_t* b = b_parts[j] + (ct0 * kts + kt) * 512;
        _tile_loadd(6, b, 64);
        if (Q == 2) _tile_loadd(7, b + kts * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (Q == 2) _tile_dpbf16ps(1, 4, 7);
        if (R == 2) _tile_dpbf16ps(2, 5, 6);
        if (R == 2 && Q == 2) _tile_dpbf16ps(3, 5, 7);
      }
    }
  _tile_stored(0, c, c_stride);
  if (Q == 2) _tile_stored(1, c + 16, c_stride);
  if (R == 2) _tile_stored(2, c + 16 * ldc, c_stride);
  if (R == 2 && Q == 2) _tile_stored(3, c + 16 * ldc + 16, c_stride);
}

// C [rows, N] (+)= A [rows, K] B [K, N] (panels), rows a multiple of 16, N of 16, K zero-padded to 32: 2 x 2 tiles
// at a time, column pairs outside (B's tiles come from L2 once; A's small panel stays in L1)
FASTALIGN_AMX inline void tile_gemm(uint16_t* const a_parts[3], int64_t rows, uint16_t* const b_parts[3], int64_t N,
                                    int64_t K, float* c, int64_t ldc, bool accumulate) {
  // GCC's tileloadd is an asm with no memory clobber: the panels' stores must not sink past it
  asm volatile("" : : : "memory");
  const int64_t rt = rows / 16, nt = N / 16, kts = (K + 31) / 32;
  for (int64_t q = 0; q < nt; q += 2)
    for (int64_t r = 0; r < rt; r += 2) {
      float* cc = c + r * 16 * ldc + q * 16;
      const bool r2 = r + 1 < rt, q2 = q + 1 < nt;
      if (r2 && q2) tile_product<2, 2>(a_parts, r, b_parts, q, kts, cc, ldc, accumulate);
      else if (r2) tile_product<2, 1>(a_parts, r, b_parts, q, kts, cc, ldc, accumulate);
      else if (q2) tile_product<1, 2>(a_parts, r, b_parts, q, kts, cc, ldc, accumulate);
      else tile_product<1, 1>(a_parts, r, b_parts, q, kts, cc, ldc, accumulate);
    }
}

// (c) on AMX: logits [rows, N] = W [rows, K] next_hidden^T [K, N]. W's block is not split into a panel of its own
// (a pass that wrote 1.5x the block's bytes and read them back from L2: (c) took 27.7 ms per 64-row chunk at H=1024,
// against 17.6 ms on AVX-512, ad hoc); each 16 lines x 32 K of it is split just before its products, into a 3 KB
// buffer that stays in L1 (12 ms). The split truncates (x1 = x with its low 16 bits cleared, x2 the same of x - x1,
// x3 = the rest, which has at most 8 significant bits: exact, like the rounded split, with bit operations only, and
// each part's row of 32 bf16 packed by one ternary-logic operation per 16 floats). Its K order within a step: position
// 2i holds k = i and 2i + 1 holds k = 16 + i; the B panel is packed in the same order (pack_b_rows, k_halves), and its
// parts rounded. What is left out is below 2^-23 of |a b| (a3 b2 + a2 b3 + a3 b3, with |a2| < 2^-7 |a|,
// |a3| < 2^-15 |a|, |b2| <= 2^-8 |b|, |b3| <= 2^-17 |b|; a search over every fp32 mantissa found 2^-23.44 at most).
// The accumulators are stored and summed in fp32 every 256 of K (kLogitsSegment K steps): summing all of K in AMX's
// accumulators gave 5.0e-7 relative Frobenius error at H=4096 (torch.mm 3.5e-7, AVX-512's FMAs 2.3e-7); per segment
// 1.6e-7 (ad hoc, N(0, 1) x 0.02 W against N(0, 1) rows, float64 reference).
FASTALIGN_AMX inline void split_w_tile(const float* src, int64_t ld, uint16_t* dst) {
  const __m512i hi16 = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int r = 0; r < 16; ++r) {
    __m512i lo = _mm512_castps_si512(_mm512_loadu_ps(src + r * ld));
    __m512i hi = _mm512_castps_si512(_mm512_loadu_ps(src + r * ld + 16));
    for (int s = 0; s < 3; ++s) {
      // (hi & 0xFFFF0000) | (lo >> 16): each 32-bit lane holds lo's part (k = i) below hi's (k = 16 + i)
      _mm512_store_si512(dst + s * 512 + r * 32, _mm512_ternarylogic_epi32(hi, hi16, _mm512_srli_epi32(lo, 16), 0xEA));
      if (s == 2) break;
      lo = _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(lo), _mm512_castsi512_ps(_mm512_and_si512(lo, hi16))));
      hi = _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(hi), _mm512_castsi512_ps(_mm512_and_si512(hi, hi16))));
    }
  }
}

constexpr int64_t kLogitsSegment = 8;  // K steps of 32 summed in AMX's accumulators before they go to fp32

// the six part products of K step kt into C tile Q (a literal: the tile intrinsics take tile numbers as immediates),
// A's parts in tiles 4..6, B's loaded into tile 7 one part at a time
#define FASTALIGN_PRODUCTS_Q(Q, ct)                               \
  do {                                                            \
    _tile_loadd(7, b_parts[0] + ((ct) * kts + kt) * 512, 64);    \
    _tile_dpbf16ps(Q, 4, 7);                                      \
    _tile_dpbf16ps(Q, 5, 7);                                      \
    _tile_dpbf16ps(Q, 6, 7);                                      \
    _tile_loadd(7, b_parts[1] + ((ct) * kts + kt) * 512, 64);    \
    _tile_dpbf16ps(Q, 4, 7);                                      \
    _tile_dpbf16ps(Q, 5, 7);                                      \
    _tile_loadd(7, b_parts[2] + ((ct) * kts + kt) * 512, 64);    \
    _tile_dpbf16ps(Q, 4, 7);                                      \
  } while (0)

// 16 lines of logits, NQ column tiles from q0: c [16, 16 NQ] = w [16, 32 kts] B; next: lines of the coming block to
// prefetch into L2 alongside (the same K slice of each, or null)
template <int NQ>
FASTALIGN_AMX inline void logits_columns(const float* w, int64_t ldw, uint16_t* const b_parts[3], int64_t q0,
                                         int64_t kts, float* c, int64_t ldc, const float* next, int next_lines,
                                         uint16_t* buf, float* segment) {
  for (int64_t k0 = 0; k0 < kts; k0 += kLogitsSegment) {
    _tile_zero(0);
    if (NQ > 1) _tile_zero(1);
    if (NQ > 2) _tile_zero(2);
    if (NQ > 3) _tile_zero(3);
    for (int64_t kt = k0; kt < std::min(kts, k0 + kLogitsSegment); ++kt) {
      uint16_t* parts = buf + (kt & 1) * 1536;  // two buffers: the next step's split need not wait for these loads
      split_w_tile(w + kt * 32, ldw, parts);
      for (int r = 0; r < next_lines; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(next + r * ldw + kt * 32), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(next + r * ldw + kt * 32 + 16), _MM_HINT_T1);
      }
      asm volatile("" : : : "memory");  // GCC's tileloadd has no memory clobber: the split's stores come first
      _tile_loadd(4, parts, 64);
      _tile_loadd(5, parts + 512, 64);
      _tile_loadd(6, parts + 1024, 64);
      FASTALIGN_PRODUCTS_Q(0, q0);
      if (NQ > 1) FASTALIGN_PRODUCTS_Q(1, q0 + 1);
      if (NQ > 2) FASTALIGN_PRODUCTS_Q(2, q0 + 2);
      if (NQ > 3) FASTALIGN_PRODUCTS_Q(3, q0 + 3);
    }
    float* dst = k0 == 0 ? c + q0 * 16 : segment;  // the first segment straight into c, the others added to it
    const int64_t ld_dst = k0 == 0 ? ldc : 64;
    _tile_stored(0, dst, ld_dst * 4);
    if (NQ > 1) _tile_stored(1, dst + 16, ld_dst * 4);
    if (NQ > 2) _tile_stored(2, dst + 32, ld_dst * 4);
    if (NQ > 3) _tile_stored(3, dst + 48, ld_dst * 4);
    if (k0 > 0) {
      asm volatile("" : : : "memory");
      for (int r = 0; r < 16; ++r)
        for (int q = 0; q < NQ; ++q) {
          float* o = c + r * ldc + (q0 + q) * 16;
          _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_load_ps(segment + r * 64 + q * 16)));
        }
    }
  }
}

// c [rows, N] = w [rows, K] B [K, N]: w fp32 lines of ldw floats (rows a multiple of 16, K of 32), B a panel of
// next_hidden^T (pack_b_rows with k_halves; N a multiple of 16), c lines of ldc floats. w_next: the coming block's
// first line, next_rows of them, prefetched into L2 as this block's lines are split (null: none).
FASTALIGN_AMX inline void logits_gemm(const float* w, int64_t ldw, int64_t rows, uint16_t* const b_parts[3], int64_t N,
                                      int64_t K, float* c, int64_t ldc, const float* w_next, int64_t next_rows) {
  asm volatile("" : : : "memory");
  const int64_t kts = K / 32, nt = N / 16;
  alignas(64) uint16_t buf[2 * 1536];
  alignas(64) float segment[16 * 64];
  for (int64_t rt = 0; rt < rows / 16; ++rt) {
    const float* wr = w + rt * 16 * ldw;
    float* cr = c + rt * 16 * ldc;
    const float* nr = w_next != nullptr ? w_next + rt * 16 * ldw : nullptr;
    // the coming block's lines at this row tile's place; the last row tile takes the rest of them
    const int n_lines = nr == nullptr ? 0 : static_cast<int>(std::max<int64_t>(
        0, rt + 1 < rows / 16 ? std::min<int64_t>(16, next_rows - rt * 16) : next_rows - rt * 16));
    for (int64_t q0 = 0; q0 < nt; q0 += 4) {
      const int64_t nq = std::min<int64_t>(4, nt - q0);
      // the prefetches go with the first column group only
      const int pl = q0 == 0 ? n_lines : 0;
      if (nq == 4) logits_columns<4>(wr, ldw, b_parts, q0, kts, cr, ldc, nr, pl, buf, segment);
      else if (nq == 3) logits_columns<3>(wr, ldw, b_parts, q0, kts, cr, ldc, nr, pl, buf, segment);
      else if (nq == 2) logits_columns<2>(wr, ldw, b_parts, q0, kts, cr, ldc, nr, pl, buf, segment);
      else logits_columns<1>(wr, ldw, b_parts, q0, kts, cr, ldc, nr, pl, buf, segment);
    }
  }
}

#undef FASTALIGN_PRODUCTS_Q

#else  // no AMX intrinsics in this compiler, or not Linux: the AVX-512 path runs; stubs that are never called

inline bool supported() { return false; }
struct TileScope {
  explicit TileScope(bool) {}
};
inline void split_rows(const float*, int64_t, int64_t, int64_t, uint16_t* const[3]) {}
inline void pack_b_rows(const float*, int64_t, int64_t, int64_t, uint16_t* const[3], bool = false) {}
inline void tile_gemm(uint16_t* const[3], int64_t, uint16_t* const[3], int64_t, int64_t, float*, int64_t, bool) {}
inline void logits_gemm(const float*, int64_t, int64_t, uint16_t* const[3], int64_t, int64_t, float*, int64_t,
                        const float*, int64_t) {}

#endif

// Whether chunk_gemms_ uses AMX for (a) now: supported here and not turned off
inline bool active() { return enabled().load() && supported(); }

}  // namespace fastalign_amx
