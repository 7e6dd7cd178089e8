"""Backward kernel: recompute each logits tile, form D = g (onehot - softmax) c' / tau in registers and
accumulate d_hidden += D @ W, d_weight += D^T @ h, d_bias += sum D with fp32 atomics.

One program per [BLOCK_N, BLOCK_V] tile, all on grid axis 0 (CUDA's y/z axes stop at 65535). Programs are
ordered row-block-major inside groups of GROUP_N row blocks so that concurrently running programs share
weight tiles in L2. Atomics make the result run-to-run nondeterministic in the last bits; they are relaxed
(plain reductions: the default acq_rel would fence every one of ~N*V*H/BLOCK_K adds). With FILTER_GRAD a
tile whose entries all have p * c' < grad_filter_eps and that holds no target adds nothing (Cut
Cross-Entropy's gradient filter, opt-in).
"""
import torch
import triton
import triton.language as tl

from ._common import as_dot_operand, d_tile, interpreting, launch_common, load_chunk, shared_memory_pruner


@triton.jit
def _linear_logprobs_bwd_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr, N, V, H,
                                stride_hn, stride_hk, stride_wv, stride_wk, inv_temp, softcap, grad_filter_eps,
                                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_DH: tl.constexpr,
                                COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
                                DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, FILTER_GRAD: tl.constexpr):
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    n_v_blocks = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * n_v_blocks
    group = pid // per_group
    first_n = group * GROUP_N
    group_size = tl.minimum(n_row_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    d = d_tile(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_hk,
               stride_wv, stride_wk, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION,
               UPCAST_DOT)
    keep = True
    if FILTER_GRAD:
        keep = _tile_matters(d, tgt_ptr, g_ptr, rows, row_mask, pid_v * BLOCK_V, inv_temp, grad_filter_eps, BLOCK_V)
    if keep:
        if COMPUTE_DB:
            tl.atomic_add(db_ptr + cols, tl.sum(d, axis=0), mask=col_mask, sem="relaxed")
        d_in = as_dot_operand(d, h_ptr, UPCAST_DOT)
        rows64 = rows.to(tl.int64)
        cols64 = cols.to(tl.int64)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < H
            if COMPUTE_DH:
                w = load_chunk(w_ptr, cols64, stride_wv, stride_wk, ks, col_mask, k_mask, UPCAST_DOT)
                dh = tl.dot(d_in, w, input_precision=DOT_PRECISION)
                tl.atomic_add(dh_ptr + rows64[:, None] * H + ks[None, :], dh,
                              mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")
            if COMPUTE_DW:
                h = load_chunk(h_ptr, rows64, stride_hn, stride_hk, ks, row_mask, k_mask, UPCAST_DOT)
                dw = tl.dot(tl.trans(d_in), h, input_precision=DOT_PRECISION)
                tl.atomic_add(dw_ptr + cols64[:, None] * H + ks[None, :], dw,
                              mask=col_mask[:, None] & k_mask[None, :], sem="relaxed")


@triton.jit
def _tile_matters(d, tgt_ptr, g_ptr, rows, row_mask, col0, inv_temp, grad_filter_eps, BLOCK_V: tl.constexpr):
    """False when no row holds its target inside the tile and every |D| / |g / tau| (= p * c') is below eps:
    the tile's whole contribution is then below eps per entry and is skipped."""
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    has_target = tl.sum(((tgt >= col0) & (tgt < col0 + BLOCK_V) & (g != 0.0)).to(tl.int32), axis=0) > 0
    inv_g = tl.where(g != 0.0, 1.0 / tl.where(g != 0.0, tl.abs(g) * inv_temp, 1.0), 0.0)
    share = tl.max(tl.max(tl.abs(d) * inv_g[:, None], axis=1), axis=0)
    return has_target | (share >= grad_filter_eps)


def _configs(rows):
    return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, "GROUP_N": 8}, num_warps=w, num_stages=st)
            for bn, bv, bk, w, st in rows]


# 16-bit inputs. With the JIT's divisibility specialization (64, 256, 64) with 3 stages needs 253952 B of shared
# memory and (128, 256, 64) 278528 B, over the H100's 232448: gone; (64, 256, 64) runs with 2 stages instead.
_CONFIGS_16BIT = _configs([(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 256, 64, 8, 2)])
# fp32 inputs (IEEE dot, no tensor cores): at the 16-bit sizes every fp32 build spilled (32 registers and an
# 8-18 KB stack frame); these compile for sm_90 without spills.
_CONFIGS_FP32 = _configs([(64, 64, 32, 8, 3), (64, 64, 16, 4, 4), (32, 64, 32, 4, 3)])
_CONFIGS = _CONFIGS_16BIT + _CONFIGS_FP32
PRUNE = shared_memory_pruner("bwd", fp32_configs=_CONFIGS_FP32)
_autotuned = triton.autotune(_CONFIGS, key=["H", "V", "HAS_BIAS", "HAS_SOFTCAP", "COMPUTE_DH", "COMPUTE_DW",
                                            "COMPUTE_DB", "FILTER_GRAD"],
                             reset_to_zero=["dh_ptr", "dw_ptr", "db_ptr"],
                             prune_configs_by={"early_config_prune": PRUNE})(
    _linear_logprobs_bwd_kernel)

INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16, "GROUP_N": 2}


def linear_logprobs_backward(grad, hidden, weight, bias, targets, lse, temperature, softcap, need_hidden,
                             need_weight, need_bias, grad_filter_eps=0.0):
    """grad fp32 [N] (0 where ignored), the forward's inputs (hidden and weight with any strides, read in place)
    and lse fp32 [N] -> (d_hidden fp32 [N, H] | None, d_weight fp32 [V, H] | None, d_bias fp32 [V] | None),
    the gradients contiguous."""
    n, h = hidden.shape
    v = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dh = torch.zeros((n, h), **f32) if need_hidden else torch.empty(0, **f32)
    dw = torch.zeros((v, h), **f32) if need_weight else torch.empty(0, **f32)
    db = torch.zeros(v, **f32) if need_bias else torch.empty(0, **f32)
    bias_arg, inv_temp, softcap_arg, meta = launch_common(hidden, bias, temperature, softcap)
    args = (hidden, weight, bias_arg, targets, lse, grad, dh, dw, db, n, v, h, *hidden.stride(), *weight.stride(),
            inv_temp, softcap_arg, float(grad_filter_eps))
    meta.update(COMPUTE_DH=need_hidden, COMPUTE_DW=need_weight, COMPUTE_DB=need_bias, FILTER_GRAD=grad_filter_eps > 0)

    def grid(meta_):
        return (triton.cdiv(n, meta_["BLOCK_N"]) * triton.cdiv(v, meta_["BLOCK_V"]),)

    if interpreting():
        _linear_logprobs_bwd_kernel[grid(INTERPRETER_BLOCKS)](*args, **meta, **INTERPRETER_BLOCKS)
    else:
        tuned_before = len(_autotuned.cache)
        _autotuned[grid](*args, **meta)
        if len(_autotuned.cache) != tuned_before:
            # This call benchmarked configs, each adding into the atomically accumulated buffers. Whether a
            # Triton version re-zeroes them before its final launch varies: zero them and launch once more
            # with the config just chosen (now cached), so the first call of a new shape is exact too.
            for t in (dh, dw, db):
                t.zero_()
            _autotuned[grid](*args, **meta)
    return (dh if need_hidden else None, dw if need_weight else None, db if need_bias else None)
