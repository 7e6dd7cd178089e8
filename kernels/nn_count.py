"""Nearest-neighbour counting kernel (clone-robust weights): counts [M] of uniform box samples per nearest
alternative, all groups in one launch, never an [S, M] distance matrix.

Program p owns BLOCK_S samples of one group (p // blocks_per_group). It draws them in registers from the
counter-based hash (bit-identical to nn_count_torch.py and csrc/nn_count.cpp), walks the group's alternatives
in tiles of BLOCK_M with score = |x|^2 - 2 s.x (tl.dot, fp32; |s|^2 is the same for every alternative) and a
running (min, argmin) per sample, then counts: a second walk over only the tiles between the smallest and
the largest argmin adds each alternative's count once per program (masked to non-zero counts), not one
atomic per sample.
"""
import contextlib

import torch
import triton
import triton.language as tl

from fastalign.kernels._common import dot_precision

BLOCK_S = 64
BLOCK_M = 32
MAX_SINGLE_K = 128  # up to this (padded) d the sample tile is drawn once and kept in registers


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _sample_tile(index, keys_ptr, width_ptr, g, ks, d):
    """Samples [BLOCK_S, BLOCK_K] fp32 (0 in dimensions >= d) for uint32 indices [BLOCK_S], dims ks."""
    k_ok = ks < d
    key = tl.load(keys_ptr + g * d + ks, mask=k_ok, other=0).to(tl.uint32, bitcast=True)
    width = tl.load(width_ptr + g * d + ks, mask=k_ok, other=0.0)
    v = _hash32(_hash32(index[:, None] ^ key[None, :]) + key[None, :])
    u = ((v >> 8) | 1).to(tl.float32) * 5.9604644775390625e-08
    return (u - 0.5) * width[None, :]


@triton.jit
def _nn_count_kernel(x_ptr, sq_ptr, start_ptr, keys_ptr, width_ptr, counts_ptr, num_samples, d, blocks_per_group,
                     BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    g = pid // blocks_per_group
    rows = (pid % blocks_per_group) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < num_samples
    index = rows.to(tl.uint32)
    m_lo = tl.load(start_ptr + g).to(tl.int32)
    m_hi = tl.load(start_ptr + g + 1).to(tl.int32)
    ks0 = tl.arange(0, BLOCK_K)
    if SINGLE_K:
        s = _sample_tile(index, keys_ptr, width_ptr, g, ks0, d)
    best = tl.full([BLOCK_S], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_S], tl.int32) + m_lo
    for m0 in range(m_lo, m_hi, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < m_hi
        if SINGLE_K:
            x = tl.load(x_ptr + ms.to(tl.int64)[:, None] * d + ks0[None, :], mask=m_ok[:, None] & (ks0[None, :] < d),
                        other=0.0)
            dot = tl.dot(s, tl.trans(x), input_precision=DOT_PRECISION)
        else:  # large d: redraw each chunk of the sample tile (cheap integer work) instead of holding it
            dot = tl.zeros([BLOCK_S, BLOCK_M], tl.float32)
            for k0 in range(0, d, BLOCK_K):
                ks = k0 + ks0
                s_k = _sample_tile(index, keys_ptr, width_ptr, g, ks, d)
                x = tl.load(x_ptr + ms.to(tl.int64)[:, None] * d + ks[None, :],
                            mask=m_ok[:, None] & (ks[None, :] < d), other=0.0)
                dot += tl.dot(s_k, tl.trans(x), input_precision=DOT_PRECISION)
        sq = tl.load(sq_ptr + ms, mask=m_ok, other=float("inf"))
        score = sq[None, :] - 2.0 * dot
        tile_min, tile_arg = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_min < best  # strict: earlier tiles win ties, as in torch.argmin
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, m0 + tile_arg.to(tl.int32), best_idx)
    # count: only the tiles that some sample of this program chose
    lo = tl.min(tl.where(row_ok, best_idx, m_hi), axis=0)
    hi = tl.max(tl.where(row_ok, best_idx, m_lo - 1), axis=0)
    for m0 in range(lo, hi + 1, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        hit = (best_idx[:, None] == ms[None, :]) & row_ok[:, None]
        c = tl.sum(hit.to(tl.int32), axis=0)
        tl.atomic_add(counts_ptr + ms, c, mask=c > 0, sem="relaxed")


def nn_count(points, sq_norms, group_start, keys, width, num_samples):
    """counts int64 [M]; the contract of fastalign/backends/nn_count_torch.py."""
    m_total, d = points.shape
    n_groups = group_start.numel() - 1
    block_k = max(16, triton.next_power_of_2(d))
    single_k = block_k <= MAX_SINGLE_K
    if not single_k:
        block_k = 64
    blocks_per_group = triton.cdiv(num_samples, BLOCK_S)
    counts = torch.zeros(m_total, dtype=torch.int32, device=points.device)
    grid = (n_groups * blocks_per_group,)
    with torch.cuda.device(points.device) if points.is_cuda else contextlib.nullcontext():
        _nn_count_kernel[grid](points, sq_norms, group_start, keys, width, counts, num_samples, d, blocks_per_group,
                               BLOCK_S=BLOCK_S, BLOCK_M=BLOCK_M, BLOCK_K=block_k, SINGLE_K=single_k,
                               DOT_PRECISION=dot_precision(torch.float32))
    return counts.to(torch.int64)

