// Row passes of the gradient-in-forward loss path (fastalign/chunk_pass.py).
//
// There the caller runs every GEMM-shaped step as a plain BLAS call outside any parallel region (the logits of
// a chunk of C rows over the whole vocabulary, then d_hidden and d_weight); these two functions are the work in
// between, in place on the logits tile (fp32, fp64, or bf16/fp16 without a softcap). The tile is vocabulary-major, tile [V, C] = ((h W^T + b) /
// tau)^T: BLAS fills W h^T at near its full-size speed for thin chunks (C = 128-256), where h W^T loses 10-25%
// (2-core EPYC, fp32, H=512, V=32000), and the reductions over the vocabulary become vector adds across columns.
//
//   rows_logsumexp_(tile [V, C], targets [C] (-1: ignored), softcap)
//       -> {logp [C], lse [C], shift [C]}; logp = l_y - lse (0 for ignored rows). Afterwards the tile holds
//       exp(l - shift) without a softcap (the caller takes the gradients from it, see chunk_pass.py), or
//       l = c tanh(z / c) with one. A bf16/fp16 tile (no softcap) keeps its type; the statistics are fp32.
//   rows_dlogits_(tile, lse [C], shift [C], targets [C], coeff [C], softcap, inv_temp)
//       tile <- coeff * (1[v = y] - p_v) * c'(l_v) * inv_temp: d loss / d (h W^T + b)^T for a loss whose
//       derivative with respect to logp is coeff; ignored rows (columns) become 0.
//
// Same math as linear_logprobs.cpp (see its header and DESIGN.md). The threads split the vocabulary into
// contiguous ranges, each with its own [C] partial max / sum (combined in a fixed order, so results do not
// depend on scheduling); without a softcap one exp per element in all.
#include "fastalign.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "col_math.h"

namespace {

using namespace fastalign_rows;

constexpr int64_t kMinVocabPerTask = 256;  // a thread's range is at least this many vocabulary lines

bool is_narrow(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf; }

void check_tile(const at::Tensor& tile, const at::Tensor& targets, bool narrow_ok) {
  TORCH_CHECK(tile.device().is_cpu() && targets.device().is_cpu(), "fastalign._C: tensors must be on the CPU");
  // lines may be padded (stride(0) >= C): a leading dimension that is a multiple of 16 keeps BLAS fast for any C
  TORCH_CHECK(tile.dim() == 2 && tile.stride(1) == 1 && tile.stride(0) >= tile.size(1) &&
                  (tile.scalar_type() == at::kFloat || tile.scalar_type() == at::kDouble ||
                   (narrow_ok && is_narrow(tile))),
              "fastalign._C: tile must be a row-major (lines possibly padded) ", narrow_ok ? "fp32/fp64 (bf16/fp16 without a softcap)" : "fp32/fp64",
              " [V, C] tensor, got ", tile.sizes(), " ", tile.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == tile.size(1) && targets.scalar_type() == at::kLong &&
                  targets.is_contiguous(),
              "fastalign._C: targets must be contiguous int64 [C] for a [V, C] tile");
}

// Number of vocabulary ranges: one per thread, fewer for a small vocabulary.
int64_t vocab_ranges(int64_t V) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), V / kMinVocabPerTask));
}

// fn(range t, first line, last line) for each of the `ranges` contiguous vocabulary ranges, in parallel.
template <typename F>
void for_each_range(int64_t V, int64_t ranges, const F& fn) {
  at::parallel_for(0, ranges, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) fn(t, V * t / ranges, V * (t + 1) / ranges);
  });
}

// The vocabulary reductions on one tile line for storage S and statistics T: the same functions for fp32/fp64
// tiles (S = T; with a softcap the line keeps l), the narrow ones for bf16/fp16 tiles (T = float; always stores).
template <typename S, typename T>
void line_max(const S* x, T* acc, int64_t n) {
  if constexpr (std::is_same_v<S, T>) col_max(x, acc, n); else col_max_narrow(x, acc, n);
}
template <typename S, typename T>
void line_exp(S* x, const T* shift, T* acc, int64_t n, bool store) {
  if constexpr (std::is_same_v<S, T>) col_exp_acc(x, shift, acc, n, store); else col_exp_store_narrow(x, shift, acc, n);
}

// rows_logsumexp_ on a tile of S with statistics (and logp, lse, shift) in T.
template <typename S, typename T>
void logsumexp_cols(at::Tensor& tile, const int64_t* y, double softcap, T* lp, T* ls, T* sh) {
  const int64_t V = tile.size(0), C = tile.size(1), ld = tile.stride(0);
  const int64_t ranges = vocab_ranges(V);
  S* base = reinterpret_cast<S*>(tile.data_ptr());
  std::vector<T> part(ranges * C, -std::numeric_limits<T>::infinity());
  for_each_range(V, ranges, [&](int64_t t, int64_t v0, int64_t v1) {
    T* acc = part.data() + t * C;
    for (int64_t v = v0; v < v1; ++v) {
      if constexpr (std::is_same_v<S, T>) {
        if (softcap > 0) softcap_row(base + v * ld, C, T(softcap));
      }
      line_max(base + v * ld, acc, C);
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    T m = part[c];
    for (int64_t t = 1; t < ranges; ++t) m = std::max(m, part[t * C + c]);
    sh[c] = m;
    lp[c] = y[c] >= 0 ? static_cast<T>(base[y[c] * ld + c]) : T(0);  // l_y, before the tile is overwritten
  }
  std::fill(part.begin(), part.end(), T(0));
  // with a softcap the second pass needs l for c'(l): keep it; else keep exp(l - shift)
  const bool store = !(softcap > 0);
  for_each_range(V, ranges, [&](int64_t t, int64_t v0, int64_t v1) {
    T* acc = part.data() + t * C;
    for (int64_t v = v0; v < v1; ++v) line_exp(base + v * ld, sh, acc, C, store);
  });
  for (int64_t c = 0; c < C; ++c) {
    T s = part[c];
    for (int64_t t = 1; t < ranges; ++t) s += part[t * C + c];
    ls[c] = sh[c] + std::log(s);
    lp[c] = y[c] >= 0 ? lp[c] - ls[c] : T(0);
  }
}

}  // namespace

std::vector<at::Tensor> rows_logsumexp_(at::Tensor& tile, const at::Tensor& targets, double softcap) {
  check_tile(tile, targets, /*narrow_ok=*/true);
  const bool narrow = is_narrow(tile);
  TORCH_CHECK(!(narrow && softcap > 0), "fastalign._C: a softcap needs an fp32/fp64 tile (c'(l) is taken from it)");
  const int64_t C = tile.size(1);
  const auto opts = narrow ? tile.options().dtype(at::kFloat) : tile.options();
  at::Tensor logp = at::empty({C}, opts), lse = at::empty({C}, opts), shift = at::empty({C}, opts);
  const int64_t* y = targets.data_ptr<int64_t>();
  if (tile.scalar_type() == at::kBFloat16) {
    logsumexp_cols<c10::BFloat16, float>(tile, y, softcap, logp.data_ptr<float>(), lse.data_ptr<float>(),
                                         shift.data_ptr<float>());
  } else if (tile.scalar_type() == at::kHalf) {
    logsumexp_cols<c10::Half, float>(tile, y, softcap, logp.data_ptr<float>(), lse.data_ptr<float>(),
                                     shift.data_ptr<float>());
  } else {
    AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "rows_logsumexp_", [&] {
      logsumexp_cols<scalar_t, scalar_t>(tile, y, softcap, logp.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                                         shift.data_ptr<scalar_t>());
    });
  }
  return {logp, lse, shift};
}

void rows_dlogits_(at::Tensor& tile, const at::Tensor& lse_in, const at::Tensor& shift_in, const at::Tensor& targets,
                   const at::Tensor& coeff_in, double softcap, double inv_temp) {
  check_tile(tile, targets, /*narrow_ok=*/false);
  const int64_t V = tile.size(0), C = tile.size(1), ld = tile.stride(0);
  const at::Tensor lse = lse_in.to(tile.scalar_type()).contiguous();
  const at::Tensor shift = shift_in.to(tile.scalar_type()).contiguous();
  const at::Tensor coeff = coeff_in.to(tile.scalar_type()).contiguous();
  TORCH_CHECK(lse.numel() == C && shift.numel() == C && coeff.numel() == C,
              "fastalign._C: lse, shift and coeff must be [C]");
  const int64_t* y = targets.data_ptr<int64_t>();
  const int64_t ranges = vocab_ranges(V);
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "rows_dlogits_", [&] {
    scalar_t* base = tile.data_ptr<scalar_t>();
    const scalar_t* ls = lse.data_ptr<scalar_t>();
    const scalar_t* cf = coeff.data_ptr<scalar_t>();
    const scalar_t* sh = shift.data_ptr<scalar_t>();
    // per column: gs = coeff / tau (0 for an ignored row, whose column becomes 0), and what the target line adds
    std::vector<scalar_t> gs(C), f(C), at_target(C, scalar_t(0));
    const scalar_t inv_cap = softcap > 0 ? scalar_t(1) / scalar_t(softcap) : scalar_t(0);
    for (int64_t c = 0; c < C; ++c) {
      gs[c] = y[c] >= 0 ? cf[c] * scalar_t(inv_temp) : scalar_t(0);
      if (softcap > 0) {  // tile holds l; c'(l_y) taken before the pass overwrites it
        const scalar_t ry = y[c] >= 0 ? base[y[c] * ld + c] * inv_cap : scalar_t(0);
        f[c] = -gs[c];
        at_target[c] = gs[c] * (scalar_t(1) - ry * ry);
      } else {  // tile holds exp(l - shift): p = x * exp(shift - lse)
        f[c] = -gs[c] * std::exp(sh[c] - ls[c]);
        at_target[c] = gs[c];
      }
    }
    for_each_range(V, ranges, [&](int64_t, int64_t v0, int64_t v1) {
      for (int64_t v = v0; v < v1; ++v) {
        if (softcap > 0) col_softcap_grad(base + v * ld, ls, f.data(), C, inv_cap);
        else col_scale(base + v * ld, f.data(), C);
      }
    });
    for (int64_t c = 0; c < C; ++c)
      if (y[c] >= 0) base[y[c] * ld + c] += at_target[c];
  });
}
