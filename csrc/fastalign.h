// Declarations of every compiled op in fastalign._C; bindings.cpp exposes them to Python.
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

// linear_logprobs.cpp: fused linear -> token log-prob (forward {logp, lse}; backward {d_hidden, d_weight, d_bias}).
std::vector<at::Tensor> linear_logprobs_forward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                                const c10::optional<at::Tensor>& bias, const at::Tensor& targets_in,
                                                double temperature, double softcap, int64_t block_n,
                                                int64_t block_v);
std::vector<at::Tensor> linear_logprobs_backward(const at::Tensor& grad_in, const at::Tensor& hidden_in,
                                                 const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias,
                                                 const at::Tensor& targets_in, const at::Tensor& lse_in,
                                                 double temperature, double softcap, bool need_hidden,
                                                 bool need_weight, bool need_bias, double grad_filter_eps,
                                                 int64_t block_n, int64_t block_v);

// linear_logprobs_rows.cpp: the row passes of the gradient-in-forward loss path (in place on a logits tile):
// rows_logsumexp_ -> {logp, lse, shift}.
std::vector<at::Tensor> rows_logsumexp_(at::Tensor& tile, const at::Tensor& targets, double softcap);
void rows_dlogits_(at::Tensor& tile, const at::Tensor& lse, const at::Tensor& shift, const at::Tensor& targets,
                   const at::Tensor& coeff, double softcap, double inv_temp);

// linear_logprobs_chunk.cpp: a thin chunk's three GEMMs in one pass over the vocabulary (fp32; AVX-512, or AVX2 and
// FMA): tile logits -> E' (exp_shift), d_weight (+)= E' scaled_hidden, P = E'^T W [rows, H] (need_p), then tile <-
// alpha W next_hidden^T + bias with the new logits' column max and sum of exp. Returns {P or [0, H], max [Cn],
// sumexp [Cn]}. chunk_gemms_isa(): the tiles it runs now ("avx512+amx", "avx512", "avx2"; "" where unsupported).
bool chunk_gemms_supported();
bool chunk_amx_supported();
bool set_chunk_amx(bool enabled);
bool set_chunk_avx512(bool enabled);
std::string chunk_gemms_isa();
std::vector<at::Tensor> chunk_gemms_(at::Tensor& tile, int64_t rows, const c10::optional<at::Tensor>& scaled_hidden,
                                     const at::Tensor& weight, const c10::optional<at::Tensor>& d_weight, bool first,
                                     bool need_p, const c10::optional<at::Tensor>& next_hidden,
                                     const c10::optional<at::Tensor>& bias, double alpha,
                                     const c10::optional<at::Tensor>& exp_shift,
                                     const c10::optional<at::Tensor>& targets,
                                     const c10::optional<at::Tensor>& d_bias,
                                     const c10::optional<at::Tensor>& bias_scale,
                                     const c10::optional<at::Tensor>& target_values);

// chunk_step.cpp: one chunk of the fused thin-chunk pass, the per-row arithmetic around chunk_gemms_ included: this
// chunk's gradients from its coefficients (d loss / d logp), then the next rows' logits, statistics and log-probs.
void chunk_step_(at::Tensor& tile, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, double alpha,
                 const at::Tensor& hidden, const at::Tensor& targets, at::Tensor& logp, at::Tensor& stats,
                 int64_t start, int64_t stop, int64_t next_start, int64_t next_stop,
                 const c10::optional<at::Tensor>& coeff, const c10::optional<at::Tensor>& d_weight,
                 const c10::optional<at::Tensor>& d_hidden, const c10::optional<at::Tensor>& d_bias, bool first);

// nn_count.cpp: nearest-neighbour counts of counter-generated uniform box samples (clone-robust weights).
at::Tensor nn_count(const at::Tensor& points, const at::Tensor& sq_norms, const at::Tensor& group_start,
                    const at::Tensor& keys, const at::Tensor& width, int64_t num_samples, int64_t block_samples,
                    int64_t block_alternatives, const std::string& kernel);
// The micro-kernels this CPU runs, widest first ("avx512", "avx2", "baseline"); kernel="auto" takes the first.
std::vector<std::string> nn_count_kernels();
