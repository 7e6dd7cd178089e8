// Fused linear -> token log-prob on CPU.
//
// Math (row t, target y; see shared DESIGN.md):
//   z = (h . W_v + b_v) / tau;  l = c * tanh(z / c) with a softcap, else l = z
//   lse = log sum_v exp(l_v);   logp = l_y - lse
//   D_v = g * (1[v = y] - p_v) * (1 - (l_v / c)^2 if softcap) / tau
//   d_h = sum_v D_v W_v;  d_W_v = sum_t D_tv h_t;  d_b_v = sum_t D_tv
//
// Parallel layout, chosen so that no two threads ever write the same output:
//   forward: threads own blocks of rows and sweep the vocabulary in tiles with an online logsumexp.
//     When hidden needs a gradient, the same sweep accumulates sum_v p_v c'_v W_v with online rescaling
//     (as flash attention does for its output), which gives d_h per unit upstream gradient:
//     basis_t = (c'_y W_y - sum_v p_v c'_v W_v) / tau, and backward's d_h = g_t * basis_t.
//   backward: threads own blocks of the vocabulary (rows of d_W, d_b) and sweep the rows,
//     recomputing each logits tile. Deterministic, and d_W work is skipped when the weight is frozen.
// Tiles are computed in fp32 for fp32/bf16/fp16 inputs (blocks are converted as they are read), and in
// fp64 for fp64 inputs (gradcheck).
#include "fastalign.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Transform {
  double inv_temp;
  double softcap;  // <= 0: none
};

// fp32 logits of a tile after bias, temperature and softcap. h [bn, H] fp32, w [bv, H] fp32.
at::Tensor logits_tile(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b, const Transform& tr) {
  at::Tensor z = b.defined() ? at::addmm(b, h, w.t()) : at::mm(h, w.t());
  if (tr.inv_temp != 1.0) z.mul_(tr.inv_temp);
  if (tr.softcap > 0) z.mul_(1.0 / tr.softcap).tanh_().mul_(tr.softcap);
  return z;
}

// d l / d z of the softcap, times 1 / tau: the factor applied to (onehot - p). Softcap only.
at::Tensor softcap_chain_factor(const at::Tensor& l, const Transform& tr) {
  at::Tensor r = l.mul(1.0 / tr.softcap);
  return r.mul_(r).neg_().add_(1.0).mul_(tr.inv_temp);
}

at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor maybe_slice_bias(const c10::optional<at::Tensor>& bias, int64_t start, int64_t len, at::ScalarType ct) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  return bias->narrow(0, start, len).to(ct);
}

void check_common(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(),
              "fastalign._C: all tensors must be on the CPU");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "fastalign._C: hidden [N, H] and weight [V, H] expected, got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) && targets.scalar_type() == at::kLong,
              "fastalign._C: targets must be int64 [N]");
}

}  // namespace

// Returns {logp [N], lse [N], basis [N, H] or [0]} in the compute type (fp32; fp64 for fp64 inputs). targets: -1 means ignored.
std::vector<at::Tensor> linear_logprobs_forward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                                const c10::optional<at::Tensor>& bias, const at::Tensor& targets_in,
                                                double temperature, double softcap, bool with_basis,
                                                int64_t block_n, int64_t block_v) {
  check_common(hidden_in, weight_in, targets_in);
  TORCH_CHECK(block_n > 0 && block_v > 0, "fastalign._C: block sizes must be positive");
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const Transform tr{1.0 / temperature, softcap};
  const at::ScalarType ct = compute_type(hidden_in);
  auto acc_opts = hidden.options().dtype(ct);
  at::Tensor logp = at::zeros({N}, acc_opts);
  at::Tensor lse = at::empty({N}, acc_opts);
  at::Tensor basis = with_basis ? at::empty({N, H}, acc_opts) : at::empty({0}, acc_opts);
  const int64_t n_blocks = (N + block_n - 1) / block_n;

  at::parallel_for(0, n_blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t r0 = blk * block_n, rows = std::min(block_n, N - r0);
      const at::Tensor h = hidden.narrow(0, r0, rows).to(ct).contiguous();
      const at::Tensor tgt = targets.narrow(0, r0, rows);
      const at::Tensor tgt_safe = tgt.clamp_min(0);
      at::Tensor m = at::full({rows}, -std::numeric_limits<float>::infinity(), acc_opts);
      at::Tensor s = at::zeros({rows}, acc_opts);
      at::Tensor acc = with_basis ? at::zeros({rows, H}, acc_opts) : at::Tensor();

      for (int64_t v0 = 0; v0 < V; v0 += block_v) {
        const int64_t cols = std::min(block_v, V - v0);
        const at::Tensor w = weight.narrow(0, v0, cols).to(ct).contiguous();
        at::Tensor l = logits_tile(h, w, maybe_slice_bias(bias, v0, cols, ct), tr);
        at::Tensor new_m = at::maximum(m, l.amax(1));
        at::Tensor scale = (m - new_m).exp_();
        at::Tensor p = (l - new_m.unsqueeze(1)).exp_();
        s.mul_(scale).add_(p.sum(1));
        if (with_basis) {
          if (tr.softcap > 0) p.mul_(softcap_chain_factor(l, Transform{1.0, tr.softcap}));
          acc.mul_(scale.unsqueeze(1)).addmm_(p, w);
        }
        m = new_m;
      }
      const at::Tensor block_lse = m + s.log();
      lse.narrow(0, r0, rows).copy_(block_lse);

      // Target logit by a gathered dot: the same transform as the tiles, one row of W per token.
      const at::Tensor wy = weight.index_select(0, tgt_safe).to(ct);
      at::Tensor zy = (h * wy).sum(1);
      if (bias.has_value() && bias->defined()) zy.add_(bias->index_select(0, tgt_safe).to(ct));
      zy.mul_(tr.inv_temp);
      if (tr.softcap > 0) zy.mul_(1.0 / tr.softcap).tanh_().mul_(tr.softcap);
      const at::Tensor valid = tgt.ge(0);
      logp.narrow(0, r0, rows).copy_(at::where(valid, zy - block_lse, at::zeros_like(zy)));

      if (with_basis) {
        const at::Tensor cy =
            (tr.softcap > 0 ? softcap_chain_factor(zy, tr) : at::full_like(zy, tr.inv_temp)).unsqueeze(1);
        at::Tensor b = wy.mul(cy).sub_(acc.div_(s.unsqueeze(1)).mul_(tr.inv_temp));
        b.mul_(valid.unsqueeze(1).to(ct));
        basis.narrow(0, r0, rows).copy_(b);
      }
    }
  });
  return {logp, lse, basis};
}

// Returns {d_weight [V, H] or [0], d_bias [V] or [0]} in the compute type. Rows with target -1 must carry grad 0.
std::vector<at::Tensor> linear_logprobs_backward_weight(const at::Tensor& grad_in, const at::Tensor& hidden_in,
                                                        const at::Tensor& weight_in,
                                                        const c10::optional<at::Tensor>& bias,
                                                        const at::Tensor& targets_in, const at::Tensor& lse_in,
                                                        double temperature, double softcap, bool need_weight,
                                                        bool need_bias, int64_t block_n, int64_t block_v) {
  check_common(hidden_in, weight_in, targets_in);
  TORCH_CHECK(block_n > 0 && block_v > 0, "fastalign._C: block sizes must be positive");
  const at::ScalarType ct = compute_type(hidden_in);
  const at::Tensor hidden = hidden_in.to(ct).contiguous();  // converted once, read by every thread
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor grad = grad_in.to(ct).contiguous();
  const at::Tensor lse = lse_in.to(ct).contiguous();
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const Transform tr{1.0 / temperature, softcap};
  auto acc_opts = hidden.options().dtype(ct);
  at::Tensor d_w = need_weight ? at::zeros({V, H}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor d_b = need_bias ? at::zeros({V}, acc_opts) : at::empty({0}, acc_opts);
  if (!need_weight && !need_bias) return {d_w, d_b};
  const int64_t v_blocks = (V + block_v - 1) / block_v;

  at::parallel_for(0, v_blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t vb = first; vb < last; ++vb) {
      const int64_t v0 = vb * block_v, cols = std::min(block_v, V - v0);
      const at::Tensor w = weight.narrow(0, v0, cols).to(ct).contiguous();
      const at::Tensor b = maybe_slice_bias(bias, v0, cols, ct);
      at::Tensor dw_blk = need_weight ? d_w.narrow(0, v0, cols) : at::Tensor();
      at::Tensor db_blk = need_bias ? d_b.narrow(0, v0, cols) : at::Tensor();
      for (int64_t r0 = 0; r0 < N; r0 += block_n) {
        const int64_t rows = std::min(block_n, N - r0);
        const at::Tensor h = hidden.narrow(0, r0, rows);
        const at::Tensor g = grad.narrow(0, r0, rows);
        const at::Tensor tgt = targets.narrow(0, r0, rows);
        at::Tensor l = logits_tile(h, w, b, tr);
        at::Tensor d = (l - lse.narrow(0, r0, rows).unsqueeze(1)).exp_().neg_();
        // onehot(y) for the rows whose target falls inside this vocabulary block
        const at::Tensor local = tgt - v0;
        const at::Tensor inside = local.ge(0).logical_and_(local.lt(cols));
        if (inside.any().item<bool>()) {
          const at::Tensor r_idx = inside.nonzero().squeeze(1);
          d.index_put_({r_idx, local.index_select(0, r_idx)}, at::ones({r_idx.size(0)}, acc_opts), /*accumulate=*/true);
        }
        if (tr.softcap > 0) {
          d.mul_(g.unsqueeze(1)).mul_(softcap_chain_factor(l, tr));
        } else {
          d.mul_((tr.inv_temp == 1.0 ? g : g * tr.inv_temp).unsqueeze(1));
        }
        if (need_weight) dw_blk.addmm_(d.t(), h);
        if (need_bias) db_blk.add_(d.sum(0));
      }
    }
  });
  return {d_w, d_b};
}
