// The register tiles of the fused thin-chunk kernel (linear_logprobs_chunk.cpp, which says what (a), (b) and (c) are
// and how its blocks are walked) and the per-block passes over the tile (logits -> E', the next logits' column
// statistics), written once against chunk_isa.h's vector operations (vec, vload, vfma,
// ..., kLanes). linear_logprobs_chunk.cpp includes this file twice, inside namespace chunk_avx512 (after
// `using namespace isa_avx512`, FASTALIGN_ISA = FASTALIGN_AVX512) and inside namespace chunk_avx2 (isa_avx2,
// FASTALIGN_AVX2), so each tile is compiled for one instruction set. No #pragma once, and no #include here: the
// includer brings in what this uses (chunk_isa.h, chunk_layout.h, <algorithm>, <limits>) before it opens the
// namespace.

// (a) d[0:M, 0:kLanes NV] (+)= sum_{r < C} e[0:M, r] hs[r, 0:kLanes NV]; e: lines of ld floats; hs: a packed strip
// (48 floats a row)
template <int M, int NV>
FASTALIGN_ISA void weight_tile(const float* e, int64_t ld, const float* hs, int64_t C, float* d, int64_t H,
                               bool first) {
  vec acc[M][NV];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = vzero();
  for (int64_t r = 0; r < C; ++r) {
    vec b[NV];
    for (int j = 0; j < NV; ++j) b[j] = vload(hs + r * kStrip + j * kLanes);
    for (int i = 0; i < M; ++i) {
      const vec a = vset1(e[i * ld + r]);
      for (int j = 0; j < NV; ++j) acc[i][j] = vfma(a, b[j], acc[i][j]);
    }
  }
  // d is read only now, after the products: its lines (from memory, prefetched a tile ahead) had time to arrive
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j)
      vstore(d + i * H + j * kLanes, first ? acc[i][j] : vadd(vload(d + i * H + j * kLanes), acc[i][j]));
}

// (c) l[0:M, 0:kLanes NV] (+)= alpha sum_{k < kc} w[i wi + k wk] ht[k, 0:kLanes NV]; ht, l: lines of ld floats
template <int M, int NV>
FASTALIGN_ISA void logits_tile(const float* w, int64_t wi, int64_t wk, const float* ht, int64_t ld, int64_t kc,
                               float alpha, float* l, bool first, Prefetch pf) {
  vec acc[M][NV];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = vzero();
  for (int64_t k = 0; k < kc; ++k) {
    vec b[NV];
    for (int j = 0; j < NV; ++j) b[j] = vload(ht + k * ld + j * kLanes);
    pf.step(kc);
    for (int i = 0; i < M; ++i) {
      const vec a = vset1(w[i * wi + k * wk]);
      for (int j = 0; j < NV; ++j) acc[i][j] = vfma(a, b[j], acc[i][j]);
    }
  }
  const vec va = vset1(alpha);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) {
      float* dst = l + i * ld + j * kLanes;
      const vec x = vmul(acc[i][j], va);
      vstore(dst, first ? x : vadd(vload(dst), x));
    }
}

// (b), transposed: P^T[0:M, 0:kLanes NV] (+)= sum_{k < kc} W[k, 0:M] E[k, 0:kLanes NV] (W lines of H floats, E and P^T lines
// of ld floats), P^T loaded into the accumulators (first: zeros)
template <int M, int NV>
FASTALIGN_ISA void p_tile(const float* w, int64_t H, const float* e, int64_t ld, int64_t kc, float* p, bool first,
                          Prefetch pf) {
  vec acc[M][NV];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = first ? vzero() : vload(p + i * ld + j * kLanes);
  for (int64_t k = 0; k < kc; ++k) {
    vec b[NV];
    for (int j = 0; j < NV; ++j) b[j] = vload(e + k * ld + j * kLanes);
    pf.step(kc);
    for (int i = 0; i < M; ++i) {
      const vec a = vset1(w[i + k * H]);
      for (int j = 0; j < NV; ++j) acc[i][j] = vfma(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) vstore(p + i * ld + j * kLanes, acc[i][j]);
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

// (a) over one packed strip's first `cols` columns (a multiple of kLanes): one tile of 3 registers across (the whole
// 48-column strip with AVX-512, half of it with AVX2)
void weight_strip(int m, int64_t cols, const float* e, int64_t ld, const float* hs, int64_t C, float* d, int64_t H,
                  bool first) {
  for (int64_t c0 = 0; c0 < cols; c0 += 3 * kLanes) {
    const int64_t nv = std::min<int64_t>(3 * kLanes, cols - c0) / kLanes;
    if (nv == 3) weight_rows<3>(m, e, ld, hs + c0, C, d + c0, H, first);
    else if (nv == 2) weight_rows<2>(m, e, ld, hs + c0, C, d + c0, H, first);
    else weight_rows<1>(m, e, ld, hs + c0, C, d + c0, H, first);
  }
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

// Before (a) and (b): the block's lines of logits l become E' = exp(l - shift), each labelled row's target entry
// set to tv[c] (0 without tv); columns >= C stay 0. y: targets [C] (-1: ignored row, nothing set). While the lines
// are in L1, d_bias[v] (+)= sum_c E'[v, c] f[c].
FASTALIGN_ISA void exp_lines(float* E, int64_t ld, int64_t v0, int64_t m, int64_t C, const float* shift,
                             const int64_t* y, const float* tv, const float* f, float* d_bias, bool first) {
  for (int64_t v = 0; v < m; ++v) {
    float* x = E + (v0 + v) * ld;
    for (int64_t c = 0; c < C; c += kLanes)
      vstore_n(x + c, C - c, vexp(vsub(vload_n(x + c, C - c), vload_n(shift + c, C - c))));
  }
  for (int64_t c = 0; c < C; ++c)
    if (y[c] >= v0 && y[c] < v0 + m) E[y[c] * ld + c] = tv != nullptr ? tv[c] : 0.0f;
  if (d_bias == nullptr) return;
  for (int64_t v = 0; v < m; ++v) {
    const float* x = E + (v0 + v) * ld;
    vec acc = vzero();
    for (int64_t c = 0; c < C; c += kLanes) acc = vfma(vload_n(x + c, C - c), vload_n(f + c, C - c), acc);
    const float dot = vsum(acc);
    d_bias[v0 + v] = first ? dot : d_bias[v0 + v] + dot;
  }
}

// After (c): the block's new logits (columns < Cn) into the thread's running column statistics, online: mx = max so
// far, se = sum of exp(l - mx) so far (rescaled when mx grows). Lines are in L1; one exp per logit.
FASTALIGN_ISA void block_stats(const float* E, int64_t ld, int64_t v0, int64_t m, int64_t Cn, float* mx, float* se) {
  for (int64_t c = 0; c < Cn; c += kLanes) {
    const int64_t n = Cn - c;
    vec bm = vset1(-std::numeric_limits<float>::infinity());
    for (int64_t v = 0; v < m; ++v) bm = vmax(bm, vload_n(E + (v0 + v) * ld + c, n));
    const vec old = vload_n(mx + c, n), nm = vmax(old, bm);
    vec s = vmul(vload_n(se + c, n), vexp(vsub(old, nm)));
    for (int64_t v = 0; v < m; ++v) s = vadd(s, vexp(vsub(vload_n(E + (v0 + v) * ld + c, n), nm)));
    vstore_n(mx + c, n, nm);
    vstore_n(se + c, n, s);
  }
}
