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
// Extra memory: one [block_n, block_v] tile, fp32 copies of hidden (non-fp32 inputs) and fp32 gradients.
// Tiles are fp32 for fp32/bf16/fp16 inputs and fp64 for fp64 inputs (gradcheck).
#include "fastalign.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <immintrin.h>
#define FASTALIGN_X86_SIMD 1
#endif

namespace {

constexpr int64_t kRowGrain = 8;  // rows per parallel task at least

// ---- row primitives: scalar for any type, AVX2/FMA for float when the CPU has it ----

template <typename T>
T row_max_scalar(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

template <typename T>
T exp_sum_scalar(const T* x, int64_t n, T shift) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}

// out[i] = scale * exp(x[i] - shift), in place allowed; returns max of exp(x[i] - shift).
template <typename T>
T scaled_exp_scalar(T* x, int64_t n, T shift, T scale) {
  T pmax = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T p = std::exp(x[i] - shift);
    pmax = std::max(pmax, p);
    x[i] = scale * p;
  }
  return pmax;
}

#ifdef FASTALIGN_X86_SIMD
// exp for 8 floats: Cephes' expf (range reduction by ln 2, degree-6 polynomial), within 2 ulp; inputs below
// -87.3 give 0 (softmax terms that small do not change an fp32 sum).
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365447504f), hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n)));
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) float row_max_avx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  float r = hmax8(m);
  for (; i < n; ++i) r = std::max(r, x[i]);
  return r;
}

__attribute__((target("avx2,fma"))) float exp_sum_avx2(const float* x, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_add_ps(acc0, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh)));
    acc1 = _mm256_add_ps(acc1, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), sh)));
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_add_ps(acc0, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh)));
  float s = hsum8(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}

__attribute__((target("avx2,fma"))) float scaled_exp_avx2(float* x, int64_t n, float shift, float scale) {
  const __m256 sh = _mm256_set1_ps(shift), sc = _mm256_set1_ps(scale);
  __m256 pm = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
    pm = _mm256_max_ps(pm, p);
    _mm256_storeu_ps(x + i, _mm256_mul_ps(sc, p));
  }
  float pmax = hmax8(pm);
  for (; i < n; ++i) {
    const float p = std::exp(x[i] - shift);
    pmax = std::max(pmax, p);
    x[i] = scale * p;
  }
  return pmax;
}

bool cpu_has_avx2() {
  __builtin_cpu_init();  // may run before libgcc's own constructor: initialise explicitly
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
const bool kHasAvx2 = cpu_has_avx2();
#else
const bool kHasAvx2 = false;
#endif

template <typename T>
T row_max(const T* x, int64_t n) { return row_max_scalar(x, n); }
template <typename T>
T exp_sum(const T* x, int64_t n, T shift) { return exp_sum_scalar(x, n, shift); }
template <typename T>
T scaled_exp(T* x, int64_t n, T shift, T scale) { return scaled_exp_scalar(x, n, shift, scale); }
#ifdef FASTALIGN_X86_SIMD
template <>
float row_max<float>(const float* x, int64_t n) { return kHasAvx2 ? row_max_avx2(x, n) : row_max_scalar(x, n); }
template <>
float exp_sum<float>(const float* x, int64_t n, float shift) {
  return kHasAvx2 ? exp_sum_avx2(x, n, shift) : exp_sum_scalar(x, n, shift);
}
template <>
float scaled_exp<float>(float* x, int64_t n, float shift, float scale) {
  return kHasAvx2 ? scaled_exp_avx2(x, n, shift, scale) : scaled_exp_scalar(x, n, shift, scale);
}
#endif

template <typename T>
void softcap_row(T* x, int64_t n, T cap) {
  const T inv = T(1) / cap;
  for (int64_t i = 0; i < n; ++i) x[i] = cap * std::tanh(x[i] * inv);
}

// ---- tiles ----

at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// tile [rows, cols] = (h W_blk^T + b_blk) / tau: one BLAS call over all rows of the chunk, multi-threaded by BLAS.
void logits_gemm(at::Tensor& tile, const at::Tensor& h, const at::Tensor& w_blk, const at::Tensor& b_blk,
                 double inv_temp) {
  if (b_blk.defined()) {
    at::addmm_out(tile, b_blk, h, w_blk.t(), /*beta=*/inv_temp, /*alpha=*/inv_temp);
  } else {
    at::mm_out(tile, h, w_blk.t());
    if (inv_temp != 1.0) tile.mul_(inv_temp);
  }
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
  const at::ScalarType ct = hidden.scalar_type();
  const double inv_temp = 1.0 / temperature;
  const int64_t chunk = std::min(block_n, N);
  at::Tensor tile_buf = at::empty({chunk * std::min(block_v, V)}, hidden.options());
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
      logits_gemm(tile, h, weight.narrow(0, v0, cols).to(ct), bias_block(bias, v0, cols, ct), inv_temp);
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
  const at::ScalarType ct = hidden.scalar_type();
  const double inv_temp = 1.0 / temperature;
  const T* g = grad.data_ptr<T>();
  const int64_t chunk = std::min(block_n, N);
  at::Tensor tile_buf = at::empty({chunk * std::min(block_v, V)}, hidden.options());
  std::vector<char> keep(chunk);
  const bool filter = grad_filter_eps > 0;

  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    const at::Tensor h = hidden.narrow(0, r0, rows);
    at::Tensor d_h_rows = d_h.defined() ? d_h.narrow(0, r0, rows) : at::Tensor();
    for (int64_t v0 = 0; v0 < V; v0 += block_v) {
      const int64_t cols = std::min(block_v, V - v0);
      const at::Tensor w_blk = weight.narrow(0, v0, cols).to(ct);
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
      if (d_w_blk.defined()) d_w_blk.addmm_(d_tile.t(), h_rows);
      if (d_h_rows.defined()) {
        if (index.defined()) {
          d_h_rows.index_add_(0, index, at::mm(d_tile, w_blk));
        } else {
          d_h_rows.addmm_(d_tile, w_blk);
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
  const at::Tensor hidden = hidden_in.to(ct).contiguous();  // converted once; weight blocks as they are read
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const int64_t N = hidden.size(0);
  at::Tensor logp = at::empty({N}, hidden.options());
  at::Tensor lse = at::empty({N}, hidden.options());
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
  const at::Tensor hidden = hidden_in.to(ct).contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor grad = grad_in.to(ct).contiguous();
  const at::Tensor lse = lse_in.to(ct).contiguous();
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  auto opts = hidden.options();
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
