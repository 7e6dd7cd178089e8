import os

import torch
import triton
import triton.language as tl


def interpreting():
    """True when kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1): no autotuning there."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_dot(dtype):
    """Triton's CPU interpreter computes tl.dot on bfloat16 operands wrongly (loads and casts are fine):
    there, and only there, bf16 operands are widened to fp32 before the dot."""
    return interpreting() and dtype == torch.bfloat16


# Shared memory a config may plan for: the H100 allows 227 KiB per block; keep headroom for the compiler.
SHARED_MEMORY_BUDGET = 200 * 1024


def shared_memory_estimate(config, element_size, factor=1):
    """Bytes of shared memory one config may need: factor x (stages - 1) pipelined buffers of the h and W tiles
    [BLOCK_N + BLOCK_V, BLOCK_K]. factor=1 is exact for the forward kernel in fp32 on sm_90 (Triton 3.9) and an
    upper bound in bf16; the backward also stages D and the per-chunk operands and needs factor=2 to bound
    every config measured (tests/test_kernels_compile_sm90.py compiles them all for sm_90 and checks)."""
    kw = config.kwargs
    return factor * (config.num_stages - 1) * (kw["BLOCK_N"] + kw["BLOCK_V"]) * kw["BLOCK_K"] * element_size


def shared_memory_pruner(factor):
    """Autotuner early_config_prune hook: drop configs that may not fit in shared memory for this dtype (fp32
    tiles are twice the bf16 ones), so the tuner never compiles a config that cannot launch."""
    def prune(configs, named_args, **kwargs):
        size = named_args["h_ptr"].element_size()
        fitting = [c for c in configs if shared_memory_estimate(c, size, factor) <= SHARED_MEMORY_BUDGET]
        return fitting or [min(configs, key=lambda c: shared_memory_estimate(c, size, factor))]
    prune.factor = factor
    return prune


def dot_precision(dtype):
    # On a GPU, tl.dot on fp32 inputs runs in TF32 unless told otherwise: fp32 callers asked for fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_common(hidden, bias, temperature, softcap):
    """What every launch passes the same way: (bias pointer, 1 / temperature, softcap, constexpr flags).
    Without a bias, hidden stands in as a pointer that HAS_BIAS=False keeps unread; without a softcap, 1.0
    stands in and HAS_SOFTCAP=False keeps it unused."""
    meta = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                DOT_PRECISION=dot_precision(hidden.dtype), UPCAST_DOT=upcast_dot(hidden.dtype))
    return (bias if bias is not None else hidden), 1.0 / temperature, (1.0 if softcap is None else softcap), meta


@triton.jit
def load_chunk(ptr, idx64, stride, ks, idx_mask, k_mask, UPCAST_DOT: tl.constexpr):
    """Rows idx of a row-major matrix, columns ks: a [len(idx), BLOCK_K] tile (0 outside the masks), widened
    to fp32 only where the interpreter needs it (see upcast_dot)."""
    x = tl.load(ptr + idx64[:, None] * stride + ks[None, :], mask=idx_mask[:, None] & k_mask[None, :], other=0.0)
    if UPCAST_DOT:
        x = x.to(tl.float32)
    return x


@triton.jit
def as_dot_operand(x, like_ptr, UPCAST_DOT: tl.constexpr):
    """x cast to the element type of like_ptr for tl.dot (widened to fp32 where the interpreter needs it)."""
    y = x.to(like_ptr.dtype.element_ty)
    if UPCAST_DOT:
        y = y.to(tl.float32)
    return y


@triton.jit
def logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w, inv_temp, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """fp32 logits l[BLOCK_N, BLOCK_V] for rows x cols, after bias, temperature and softcap."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        h = load_chunk(h_ptr, rows64, stride_h, ks, row_mask, k_mask, UPCAST_DOT)
        w = load_chunk(w_ptr, cols64, stride_w, ks, col_mask, k_mask, UPCAST_DOT)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc * inv_temp
    if HAS_SOFTCAP:
        # c * tanh(z / c), with tanh written through exp so it runs in the interpreter too
        acc = softcap * (1.0 - 2.0 / (tl.exp(2.0 * acc / softcap) + 1.0))
    return acc


@triton.jit
def d_tile(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
            inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """D[BLOCK_N, BLOCK_V] = g (onehot - softmax) c' / tau, zero outside the valid rows and columns."""
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    l = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w, inv_temp, softcap,
                    HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
    d = (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - tl.exp(l - lse[:, None])) * g[:, None]
    if HAS_SOFTCAP:
        r = l / softcap
        d = d * (1.0 - r * r)
    d = d * inv_temp
    return tl.where(row_mask[:, None] & col_mask[None, :], d, 0.0)
