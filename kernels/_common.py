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


# Shared memory one block may use on an H100 (sm_90): 227 KiB. shared_memory_estimate is an upper bound
# checked against the compiler (tests/test_kernels_compile_sm90.py), so configs are held to the real limit.
SHARED_MEMORY_BUDGET = 232448


def shared_memory_estimate(config, element_size, kind):
    """Upper bound on the bytes of shared memory a config needs on sm_90 in the build the GPU JIT makes.

    The JIT specializes pointers and sizes/strides divisible by 16 (`tt.divisibility`) and unit strides (a
    constant): every tile load is then vectorized and software-pipelined through shared memory, which an
    unspecialized build does not do (there the backward (128, 256) config needs 128 KiB, specialized 272 KiB).
    So the estimate assumes that worst (and usual) case:
    - "fwd": num_stages buffers of the h and W chunks, num_stages x [BLOCK_N + BLOCK_V, BLOCK_K]. Exact for
      16-bit inputs in Triton 3.9; fp32 uses one stage less.
    - "bwd": the same for the recompute, plus D and D^T as dot operands (2 x [BLOCK_N, BLOCK_V]) and an fp32
      [max(BLOCK_N, BLOCK_V), BLOCK_K] scratch for moving the dot results into the atomics' layout. Exact for
      bf16 (64, 256, 64) with 3 stages (253952 B), above the compiler's figure for the other configs.
    tests/sm90_compile.py compiles the configs with the JIT's specialization and tests check the bound."""
    kw = config.kwargs
    bn, bv, bk = kw["BLOCK_N"], kw["BLOCK_V"], kw["BLOCK_K"]
    pipelined = config.num_stages * (bn + bv) * bk * element_size
    if kind == "fwd":
        return pipelined
    if kind == "bwd":
        return pipelined + 2 * bn * bv * element_size + max(bn, bv) * bk * 4
    raise ValueError(f"unknown kernel kind {kind!r}; expected 'fwd' or 'bwd'")


def configs_for_dtype(configs, element_size, fp32_configs):
    """The configs the autotuner may try for inputs of this element size: fp32 has its own, smaller tiles
    (fp32 tiles at the 16-bit sizes spill registers heavily on sm_90, see tests/sm90_compile.py)."""
    fp32_ids = {id(c) for c in fp32_configs}
    own = [c for c in configs if (id(c) in fp32_ids) == (element_size == 4)]
    return own or list(configs)


def shared_memory_pruner(kind, fp32_configs=()):
    """Autotuner early_config_prune hook: keep this dtype's configs (configs_for_dtype), then drop those whose
    shared-memory estimate exceeds the H100's limit, so the tuner never compiles a config that cannot launch.
    The autotuner's key holds the tensors' dtypes (Triton adds them), so each dtype is tuned on its own list."""
    def estimate(config, element_size):
        return shared_memory_estimate(config, element_size, kind)

    def prune(configs, named_args, **kwargs):
        size = named_args["h_ptr"].element_size()
        own = configs_for_dtype(configs, size, fp32_configs)
        fitting = [c for c in own if estimate(c, size) <= SHARED_MEMORY_BUDGET]
        return fitting or [min(own, key=lambda c: estimate(c, size))]
    prune.kind = kind
    prune.estimate = estimate
    prune.fp32_configs = fp32_configs
    return prune


def dot_precision(dtype):
    # On a GPU, tl.dot on fp32 inputs runs in TF32 unless told otherwise: fp32 callers asked for fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_common(hidden, bias, temperature, softcap):
    """What every launch passes the same way: (bias pointer, 1 / temperature, softcap, constexpr flags).
    Without a bias, hidden stands in as a pointer that HAS_BIAS=False keeps unread; without a softcap, 1.0
    stands in and HAS_SOFTCAP=False keeps it unused. The kernels read hidden and weight through both of their
    strides (no copy); the bias [V] is read with unit stride, so a strided bias is copied (V elements)."""
    meta = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                DOT_PRECISION=dot_precision(hidden.dtype), UPCAST_DOT=upcast_dot(hidden.dtype))
    bias_arg = bias.contiguous() if bias is not None else hidden
    return bias_arg, 1.0 / temperature, (1.0 if softcap is None else softcap), meta


@triton.jit
def load_chunk(ptr, idx64, stride_row, stride_col, ks, idx_mask, k_mask, UPCAST_DOT: tl.constexpr):
    """Rows idx, columns ks of a strided matrix: a [len(idx), BLOCK_K] tile (0 outside the masks), widened to
    fp32 only where the interpreter needs it (see upcast_dot). Both strides are arguments, so a transposed or
    sliced weight is read in place; the JIT turns a unit stride into a constant (the contiguous fast path).
    Offsets are int64: stride_col * H overflows int32 for a transposed [H, V] weight at V*H >= 2^31."""
    x = tl.load(ptr + idx64[:, None] * stride_row + ks.to(tl.int64)[None, :] * stride_col,
                mask=idx_mask[:, None] & k_mask[None, :], other=0.0)
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
def logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_hk, stride_wv, stride_wk,
                inv_temp, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """fp32 logits l[BLOCK_N, BLOCK_V] for rows x cols, after bias, temperature and softcap."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        h = load_chunk(h_ptr, rows64, stride_hn, stride_hk, ks, row_mask, k_mask, UPCAST_DOT)
        w = load_chunk(w_ptr, cols64, stride_wv, stride_wk, ks, col_mask, k_mask, UPCAST_DOT)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc * inv_temp
    if HAS_SOFTCAP:
        # c * tanh(z / c), with tanh written through exp so it runs in the interpreter too
        acc = softcap * (1.0 - 2.0 / (tl.exp(2.0 * acc / softcap) + 1.0))
    return acc


@triton.jit
def d_tile(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_hk,
           stride_wv, stride_wk, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
           UPCAST_DOT: tl.constexpr):
    """D[BLOCK_N, BLOCK_V] = g (onehot - softmax) c' / tau, zero outside the valid rows and columns."""
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    l = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_hk, stride_wv,
                    stride_wk, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION,
                    UPCAST_DOT)
    d = (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - tl.exp(l - lse[:, None])) * g[:, None]
    if HAS_SOFTCAP:
        r = l / softcap
        d = d * (1.0 - r * r)
    d = d * inv_temp
    return tl.where(row_mask[:, None] & col_mask[None, :], d, 0.0)
