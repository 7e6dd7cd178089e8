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
from typing import Tuple

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
