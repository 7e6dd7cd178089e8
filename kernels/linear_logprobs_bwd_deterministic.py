"""Deterministic backward: the same D tiles as linear_logprobs_bwd, but no atomics.

Two kernels, each owning its output rows so that plain read-modify-write is race-free and the summation
order is fixed: `_dh_kernel` owns a block of rows and sweeps the vocabulary (d_hidden); `_dw_kernel` owns
a block of the vocabulary and sweeps the rows (d_weight, d_bias). The price is one more recompute of the
logits (8NHV instead of 6NHV for the backward); results are bitwise identical run to run.
"""
import torch
import triton
import triton.language as tl

from ._common import as_dot_operand, d_tile, interpreting, launch_common, load_chunk


@triton.jit
def _dh_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, dh_ptr, N, V, H, stride_hn, stride_hk, stride_wv,
               stride_wk, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        d = d_tile(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, rows, cols, row_mask, col_mask, H, stride_hn,
                   stride_hk, stride_wv, stride_wk, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K,
                   DOT_PRECISION, UPCAST_DOT)
        d_in = as_dot_operand(d, h_ptr, UPCAST_DOT)
        cols64 = cols.to(tl.int64)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < H
            w = load_chunk(w_ptr, cols64, stride_wv, stride_wk, ks, col_mask, k_mask, UPCAST_DOT)
            out = dh_ptr + rows64[:, None] * H + ks[None, :]
            m = row_mask[:, None] & k_mask[None, :]
            tl.store(out, tl.load(out, mask=m, other=0.0) + tl.dot(d_in, w, input_precision=DOT_PRECISION), mask=m)


@triton.jit
def _dw_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, dw_ptr, db_ptr, N, V, H, stride_hn, stride_hk, stride_wv,
               stride_wk, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    cols64 = cols.to(tl.int64)
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        d = d_tile(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, rows, cols, row_mask, col_mask, H, stride_hn,
                   stride_hk, stride_wv, stride_wk, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K,
                   DOT_PRECISION, UPCAST_DOT)
        if COMPUTE_DB:
            db += tl.sum(d, axis=0)
        if COMPUTE_DW:
            d_in = as_dot_operand(d, h_ptr, UPCAST_DOT)
            rows64 = rows.to(tl.int64)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < H
                h = load_chunk(h_ptr, rows64, stride_hn, stride_hk, ks, row_mask, k_mask, UPCAST_DOT)
                out = dw_ptr + cols64[:, None] * H + ks[None, :]
                m = col_mask[:, None] & k_mask[None, :]
                tl.store(out, tl.load(out, mask=m, other=0.0) +
                         tl.dot(tl.trans(d_in), h, input_precision=DOT_PRECISION), mask=m)
    if COMPUTE_DB:
        tl.store(db_ptr + cols, db, mask=col_mask)


# Fixed tiles (no autotuning): a deterministic result must not depend on which config a tuner picked. fp32 has
# smaller ones: at the 16-bit tiles its _dw_kernel build spilled (32 registers, a 13 KB stack frame on sm_90).
GPU_BLOCKS = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
GPU_BLOCKS_FP32 = {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16}


def linear_logprobs_backward_deterministic(grad, hidden, weight, bias, targets, lse, temperature, softcap,
                                           need_hidden, need_weight, need_bias):
    """Same contract as linear_logprobs_bwd.linear_logprobs_backward, bitwise reproducible."""
    n, h = hidden.shape
    v = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    blocks = INTERPRETER_BLOCKS if interpreting() else GPU_BLOCKS_FP32 if hidden.dtype == torch.float32 else GPU_BLOCKS
    bias_arg, inv_temp, softcap_arg, meta = launch_common(hidden, bias, temperature, softcap)
    meta.update(blocks)
    common = (hidden, weight, bias_arg, targets, lse, grad)
    scalars = (n, v, h, *hidden.stride(), *weight.stride(), inv_temp, softcap_arg)
    dh = dw = db = None
    if need_hidden:
        dh = torch.zeros((n, h), **f32)
        _dh_kernel[(triton.cdiv(n, blocks["BLOCK_N"]),)](*common, dh, *scalars, **meta)
    if need_weight or need_bias:
        dw = torch.zeros((v, h), **f32) if need_weight else torch.empty(0, **f32)
        db = torch.zeros(v, **f32) if need_bias else torch.empty(0, **f32)
        _dw_kernel[(triton.cdiv(v, blocks["BLOCK_V"]),)](*common, dw, db, *scalars, COMPUTE_DW=need_weight,
                                                         COMPUTE_DB=need_bias, **meta)
    return dh, dw if need_weight else None, db if need_bias else None
