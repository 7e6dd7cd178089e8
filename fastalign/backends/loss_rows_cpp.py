"""C++ row passes of the gradient-in-forward loss path (fastalign.chunk_pass), in place on a logits tile.

The contract every ``loss_rows_<backend>`` module follows (tile [V, C] fp32, fp64 for fp64 inputs, or bf16/fp16
without a softcap (then logp, lse and shift are fp32); row-major with lines possibly padded (stride(0) >= C),
vocabulary-major: already
((h W^T + b) / temperature)^T for the C rows of a chunk; targets [C] int64 with -1 for ignored rows):

    rows_logsumexp_(tile, targets, opts) -> (logp [C], lse [C], shift [C])
    rows_dlogits_(tile, lse, shift, targets, coeff [C], opts) -> None    tile <- coeff (onehot - p) c' / temperature

Between the two calls the tile holds exp(l - shift) without a softcap (the caller may take its gradients from that
directly: see chunk_pass._exp_tile_gradients; the torch backend works on a bf16/fp16 tile in fp32 one vocabulary block at a
time), and l with one.
"""
from typing import Optional, Tuple

import torch

from fastalign import _ext


# A tuple, not a list: torch.compile refuses a custom op that mutates an input and returns Tensor[] ("a custom
# (non-ATen) operator whose output has alias annotations"), and every loss_rows caller would stop compiling.
@torch.library.custom_op("fastalign::cpp_rows_logsumexp_", mutates_args=("tile",))
def _rows_logsumexp(tile: torch.Tensor, targets: torch.Tensor,
                    softcap: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_ext.C.rows_logsumexp_(tile, targets, softcap))


@_rows_logsumexp.register_fake
def _(tile, targets, softcap):
    dtype = torch.float32 if tile.dtype in (torch.bfloat16, torch.float16) else tile.dtype
    return tuple(tile.new_empty(tile.shape[1], dtype=dtype) for _ in range(3))


@torch.library.custom_op("fastalign::cpp_rows_dlogits_", mutates_args=("tile",))
def _rows_dlogits(tile: torch.Tensor, lse: torch.Tensor, shift: torch.Tensor, targets: torch.Tensor,
                  coeff: torch.Tensor, softcap: float, inv_temp: float) -> None:
    _ext.C.rows_dlogits_(tile, lse, shift, targets, coeff, softcap, inv_temp)


@_rows_dlogits.register_fake
def _(tile, lse, shift, targets, coeff, softcap, inv_temp):
    return None


def rows_logsumexp_(tile, targets, opts):
    logp, lse, shift = _rows_logsumexp(tile, targets, -1.0 if opts.softcap is None else opts.softcap)
    return logp, lse, shift


def rows_dlogits_(tile, lse, shift, targets, coeff, opts):
    _rows_dlogits(tile, lse, shift, targets, coeff, -1.0 if opts.softcap is None else opts.softcap,
                  1.0 / opts.temperature)


# The GEMM work of a thin chunk in one pass over the vocabulary (fp32, AVX-512; see chunk_pass_fused.py and
# csrc/linear_logprobs_chunk.cpp). Returns E^T W [rows, H] when need_p, else an empty [0, H].
@torch.library.custom_op("fastalign::cpp_chunk_gemms_", mutates_args=("tile", "d_weight"))
def _chunk_gemms(tile: torch.Tensor, rows: int, scaled_hidden: Optional[torch.Tensor], weight: torch.Tensor,
                 d_weight: Optional[torch.Tensor], first: bool, need_p: bool, next_hidden: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
    return _ext.C.chunk_gemms_(tile, rows, scaled_hidden, weight, d_weight, first, need_p, next_hidden, bias, alpha)


@_chunk_gemms.register_fake
def _(tile, rows, scaled_hidden, weight, d_weight, first, need_p, next_hidden, bias, alpha):
    return weight.new_empty(rows if need_p and rows > 0 else 0, weight.shape[1])


@torch.compiler.disable  # a plain Python answer: torch.compile need not (and cannot) trace the extension's call
def chunk_gemms_supported():
    """Whether chunk_gemms_ runs here: the extension is built with it (an older prebuilt one is not) and the CPU
    has AVX-512F."""
    c = _ext.C
    return c is not None and hasattr(c, "chunk_gemms_supported") and bool(c.chunk_gemms_supported())


def chunk_gemms_(tile, rows, scaled_hidden, weight, d_weight, first, need_p, next_hidden, bias, alpha):
    """tile [V, ld] fp32 (E = exp(l - shift) in its first ``rows`` columns; ld a multiple of 16), scaled_hidden
    [rows, H] and d_weight [V, H] (both or neither), next_hidden [Cn, H] or None, bias [V] (already divided by the
    temperature) or None, alpha = 1 / temperature. d_weight (+)= E scaled_hidden (written when ``first``); returns
    E^T W [rows, H] when need_p; then tile <- alpha W next_hidden^T + bias in its first Cn columns, 0 in the rest."""
    return _chunk_gemms(tile, rows, scaled_hidden, weight, d_weight, first, need_p, next_hidden, bias, float(alpha))
