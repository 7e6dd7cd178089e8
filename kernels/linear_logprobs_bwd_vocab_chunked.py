"""Vocabulary-chunked backward: a Triton kernel writes D = g (onehot - softmax) c' / tau for all rows and one
chunk of the vocabulary into a bounded buffer [N, Vc]; cuBLAS then does the two products of the chunk.

- d_weight[chunk] = D^T @ hidden is one GEMM over all N rows: no accumulation across chunks, one rounding,
  as in an unfused backward.
- d_bias[chunk] = column sums of D (fp32).
- d_hidden += D @ weight[chunk] accumulates across chunks in an fp32 [N, H] buffer, in place (addmm_; no
  [N, H] temporary per chunk).
The D kernel orders its tiles in groups of GROUP_N row blocks (as the atomic backward does), so programs
running at the same time read the same weight tiles and a weight chunk is streamed from HBM about once per
group rather than once per row block.
No atomics (deterministic), the products run at GEMM speed, and the extra memory is the chunk buffer (at most
CHUNK_BYTES) plus the fp32 d_hidden. The recompute costs 2NHV, as in the fused-atomics backward.
"""
import torch
import triton
import triton.language as tl

from ._common import d_tile, interpreting, launch_common

CHUNK_BYTES = 256 * 1024 * 1024


@triton.jit
def _d_chunk_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, d_ptr, N, V, H, v_begin, v_len, stride_hn, stride_hk,
                    stride_wv, stride_wk, stride_d, inv_temp, softcap, HAS_BIAS: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, GROUP_N: tl.constexpr):
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    n_v_blocks = tl.cdiv(v_len, BLOCK_V)
    per_group = GROUP_N * n_v_blocks
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_row_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_begin + local
    row_mask = rows < N
    col_mask = local < v_len
    d = d_tile(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_hk,
               stride_wv, stride_wk, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION,
               UPCAST_DOT)
    out = d_ptr + rows.to(tl.int64)[:, None] * stride_d + local[None, :]
    tl.store(out, d.to(d_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


GPU_BLOCKS = {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64, "GROUP_N": 8, "num_warps": 8, "num_stages": 3}
INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16, "GROUP_N": 2}


def _add_matmul_fp32(acc, a, b):
    """acc (fp32) += a @ b, in place. fp32 inputs: addmm_. bf16/fp16 on CUDA: the GEMM's fp32 output written
    into acc (torch.addmm with out_dtype, torch >= 2.8); elsewhere a widened product is added."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    acc.addmm_(a.float(), b.float())


def linear_logprobs_backward_vocab_chunked(grad, hidden, weight, bias, targets, lse, temperature, softcap,
                                           need_hidden, need_weight, need_bias, chunk_bytes=None):
    """Same contract as linear_logprobs_bwd.linear_logprobs_backward (d_weight comes back in weight's dtype)."""
    n, h = hidden.shape
    v = weight.shape[0]
    blocks = INTERPRETER_BLOCKS if interpreting() else GPU_BLOCKS
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    vc = max(blocks["BLOCK_V"], budget // max(1, n * hidden.element_size()) // blocks["BLOCK_V"] * blocks["BLOCK_V"])
    vc = min(vc, v)
    buf = torch.empty((n, vc), dtype=hidden.dtype, device=hidden.device)
    dh = torch.zeros((n, h), dtype=torch.float32, device=hidden.device) if need_hidden else None
    # contiguous whatever weight's layout (empty_like would copy a transposed weight's strides)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_weight else None
    db = torch.empty(v, dtype=torch.float32, device=hidden.device) if need_bias else None
    bias_arg, inv_temp, softcap_arg, meta = launch_common(hidden, bias, temperature, softcap)
    meta.update(blocks)
    for v0 in range(0, v, vc):
        cur = min(vc, v - v0)
        d = buf[:, :cur]
        grid = (triton.cdiv(n, blocks["BLOCK_N"]) * triton.cdiv(cur, blocks["BLOCK_V"]),)
        _d_chunk_kernel[grid](hidden, weight, bias_arg, targets, lse, grad, buf, n, v, h, v0, cur, *hidden.stride(),
                              *weight.stride(), buf.stride(0), inv_temp, softcap_arg, **meta)
        if need_weight:
            torch.mm(d.t(), hidden, out=dw[v0:v0 + cur])
        if need_bias:
            db[v0:v0 + cur] = d.sum(0, dtype=torch.float32)
        if need_hidden:
            _add_matmul_fp32(dh, d, weight[v0:v0 + cur])
    return dh, dw, db
