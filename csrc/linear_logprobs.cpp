// Fused linear -> token log-prob on CPU.
//
// Math (row t, target y; see shared DESIGN.md):
//   z = (h . W_v + b_v) / tau;  l = c * tanh(z / c) with a softcap, else l = z
//   lse = log sum_v exp(l_v);   logp = l_y - lse
//   D_v = g * (1[v = y] - p_v) * (1 - (l_v / c)^2 if softcap) / tau
//   d_h = sum_v D_v W_v;  d_W_v = sum_t D_tv h_t;  d_b_v = sum_t D_tv
//
// Threading rule (checked by tests/test_linear_logprobs.py::test_cpp_no_blas_inside_parallel_regions):
// GEMM-shaped work runs as a few large BLAS calls OUTSIDE any at::parallel_for, where the BLAS library
// uses every core itself; only row work (online logsumexp, forming D) runs inside at::parallel_for, on raw
// pointers. A BLAS call inside a parallel task may start its own threads there: on a 2-core AMD EPYC with
// MKL that oversubscribed the cores and made the op 4-11x slower than naive PyTorch.
//
// Layout: rows are taken in chunks of block_n (bounds memory for long inputs); within a chunk the vocabulary
// is swept in blocks of block_v:
//   forward:  L = h W_blk^T / tau  (one GEMM, [rows, block_v] fp32), then per row the online (max, sum-exp);
//             the target logit is read from the tile that holds it.
//   backward: L recomputed (GEMM), D formed in place per row, then d_W_blk += D^T h and d_h += D W_blk
//             (two GEMMs). Deterministic. grad_filter_eps > 0 drops, per vocabulary block, the rows whose
//             p_v * c'_v (c' the softcap's chain factor, 1 without) are all below eps and that do not hold
//             their target (Cut Cross-Entropy's filter); the two products then run on the remaining rows only.
// Extra memory: one [block_n, block_v] tile and fp32 gradients. Tiles are fp32 for fp32/bf16/fp16 inputs and
// fp64 for fp64 inputs (gradcheck); bf16/fp16 inputs run their GEMMs in bf16/fp16 (the CPU's native 16-bit
// GEMMs, about twice as fast as fp32 on AVX-512 BF16), rounding logits and D to the input type as naive PyTorch does.
#include "fastalign.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "row_math.h"

namespace {

using namespace fastalign_rows;

// ---- tiles ----

at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// tile [rows, cols] (fp32, fp64) = (h W_blk^T + b_blk) / tau: one BLAS call over all rows of the chunk,
// multi-threaded by BLAS. bf16/fp16 inputs: the GEMM runs in the input type (the CPU's native bf16 GEMM, as
// naive PyTorch's does: logits rounded to the input type) and is widened into the fp32 tile.
void logits_gemm(at::Tensor& tile, const at::Tensor& h, const at::Tensor& w_blk, const at::Tensor& b_blk,
                 double inv_temp) {
  if (h.scalar_type() != tile.scalar_type()) {
    tile.copy_(at::mm(h, w_blk.t()));
    if (b_blk.defined()) tile.add_(b_blk);
    if (inv_temp != 1.0) tile.mul_(inv_temp);
  } else if (b_blk.defined()) {
    at::addmm_out(tile, b_blk, h, w_blk.t(), /*beta=*/inv_temp, /*alpha=*/inv_temp);
  } else {
    at::mm_out(tile, h, w_blk.t());
    if (inv_temp != 1.0) tile.mul_(inv_temp);
  }
}

// acc += a b: in place (one BLAS call) when a, b and acc share a type; bf16/fp16 products are widened into the
// fp32 accumulator.
void accumulate_product(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == acc.scalar_type()) {
    acc.addmm_(a, b);
  } else {
    acc.add_(at::mm(a, b));
  }
}

// The type the GEMMs run in: the input's for bf16/fp16 (native 16-bit GEMMs), else the compute type.
at::ScalarType gemm_type(const at::Tensor& t) {
  const auto st = t.scalar_type();
  return (st == at::kBFloat16 || st == at::kHalf) ? st : compute_type(t);
}

at::Tensor bias_block(const c10::optional<at::Tensor>& bias, int64_t v0, int64_t cols, at::ScalarType ct) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  return bias->narrow(0, v0, cols).to(ct);
}

void check_common(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                  int64_t block_n, int64_t block_v) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(),
              "fastalign._C: all tensors must be on the CPU");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "fastalign._C: hidden [N, H] and weight [V, H] expected, got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) && targets.scalar_type() == at::kLong,
              "fastalign._C: targets must be int64 [N]");
  TORCH_CHECK(block_n > 0 && block_v > 0, "fastalign._C: block sizes must be positive");
}

template <typename T>
void forward_impl(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const int64_t* targets, double temperature, double softcap, int64_t block_n, int64_t block_v,
                  T* logp, T* lse) {
  const int64_t N = hidden.size(0), V = weight.size(0);
  const at::ScalarType ct = c10::CppTypeToScalarType<T>::value, gt = hidden.scalar_type();
  const double inv_temp = 1.0 / temperature;
  const int64_t chunk = std::min(block_n, N);
  at::Tensor tile_buf = at::empty({chunk * std::min(block_v, V)}, hidden.options().dtype(ct));
  std::vector<T> run_max(chunk), run_sum(chunk), target_logit(chunk);

  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    const at::Tensor h = hidden.narrow(0, r0, rows);
    std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<T>::infinity());
    std::fill(run_sum.begin(), run_sum.end(), T(0));
    std::fill(target_logit.begin(), target_logit.end(), T(0));
    for (int64_t v0 = 0; v0 < V; v0 += block_v) {
      const int64_t cols = std::min(block_v, V - v0);
      at::Tensor tile = tile_buf.narrow(0, 0, rows * cols).view({rows, cols});
      logits_gemm(tile, h, weight.narrow(0, v0, cols).to(gt), bias_block(bias, v0, cols, ct), inv_temp);
      T* base = tile.data_ptr<T>();
      at::parallel_for(0, rows, kRowGrain, [&](int64_t first, int64_t last) {
        for (int64_t i = first; i < last; ++i) {
          T* x = base + i * cols;
          if (softcap > 0) softcap_row(x, cols, T(softcap));
          const int64_t local = targets[r0 + i] - v0;
          if (local >= 0 && local < cols) target_logit[i] = x[local];
          const T m_new = std::max(run_max[i], row_max(x, cols));
          run_sum[i] = run_sum[i] * std::exp(run_max[i] - m_new) + exp_sum(x, cols, m_new);
          run_max[i] = m_new;
        }
      });
    }
    for (int64_t i = 0; i < rows; ++i) {
      const T l = run_max[i] + std::log(run_sum[i]);
      lse[r0 + i] = l;
      logp[r0 + i] = targets[r0 + i] >= 0 ? target_logit[i] - l : T(0);
    }
  }
}

template <typename T>
void backward_impl(const at::Tensor& grad, const at::Tensor& hidden, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, const int64_t* targets, const T* lse, double temperature,
                   double softcap, double grad_filter_eps, int64_t block_n, int64_t block_v, at::Tensor& d_h,
                   at::Tensor& d_w, at::Tensor& d_b) {
  const int64_t N = hidden.size(0), V = weight.size(0);
  const at::ScalarType ct = c10::CppTypeToScalarType<T>::value, gt = hidden.scalar_type();
  const bool narrow_gemm = gt != ct;  // bf16/fp16 GEMMs; the tile, D and the accumulators stay fp32
  const double inv_temp = 1.0 / temperature;
  const T* g = grad.data_ptr<T>();
  const int64_t chunk = std::min(block_n, N);
  at::Tensor tile_buf = at::empty({chunk * std::min(block_v, V)}, hidden.options().dtype(ct));
  std::vector<char> keep(chunk);
  const bool filter = grad_filter_eps > 0;

  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    const at::Tensor h = hidden.narrow(0, r0, rows);
    at::Tensor d_h_rows = d_h.defined() ? d_h.narrow(0, r0, rows) : at::Tensor();
    for (int64_t v0 = 0; v0 < V; v0 += block_v) {
      const int64_t cols = std::min(block_v, V - v0);
      const at::Tensor w_blk = weight.narrow(0, v0, cols).to(gt);
      at::Tensor tile = tile_buf.narrow(0, 0, rows * cols).view({rows, cols});
      logits_gemm(tile, h, w_blk, bias_block(bias, v0, cols, ct), inv_temp);
      T* base = tile.data_ptr<T>();
      // D in place: -g/tau * p (times the softcap's chain factor), plus g/tau * factor at the target.
      at::parallel_for(0, rows, kRowGrain, [&](int64_t first, int64_t last) {
        for (int64_t i = first; i < last; ++i) {
          T* x = base + i * cols;
          const T gs = g[r0 + i] * T(inv_temp);
          const int64_t local = targets[r0 + i] - v0;
          const bool has_target = local >= 0 && local < cols;
          T pmax;
          if (softcap > 0) {
            softcap_row(x, cols, T(softcap));
            const T inv_cap = T(1) / T(softcap);
            const T ly = has_target ? x[local] : T(0);
            pmax = 0;
            for (int64_t j = 0; j < cols; ++j) {
              const T r = x[j] * inv_cap, pc = std::exp(x[j] - lse[r0 + i]) * (T(1) - r * r);
              pmax = std::max(pmax, pc);  // the filter compares p * c', the entry's share of |D| / |g / tau|
              x[j] = -gs * pc;
            }
            if (has_target) x[local] += gs * (T(1) - (ly * inv_cap) * (ly * inv_cap));
          } else {
            pmax = scaled_exp(x, cols, lse[r0 + i], -gs);
            if (has_target) x[local] += gs;
          }
          keep[i] = !filter || has_target || pmax >= T(grad_filter_eps);
        }
      });
      at::Tensor d_w_blk = d_w.defined() ? d_w.narrow(0, v0, cols) : at::Tensor();
      at::Tensor d_b_blk = d_b.defined() ? d_b.narrow(0, v0, cols) : at::Tensor();
      at::Tensor d_tile = tile, h_rows = h, index;
      if (filter) {
        std::vector<int64_t> kept;
        for (int64_t i = 0; i < rows; ++i)
          if (keep[i]) kept.push_back(i);
        if (kept.empty()) continue;
        // Gathering rows costs copies of D and h: only worth it when most rows drop out; otherwise the full
        // products run (exact for the rows that could have been dropped).
        if (2 * static_cast<int64_t>(kept.size()) < rows) {
          index = at::tensor(kept, at::TensorOptions().dtype(at::kLong));
          d_tile = tile.index_select(0, index);
          h_rows = h.index_select(0, index);
        }
      }
      if (d_b_blk.defined()) d_b_blk.add_(d_tile.sum(0));
      // bf16/fp16: D rounded to the input type for the two GEMMs, as naive PyTorch's backward does
      const at::Tensor d_gemm = narrow_gemm ? d_tile.to(gt) : d_tile;
      if (d_w_blk.defined()) accumulate_product(d_w_blk, d_gemm.t(), h_rows);
      if (d_h_rows.defined()) {
        if (index.defined()) {
          d_h_rows.index_add_(0, index, at::mm(d_gemm, w_blk).to(ct));
        } else {
          accumulate_product(d_h_rows, d_gemm, w_blk);
        }
      }
    }
  }
}

}  // namespace

// Returns {logp [N], lse [N]} in the compute type (fp32; fp64 for fp64 inputs). targets: -1 means ignored.
std::vector<at::Tensor> linear_logprobs_forward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                                const c10::optional<at::Tensor>& bias, const at::Tensor& targets_in,
                                                double temperature, double softcap, int64_t block_n,
                                                int64_t block_v) {
  check_common(hidden_in, weight_in, targets_in, block_n, block_v);
  const at::ScalarType ct = compute_type(hidden_in);
  // converted once to the GEMM type (bf16/fp16 stay as they are); weight blocks as they are read
  const at::Tensor hidden = hidden_in.to(gemm_type(hidden_in)).contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const int64_t N = hidden.size(0);
  at::Tensor logp = at::empty({N}, hidden.options().dtype(ct));
  at::Tensor lse = at::empty({N}, hidden.options().dtype(ct));
  if (N == 0) return {logp, lse};
  AT_DISPATCH_FLOATING_TYPES(ct, "linear_logprobs_forward", [&] {
    forward_impl<scalar_t>(hidden, weight, bias, targets.data_ptr<int64_t>(), temperature, softcap, block_n,
                           block_v, logp.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
  return {logp, lse};
}

// Returns {d_hidden [N, H] or [0], d_weight [V, H] or [0], d_bias [V] or [0]} in the compute type.
// Rows with target -1 must carry grad 0. grad_filter_eps <= 0: exact (no filtering).
std::vector<at::Tensor> linear_logprobs_backward(const at::Tensor& grad_in, const at::Tensor& hidden_in,
                                                 const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias,
                                                 const at::Tensor& targets_in, const at::Tensor& lse_in,
                                                 double temperature, double softcap, bool need_hidden,
                                                 bool need_weight, bool need_bias, double grad_filter_eps,
                                                 int64_t block_n, int64_t block_v) {
  check_common(hidden_in, weight_in, targets_in, block_n, block_v);
  const at::ScalarType ct = compute_type(hidden_in);
  const at::Tensor hidden = hidden_in.to(gemm_type(hidden_in)).contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor grad = grad_in.to(ct).contiguous();
  const at::Tensor lse = lse_in.to(ct).contiguous();
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  auto opts = hidden.options().dtype(ct);
  at::Tensor d_h = need_hidden ? at::zeros({N, H}, opts) : at::Tensor();
  at::Tensor d_w = need_weight ? at::zeros({V, H}, opts) : at::Tensor();
  at::Tensor d_b = need_bias ? at::zeros({V}, opts) : at::Tensor();
  if (N > 0 && (need_hidden || need_weight || need_bias)) {
    AT_DISPATCH_FLOATING_TYPES(ct, "linear_logprobs_backward", [&] {
      backward_impl<scalar_t>(grad, hidden, weight, bias, targets.data_ptr<int64_t>(), lse.data_ptr<scalar_t>(),
                              temperature, softcap, grad_filter_eps, block_n, block_v, d_h, d_w, d_b);
    });
  }
  const auto empty = [&] { return at::empty({0}, opts); };
  return {need_hidden ? d_h : empty(), need_weight ? d_w : empty(), need_bias ? d_b : empty()};
}
