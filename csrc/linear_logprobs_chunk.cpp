// The GEMM work of one chunk of the gradient-in-forward loss path (fastalign/chunk_pass_fused.py, through
// chunk_step.cpp, which does the per-row arithmetic around it), fp32, in one pass over the vocabulary, for thin
// chunks (C <= 128 rows), where three BLAS calls per chunk lose speed: each streams all of W or d_W from memory
// again for only C rows of work (2-core Xeon with AMX, fp32, N=2048 H=1024 V=32000, 64 rows, forward+backward of the
// NLL against the three unchunked GEMMs: BLAS chunks 1.64x, this kernel 0.99x, 1.21x without AMX;
// bench/results/linear_logprobs-goal-amxc-cpu-2026-12-07.json).
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
// then a multiple of 48 lines). (a) alone took 0.8x its AVX-512 time (ad hoc, one 64-row chunk, H=1024). (c) runs on
// AMX too (when H is a multiple of 32): next_hidden^T split once per call into a B panel, W's lines split 16 x 32 at a
// time just before their products (chunk_amx.h, logits_gemm). One 64-row chunk's three parts took 0.92x-0.93x the
// time with it (ad hoc, H=1024, two threads, 8 interleaved rounds, paired, this split and a rounded one; 0.89x at
// H=512 with the rounded one).
//
// Register tiles (chunk_tiles.h, compiled once per instruction set against chunk_isa.h). AVX-512 (24 of the 32 zmm
// registers accumulate): (a) 8 lines x 48 columns, (b) and (c) 6 lines x 64 columns (one micro-kernel; (b)
// broadcasts W[v, h..h+5] along a line of W instead of down a column; it took 0.9x the time of (b) with W packed
// into strips, ad hoc). AVX2 and FMA, for CPUs without AVX-512 (AMD Zen 2 and Zen 3, say; 12 of the 16 ymm
// registers accumulate): (a) 4 lines x 24 columns, (b) and (c) 6 lines x 16 columns, the same walk. H must be a
// multiple of 16 and ld of 16; chunk_gemms_supported() says whether this CPU has either set (always false in a build
// for another architecture than x86-64, see arch.h); where it has neither, or a chunk is wider than 128 rows (64 with
// AVX2), fastalign/chunk_pass_fused.py's fused_chunks_usable sends the pass to BLAS calls instead.
#include "fastalign.h"

#include "arch.h"
#include "chunk_amx.h"

#ifdef FASTALIGN_X86_SIMD
#include "chunk_isa.h"
#include "chunk_layout.h"
#include "chunk_operands.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <string>
#include <vector>

namespace {

using fastalign_chunk::AmxPanel;
using fastalign_chunk::block_lines;
using fastalign_chunk::kBlockK;
using fastalign_chunk::kStrip;
using fastalign_chunk::pack_strips;
using fastalign_chunk::Prefetch;
using fastalign_chunk::prefetch_share;
using fastalign_chunk::transposed_padded;

// chunk_tiles.h once per instruction set (see its header; chunk_layout.h's names reach it through the
// using-declarations above)
namespace chunk_avx512 {
using namespace isa_avx512;
#define FASTALIGN_ISA FASTALIGN_AVX512
#include "chunk_tiles.h"
#undef FASTALIGN_ISA
}  // namespace chunk_avx512

namespace chunk_avx2 {
using namespace isa_avx2;
#define FASTALIGN_ISA FASTALIGN_AVX2
#include "chunk_tiles.h"
#undef FASTALIGN_ISA
}  // namespace chunk_avx2

// One instruction set's tiles, as the block loop calls them: registers' floats (lanes), (a)'s lines per tile, (b)'s
// and (c)'s columns per tile
struct ChunkTiles {
  int64_t lanes, a_lines, tile_cols;
  decltype(&chunk_avx2::weight_strip) weight_strip;
  decltype(&chunk_avx2::logits_strip) logits_strip;
  decltype(&chunk_avx2::p_strip) p_strip;
  decltype(&chunk_avx2::exp_lines) exp_lines;
  decltype(&chunk_avx2::block_stats) block_stats;
};

const ChunkTiles kAvx512Tiles = {isa_avx512::kLanes, isa_avx512::kALines, isa_avx512::kTileVecs * isa_avx512::kLanes,
                                 &chunk_avx512::weight_strip, &chunk_avx512::logits_strip, &chunk_avx512::p_strip,
                                 &chunk_avx512::exp_lines, &chunk_avx512::block_stats};
const ChunkTiles kAvx2Tiles = {isa_avx2::kLanes, isa_avx2::kALines, isa_avx2::kTileVecs * isa_avx2::kLanes,
                               &chunk_avx2::weight_strip, &chunk_avx2::logits_strip, &chunk_avx2::p_strip,
                               &chunk_avx2::exp_lines, &chunk_avx2::block_stats};

// set_chunk_avx512(False) runs the AVX2 tiles on a CPU with AVX-512 too (how tests check them there)
std::atomic<bool>& avx512_enabled() {
  static std::atomic<bool> on{true};
  return on;
}

bool avx512_active() { return avx512_enabled().load() && fastalign_rows::kHasAvx512; }

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

// the CPU checks of row_math.h / col_math.h: AVX2 and FMA; AVX-512F and BW (on a CPU that has AVX2 too)
bool chunk_gemms_supported() { return fastalign_rows::kHasAvx2; }

bool chunk_amx_supported() { return fastalign_rows::kHasAvx512 && fastalign_amx::supported(); }

std::string chunk_gemms_isa() {
  if (!chunk_gemms_supported()) return "";
  if (!avx512_active()) return "avx2";
  return fastalign_amx::active() ? "avx512+amx" : "avx512";
}

bool set_chunk_avx512(bool enabled) { return avx512_enabled().exchange(enabled); }

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
              "fastalign._C.chunk_gemms_ needs a CPU with AVX-512F and AVX-512BW, or AVX2 and FMA "
              "(chunk_gemms_supported())");
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
  const bool wide = avx512_active();
  const ChunkTiles& T = wide ? kAvx512Tiles : kAvx2Tiles;
  // (c) on AMX too: next_hidden^T split once per call into a B panel, W's lines as they are used (chunk_amx.h).
  // One condition for both, AMX's switch read once.
  const bool amx_here = wide && H % 32 == 0 && fastalign_amx::active();
  const bool amx = amx_here && do_weight && C > 0, amx_c = amx_here && do_logits, any_amx = amx || amx_c;
  const int64_t vb = block_lines(H, any_amx, wide), blocks = (V + vb - 1) / vb, threads = at::get_num_threads();
  const int64_t kts = (C + 31) / 32;  // AMX's K steps over the chunk's rows
  at::Tensor hs_packed = do_weight && !amx ? pack_strips(*scaled_hidden) : at::Tensor();
  AmxPanel hs_panel;
  if (amx) hs_panel.pack(scaled_hidden->data_ptr<float>(), H, C, H, false, weight.options());
  at::Tensor hn_t = do_logits ? transposed_padded(*next_hidden, ld) : at::Tensor();
  AmxPanel hn_panel;  // in split_w_tile's K order
  if (amx_c) hn_panel.pack(hn_t.data_ptr<float>(), ld, H, ld, true, weight.options());
  uint16_t* const* hs_parts = hs_panel.parts;
  uint16_t* const* hn_parts = hn_panel.parts;
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
    const fastalign_amx::TileScope tiles(any_amx);
    for (int64_t blk = first_block; blk < last_block; ++blk) {
      const int64_t v0 = blk * vb, m = std::min(vb, V - v0);
      if (do_exp) {  // logits -> E' (and d_bias) while the lines are on their way into the cache
        T.exp_lines(E, ld, v0, m, C, shift, y, tv, f, db, first);
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
      if (do_weight && m_amx < m) {  // (a): a tile's lines (8 or 4), all strips, then the next (d_W line by line)
        at::Tensor hs_rest;  // AMX's last lines (the vocabulary's end): strips of their own
        if (amx) hs_rest = pack_strips(*scaled_hidden);
        const float* hs_strips = amx ? hs_rest.data_ptr<float>() : hs;
        const int64_t al = T.a_lines;
        for (int64_t i = m_amx; i < m; i += al) {
          const int mi = static_cast<int>(std::min<int64_t>(al, m - i));
          const float* e = E + (v0 + i) * ld;
          for (int64_t s = 0; s < strips; ++s) {
            const int64_t cols = std::min<int64_t>(kStrip, H - s * kStrip);  // a multiple of 16: whole cache lines
            float* d = dW + (v0 + i) * H + s * kStrip;
            if (v0 + i + 2 * al <= V)  // the next tile's lines' share of this strip: in L1 when their turn comes
              for (int64_t q = 0; q < al; ++q)
                for (int64_t c = 0; c < cols; c += 16)
                  _mm_prefetch(reinterpret_cast<const char*>(d + (al + q) * H + c), _MM_HINT_T0);
            T.weight_strip(mi, cols, e, ld, hs_strips + s * C * kStrip, C, d, H, first);
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
        const int64_t tc = T.tile_cols, calls = (H + 5) / 6 * ((C16 + tc - 1) / tc);
        int64_t call = 0;
        for (int64_t h0 = 0; h0 < H; h0 += 6)
          for (int64_t r = 0; r < C16; r += tc, ++call)
            T.p_strip(static_cast<int>(std::min<int64_t>(6, H - h0)),
                      static_cast<int>(std::min<int64_t>(tc, C16 - r) / T.lanes), W + v0 * H + h0, H,
                      E + v0 * ld + r, ld, m, P + h0 * ld + r, blk == first_block,
                      prefetch_share(w_next, next_lines, do_logits && !amx_c ? nullptr : dw_next, dw_lines, call,
                                     calls));
        p_written[t] = 1;
      }
      if (do_logits) {  // (c): over E_b, now consumed; all ld columns (zeros past Cn), then the bias
        const int64_t m_c = amx_c ? m / 16 * 16 : 0;  // (c)'s lines on AMX, the rest (the vocabulary's end) below
        // with the next block's W lines on their way into L2 where (b) did not bring them (d_W's two blocks ahead are
        // not prefetched on this path without (b): a call with d_W but no P, where no hidden state needs a gradient)
        if (m_c > 0) {
          fastalign_amx::logits_gemm(W + v0 * H, H, m_c, hn_parts, ld, H, E + v0 * ld, ld, do_p ? nullptr : w_next,
                                     do_p ? 0 : next_lines * 16 / H);
          if (a != 1.0f)
            for (int64_t v = v0; v < v0 + m_c; ++v)
              for (int64_t r = 0; r < ld; ++r) E[v * ld + r] *= a;
        }
        const int64_t tc = T.tile_cols, calls = (H + kBlockK - 1) / kBlockK * ((ld + tc - 1) / tc) * ((m + 5) / 6);
        int64_t call = 0;
        for (int64_t k0 = 0; k0 < H; k0 += kBlockK) {
          const int64_t kc = std::min(kBlockK, H - k0);
          for (int64_t r = 0; r < ld; r += tc) {
            const int nv = static_cast<int>(std::min<int64_t>(tc, ld - r) / T.lanes);
            for (int64_t i = m_c; i < m; i += 6, ++call)
              T.logits_strip(static_cast<int>(std::min<int64_t>(6, m - i)), nv, W + (v0 + i) * H + k0, H, 1,
                             ht + k0 * ld + r, ld, kc, a, E + (v0 + i) * ld + r, k0 == 0,
                             prefetch_share(do_p ? nullptr : w_next, next_lines, dw_next, dw_lines, call, calls));
          }
        }
        if (b != nullptr)
          for (int64_t v = v0; v < v0 + m; ++v)
            for (int64_t r = 0; r < Cn; ++r) E[v * ld + r] += b[v];
        T.block_stats(E, ld, v0, m, Cn, mx, se);
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

#else  // not x86-64 (arch.h): no AVX-512 micro-kernels; fused_chunks_usable sees that and the pass uses BLAS chunks

bool chunk_gemms_supported() { return false; }

bool chunk_amx_supported() { return false; }

std::string chunk_gemms_isa() { return ""; }

bool set_chunk_avx512(bool) { return false; }

std::vector<at::Tensor> chunk_gemms_(at::Tensor&, int64_t, const c10::optional<at::Tensor>&, const at::Tensor&,
                                     const c10::optional<at::Tensor>&, bool, bool, const c10::optional<at::Tensor>&,
                                     const c10::optional<at::Tensor>&, double, const c10::optional<at::Tensor>&,
                                     const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                     const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "fastalign._C.chunk_gemms_ needs an x86-64 CPU with AVX-512F and AVX-512BW, or AVX2 and FMA; "
              "this build has no x86-64 kernels (chunk_gemms_supported() is false)");
  return {};
}
// a stub whose signature drifted from fastalign.h's would be an overload, and this ambiguous: a compile error here
// rather than an undefined symbol when the module is imported
[[maybe_unused]] static const auto kChunkGemmsDeclared = &chunk_gemms_;

#endif

bool set_chunk_amx(bool enabled) { return fastalign_amx::enabled().exchange(enabled); }
