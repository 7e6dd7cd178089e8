"""Forward kernel: per-row logsumexp over the vocabulary and the target logit, never storing logits.

Programs cover (row block, vocabulary split) pairs on grid axis 0 (CUDA's y/z axes stop at 65535).
Each sweeps its split in [BLOCK_N, BLOCK_V] tiles with an online (max, sum-exp) in fp32 and writes
partials; the launcher merges the splits. Splitting the vocabulary keeps the GPU busy when N is small.
"""
import torch
import triton
import triton.language as tl

from ._common import interpreting, launch_common, logits_tile, shared_memory_pruner


@triton.jit
def _linear_logprobs_fwd_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, m_ptr, s_ptr, t_ptr, N, V, H, stride_hn, stride_hk,
                                stride_wv, stride_wk, n_splits, inv_temp, softcap, HAS_BIAS: tl.constexpr,
                                HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                                BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    pid_n = pid % n_row_blocks
    split = pid // n_row_blocks
    v_blocks = tl.cdiv(V, BLOCK_V)
    per_split = tl.cdiv(v_blocks, n_splits)
    v_begin = split * per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + per_split * BLOCK_V)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        l = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_hk, stride_wv,
                        stride_wk, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION,
                        UPCAST_DOT)
        l = tl.where(col_mask[None, :], l, float("-inf"))
        t += tl.sum(tl.where(cols[None, :] == tgt[:, None], l, 0.0), axis=1)
        new_m = tl.maximum(m, tl.max(l, axis=1))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(l - new_m[:, None]), axis=1)
        m = new_m
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=row_mask)
    tl.store(s_ptr + out, s, mask=row_mask)
    tl.store(t_ptr + out, t, mask=row_mask)


# 16-bit inputs: tensor-core (wgmma) tiles. fp32 inputs (dot in IEEE fp32, no tensor cores) get smaller tiles:
# at the 16-bit sizes the fp32 builds spill (e.g. (128, 256, 64): 32 registers and a 14 KB stack frame); these
# compile for sm_90 without spills (tests/sm90_compile.py reports registers and spills per config).
_CONFIGS_16BIT = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bv, bk, w, st in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4),
                              (128, 128, 64, 4, 4), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4)]
]
_CONFIGS_FP32 = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bv, bk, w, st in [(64, 128, 32, 8, 3), (64, 64, 64, 4, 3), (32, 128, 32, 4, 3), (64, 64, 32, 4, 3)]
]
_CONFIGS = _CONFIGS_16BIT + _CONFIGS_FP32
PRUNE = shared_memory_pruner("fwd", fp32_configs=_CONFIGS_FP32)
# Keyed on what changes the best tile (H, V; dtypes are added by Triton), not on N: a new batch length
# must not retune.
_autotuned = triton.autotune(_CONFIGS, key=["H", "V", "HAS_BIAS", "HAS_SOFTCAP"],
                             prune_configs_by={"early_config_prune": PRUNE})(
    _linear_logprobs_fwd_kernel)

INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16}


def _num_splits(n, v, device):
    """Vocabulary splits so that (row blocks x splits) fills the GPU at least ~2 waves."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(n, 128)
    return max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(v, 1024)))


def linear_logprobs_forward(hidden, weight, bias, targets, temperature, softcap):
    """hidden [N, H], weight [V, H] (any strides: read in place, never copied), bias [V] or None, targets [N]
    int64 (-1 ignored) -> (logp fp32 [N], lse fp32 [N])."""
    n, h = hidden.shape
    v = weight.shape[0]
    splits = _num_splits(n, v, hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m = torch.empty((splits, n), **f32)
    s = torch.empty((splits, n), **f32)
    t = torch.empty((splits, n), **f32)
    bias_arg, inv_temp, softcap_arg, meta = launch_common(hidden, bias, temperature, softcap)
    args = (hidden, weight, bias_arg, targets, m, s, t, n, v, h, *hidden.stride(), *weight.stride(), splits, inv_temp,
            softcap_arg)
    if interpreting():
        _linear_logprobs_fwd_kernel[(triton.cdiv(n, INTERPRETER_BLOCKS["BLOCK_N"]) * splits,)](
            *args, **meta, **INTERPRETER_BLOCKS)
    else:
        _autotuned[lambda META: (triton.cdiv(n, META["BLOCK_N"]) * splits,)](*args, **meta)
    if splits == 1:
        lse = m[0] + torch.log(s[0])
        tgt_logit = t[0]
    else:
        big_m = m.max(0).values
        lse = big_m + torch.log((s * torch.exp(m - big_m)).sum(0))
        tgt_logit = t.sum(0)
    logp = torch.where(targets >= 0, tgt_logit - lse, torch.zeros_like(lse))
    return logp, lse
