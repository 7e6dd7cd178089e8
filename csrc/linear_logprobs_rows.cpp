// Row passes of the gradient-in-forward loss path (fastalign/fused_grad.py).
//
// There the caller runs every GEMM-shaped step as a plain BLAS call outside any parallel region (the logits of
// a chunk of rows over the whole vocabulary, then d_hidden and d_weight); these two functions are the per-row
// work in between, in place on the fp32 (fp64) logits tile, in parallel over rows:
//
//   rows_logsumexp_(tile [C, V] = (h W^T + b) / tau, targets [C] (-1: ignored), softcap)
//       -> {logp [C], lse [C], shift [C]}; logp = l_y - lse (0 for ignored rows). In between the two calls the
//       tile holds, per row, exp(l - shift) without a softcap (so the second pass needs no exp), or
//       l = c tanh(z / c) with one.
//   rows_dlogits_(tile, lse [C], shift [C], targets [C], coeff [C], softcap, inv_temp)
//       tile <- coeff * (1[v = y] - p_v) * c'(l_v) * inv_temp: d loss / d (h W^T + b) for a loss whose
//       derivative with respect to logp is coeff; ignored rows become 0.
//
// Same math as linear_logprobs.cpp (see its header and DESIGN.md). Without a softcap one exp per element in
// all: the first pass stores exp(l - max) and the second only scales it.
#include "fastalign.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "row_math.h"

namespace {

using namespace fastalign_rows;

void check_tile(const at::Tensor& tile, const at::Tensor& targets) {
  TORCH_CHECK(tile.device().is_cpu() && targets.device().is_cpu(), "fastalign._C: tensors must be on the CPU");
  TORCH_CHECK(tile.dim() == 2 && tile.is_contiguous() &&
                  (tile.scalar_type() == at::kFloat || tile.scalar_type() == at::kDouble),
              "fastalign._C: tile must be a contiguous fp32/fp64 [C, V] tensor, got ", tile.sizes(), " ",
              tile.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == tile.size(0) && targets.scalar_type() == at::kLong &&
                  targets.is_contiguous(),
              "fastalign._C: targets must be contiguous int64 [C]");
}

}  // namespace

std::vector<at::Tensor> rows_logsumexp_(at::Tensor& tile, const at::Tensor& targets, double softcap) {
  check_tile(tile, targets);
  const int64_t C = tile.size(0), V = tile.size(1);
  at::Tensor logp = at::empty({C}, tile.options());
  at::Tensor lse = at::empty({C}, tile.options());
  at::Tensor shift = at::empty({C}, tile.options());
  const int64_t* y = targets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "rows_logsumexp_", [&] {
    scalar_t* base = tile.data_ptr<scalar_t>();
    scalar_t* lp = logp.data_ptr<scalar_t>();
    scalar_t* ls = lse.data_ptr<scalar_t>();
    scalar_t* sh = shift.data_ptr<scalar_t>();
    at::parallel_for(0, C, kRowGrain, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        scalar_t* x = base + i * V;
        if (softcap > 0) softcap_row(x, V, scalar_t(softcap));
        const scalar_t m = row_max(x, V);
        const scalar_t ly = y[i] >= 0 ? x[y[i]] : scalar_t(0);
        // with a softcap the second pass needs l for c'(l): keep it; else keep exp(l - m)
        const scalar_t l = m + std::log(softcap > 0 ? exp_sum(x, V, m) : exp_store_sum(x, V, m));
        ls[i] = l;
        sh[i] = m;
        lp[i] = y[i] >= 0 ? ly - l : scalar_t(0);
      }
    });
  });
  return {logp, lse, shift};
}

void rows_dlogits_(at::Tensor& tile, const at::Tensor& lse_in, const at::Tensor& shift_in, const at::Tensor& targets,
                   const at::Tensor& coeff_in, double softcap, double inv_temp) {
  check_tile(tile, targets);
  const int64_t C = tile.size(0), V = tile.size(1);
  const at::Tensor lse = lse_in.to(tile.scalar_type()).contiguous();
  const at::Tensor shift = shift_in.to(tile.scalar_type()).contiguous();
  const at::Tensor coeff = coeff_in.to(tile.scalar_type()).contiguous();
  TORCH_CHECK(lse.numel() == C && shift.numel() == C && coeff.numel() == C,
              "fastalign._C: lse, shift and coeff must be [C]");
  const int64_t* y = targets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "rows_dlogits_", [&] {
    scalar_t* base = tile.data_ptr<scalar_t>();
    const scalar_t* ls = lse.data_ptr<scalar_t>();
    const scalar_t* cf = coeff.data_ptr<scalar_t>();
    const scalar_t* sh = shift.data_ptr<scalar_t>();
    at::parallel_for(0, C, kRowGrain, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        scalar_t* x = base + i * V;
        if (y[i] < 0) {
          std::fill(x, x + V, scalar_t(0));
          continue;
        }
        const scalar_t gs = cf[i] * scalar_t(inv_temp);
        if (softcap > 0) {
          const scalar_t inv_cap = scalar_t(1) / scalar_t(softcap);
          const scalar_t ry = x[y[i]] * inv_cap;
          for (int64_t j = 0; j < V; ++j) {
            const scalar_t r = x[j] * inv_cap;
            x[j] = -gs * std::exp(x[j] - ls[i]) * (scalar_t(1) - r * r);
          }
          x[y[i]] += gs * (scalar_t(1) - ry * ry);
        } else {  // x holds exp(l - shift): p = x * exp(shift - lse)
          const scalar_t f = -gs * std::exp(sh[i] - ls[i]);
          for (int64_t j = 0; j < V; ++j) x[j] *= f;
          x[y[i]] += gs;
        }
      }
    });
  });
}
