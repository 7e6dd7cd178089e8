// One chunk of the fused thin-chunk pass (fastalign/chunk_pass_fused.py) in one call: the per-row arithmetic before
// and after chunk_gemms_ (linear_logprobs_chunk.cpp), which ran as about 20 small torch ops per chunk. After each
// chunk_gemms_ call the caches hold W and d_W's lines, not the interpreter's and the dispatcher's, and those ops took
// 16-19 ms of a 1.4 s step (2-core Xeon, N=2048 H=1024 V=32000, 64-row chunks, ad hoc; 2.6 ms with the kernel
// stubbed out). Python now does one slice (the loss's coefficients) and one call per chunk: Python between the calls
// took 3.7 ms per step at that shape, and a step at N=1024 H=512 took 2.3-11 ms less in each of 6 interleaved pairs
// (median 343 against 349 ms; at N=2048 H=1024 the pairs moved by up to 135 ms either way, more than the gain).
//
//   chunk_step_(tile [V, ld], weight [V, H], bias [V] | None (already / temperature), alpha = 1 / temperature,
//               hidden [N, H], targets [N] (negative: ignored), logp [N], stats [2, ld], start, stop, next_start,
//               next_stop, coeff [stop - start] | None, d_weight [V, H] | None, d_hidden [N, H] | None,
//               d_bias [V] | None, first) -> None
//
// On entry the tile's first stop - start columns hold the logits of rows [start, stop), stats[0] / stats[1] their
// column max and sum of exp, logp[start:stop] their log-probs. With coeff (d loss / d logp of those rows): the rows'
// share of the gradients (d_weight and d_bias written when first, else added to; d_hidden's rows written). Then the
// tile holds the logits of rows [next_start, next_stop) (none when equal), stats their max and sum of exp, and
// logp[next_start:next_stop] their log-probs (0 for ignored rows). The formula is chunk_pass._exp_tile_gradients':
// f = -coeff alpha exp(shift - lse) (0 for ignored rows), d logits^T = E' diag(f) + onehot(y) diag(t), with
// t / f = expm1(logp) sumexp at each labelled row's target inside E' (see chunk_gemms_'s target_values).
#include "fastalign.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace {

void check_rows(int64_t start, int64_t stop, int64_t n, int64_t ld, const char* name) {
  TORCH_CHECK(0 <= start && start <= stop && stop <= n && stop - start <= ld, "fastalign._C.chunk_step_: ", name,
              " rows [", start, ", ", stop, ") must lie in [0, ", n, ") and number at most the tile's ", ld,
              " columns");
}

void check_fp32(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape,
              "fastalign._C.chunk_step_: ", name, " must be a contiguous fp32 CPU tensor of shape ", shape, ", got ",
              t.sizes(), " ", t.scalar_type(), " on ", t.device(), t.is_contiguous() ? "" : " (not contiguous)");
}

// dst [C, H] = src [C, H] with row c scaled by f[c] (the threads take ranges of rows)
void scale_rows(const float* src, const float* f, int64_t C, int64_t H, float* dst) {
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t k = 0; k < H; ++k) dst[c * H + k] = src[c * H + k] * f[c];
  });
}

}  // namespace

void chunk_step_(at::Tensor& tile, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, double alpha,
                 const at::Tensor& hidden, const at::Tensor& targets, at::Tensor& logp, at::Tensor& stats,
                 int64_t start, int64_t stop, int64_t next_start, int64_t next_stop,
                 const c10::optional<at::Tensor>& coeff, const c10::optional<at::Tensor>& d_weight,
                 const c10::optional<at::Tensor>& d_hidden, const c10::optional<at::Tensor>& d_bias, bool first) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && tile.dim() == 2,
              "fastalign._C.chunk_step_: hidden, weight and tile must be 2-D, got ", hidden.sizes(), ", ",
              weight.sizes(), ", ", tile.sizes());
  check_fp32(weight, weight.sizes(), "weight");  // before anything below is written (chunk_gemms_ checks it later)
  const int64_t N = hidden.size(0), H = hidden.size(1), ld = tile.size(1);
  check_fp32(hidden, {N, weight.size(1)}, "hidden");
  check_fp32(logp, {N}, "logp");
  check_fp32(stats, {2, ld}, "stats");
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong && targets.is_contiguous() &&
                  targets.sizes() == at::IntArrayRef{N},
              "fastalign._C.chunk_step_: targets must be a contiguous int64 CPU tensor of shape [", N, "], got ",
              targets.sizes(), " ", targets.scalar_type());
  check_rows(start, stop, N, ld, "this chunk's");
  check_rows(next_start, next_stop, N, ld, "the next chunk's");
  if (d_hidden.has_value()) check_fp32(*d_hidden, {N, H}, "d_hidden");
  const int64_t* y = targets.data_ptr<int64_t>();
  const bool grads = coeff.has_value();  // rows = 0 with first: d_weight and d_bias zero-filled, as chunk_gemms_
  const int64_t C = grads ? stop - start : 0, Cn = next_stop - next_start, V = weight.size(0);
  if (grads) check_fp32(*coeff, {C}, "coeff");
  // the next rows' targets index the tile below (past it: other memory); this chunk's, E' (past it: a gradient
  // silently without its target term)
  auto check_targets = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      TORCH_CHECK(y[r] < V, "fastalign._C.chunk_step_: targets[", r, "] = ", y[r], " is not a row of weight (V = ",
                  V, "); a negative target marks an ignored row");
  };
  check_targets(next_start, next_stop);
  if (grads) check_targets(start, stop);

  const float a = static_cast<float>(alpha);
  float* lp = logp.data_ptr<float>();
  float* st = stats.data_ptr<float>();
  // chunk_gemms_'s operands for this chunk's gradients (none without coefficients: the call then only writes the
  // next rows' logits)
  c10::optional<at::Tensor> scaled, shift, rows_targets, bias_scale, target_values, d_w, d_b;
  at::Tensor f;
  if (grads) {
    shift = stats[0].narrow(0, 0, C);  // stats gets the next rows' only after chunk_gemms_ returns
    rows_targets = targets.narrow(0, start, C);
    f = at::empty({C}, hidden.options());
    target_values = at::empty({C}, hidden.options());
    const float* c_in = coeff->data_ptr<float>();
    float* fp = f.data_ptr<float>();
    float* tv = target_values->data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) {
      const float sh = st[c], se = st[ld + c], lse = sh + std::log(se);
      fp[c] = y[start + c] >= 0 ? -(c_in[c] * a) * std::exp(sh - lse) : 0.0f;
      tv[c] = std::expm1(lp[start + c]) * se;  // precise from logp, as in chunk_pass._exp_tile_gradients
    }
    if (d_weight.has_value()) {
      scaled = at::empty({C, H}, hidden.options());
      scale_rows(hidden.data_ptr<float>() + start * H, fp, C, H, scaled->data_ptr<float>());
      d_w = d_weight;
    }
    if (d_bias.has_value()) {
      bias_scale = f;
      d_b = d_bias;
    }
  }
  c10::optional<at::Tensor> next_hidden;
  if (Cn > 0) next_hidden = hidden.narrow(0, next_start, Cn);
  const bool need_p = grads && d_hidden.has_value();
  std::vector<at::Tensor> out = chunk_gemms_(tile, C, scaled, weight, d_w, first, need_p, next_hidden, bias, alpha,
                                             shift, rows_targets, d_b, bias_scale, target_values);
  if (need_p)  // d_hidden's rows = f * E'^T W
    scale_rows(out[0].data_ptr<float>(), f.data_ptr<float>(), C, H, d_hidden->data_ptr<float>() + start * H);
  // the next rows' statistics and log-probs (their target logits read before the next call turns them into E')
  const float* mx = out[1].data_ptr<float>();
  const float* se = out[2].data_ptr<float>();
  const float* E = tile.data_ptr<float>();
  for (int64_t c = 0; c < Cn; ++c) {
    st[c] = mx[c];
    st[ld + c] = se[c];
    const int64_t t = y[next_start + c];
    lp[next_start + c] = t >= 0 ? E[t * ld + c] - (mx[c] + std::log(se[c])) : 0.0f;
  }
}
