// What the fused thin-chunk kernel's instruction-set variants share (linear_logprobs_chunk.cpp; the tiles themselves
// are in chunk_tiles.h): the packed strips' width, (c)'s slice of H, and the prefetch schedule the tiles carry.
#pragma once

#include <xmmintrin.h>

#include <cstdint>

namespace fastalign_chunk {

constexpr int64_t kStrip = 48;    // columns of a packed strip: 3 zmm of 16 floats (AVX-512), 6 ymm of 8 (AVX2)
constexpr int64_t kBlockK = 128;  // (c)'s slice of H: 6 lines of W and a [128, 64] slice of next_hidden^T in L1

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

// Tile `call` of `calls`' share of the lines to prefetch: stream a's lines [call na / calls, (call + 1) na / calls)
// (na in all), the same for b; a null stream has none
inline Prefetch prefetch_share(const float* a, int64_t na, const float* b, int64_t nb, int64_t call, int64_t calls) {
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

}  // namespace fastalign_chunk
