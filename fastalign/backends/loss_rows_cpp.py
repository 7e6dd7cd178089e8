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


# The GEMM work of a thin chunk in one pass over the vocabulary (fp32, AVX-512 or AVX2; see chunk_pass_fused.py and
# csrc/linear_logprobs_chunk.cpp). Returns (E'^T W [rows, H] when need_p else an empty [0, H], the next chunk's
# logits' column max [Cn] and sum of exp(logit - max) [Cn]).
@torch.library.custom_op("fastalign::cpp_chunk_gemms_", mutates_args=("tile", "d_weight", "d_bias"))
def _chunk_gemms(tile: torch.Tensor, rows: int, scaled_hidden: Optional[torch.Tensor], weight: torch.Tensor,
                 d_weight: Optional[torch.Tensor], first: bool, need_p: bool, next_hidden: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], alpha: float, exp_shift: Optional[torch.Tensor],
                 targets: Optional[torch.Tensor], d_bias: Optional[torch.Tensor],
                 bias_scale: Optional[torch.Tensor],
                 target_values: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p, mx, se = _ext.C.chunk_gemms_(tile, rows, scaled_hidden, weight, d_weight, first, need_p, next_hidden, bias,
                                    alpha, exp_shift, targets, d_bias, bias_scale, target_values)
    return p, mx, se


@_chunk_gemms.register_fake
def _(tile, rows, scaled_hidden, weight, d_weight, first, need_p, next_hidden, bias, alpha, exp_shift, targets,
      d_bias, bias_scale, target_values):
    cn = 0 if next_hidden is None else next_hidden.shape[0]
    return (weight.new_empty(rows if need_p and rows > 0 else 0, weight.shape[1]), weight.new_empty(cn),
            weight.new_empty(cn))


@torch.compiler.disable  # a plain Python answer: torch.compile need not (and cannot) trace the extension's call
def chunk_gemms_supported():
    """Whether chunk_gemms_ and chunk_step_ run here: the extension is built with their current contract (an older
    prebuilt one is not) and the CPU has AVX-512F and AVX-512BW, or AVX2 and FMA (chunk_gemms_isa() says which
    tiles run)."""
    c = _ext.C
    return (c is not None and getattr(c, "chunk_gemms_version", 0) == 4 and hasattr(c, "chunk_gemms_supported")
            and bool(c.chunk_gemms_supported()))


@torch.compiler.disable
def chunk_amx_supported():
    """Whether chunk_gemms_ adds to d_weight and computes the next chunk's logits on AMX here (Intel Sapphire Rapids
    or later, and an OS that grants the tile state): fp32 products as six bf16 part products, at fp32's accuracy
    (csrc/chunk_amx.h)."""
    c = _ext.C
    return chunk_gemms_supported() and hasattr(c, "chunk_amx_supported") and bool(c.chunk_amx_supported())


@torch.compiler.disable
def set_chunk_amx(enabled):
    """Turn chunk_gemms_'s AMX path on or off (on by default; it runs only where chunk_amx_supported(); off, AVX-512
    does all three products and results differ from AMX's in rounding only). Returns the previous setting (False
    without an extension that has the switch)."""
    c = _ext.C
    if c is None or not hasattr(c, "set_chunk_amx"):
        return False
    return bool(c.set_chunk_amx(bool(enabled)))


@torch.compiler.disable
def set_chunk_avx512(enabled):
    """Let chunk_gemms_ use its AVX-512 tiles where the CPU has them (on by default); off, its AVX2 tiles run (and
    AMX does not: it comes with the AVX-512 tiles). Results differ between the two in rounding only. Returns the
    previous setting (False without an extension that has the switch)."""
    c = _ext.C
    if c is None or not hasattr(c, "set_chunk_avx512"):
        return False
    return bool(c.set_chunk_avx512(bool(enabled)))


@torch.compiler.disable
def chunk_gemms_isa():
    """The tiles chunk_gemms_ runs here now: "avx512+amx", "avx512", "avx2", or "" where it does not run."""
    c = _ext.C
    if not chunk_gemms_supported():
        return ""
    if not hasattr(c, "chunk_gemms_isa"):  # an extension from before the AVX2 tiles: AVX-512 only
        return "avx512+amx" if chunk_amx_supported() else "avx512"
    return str(c.chunk_gemms_isa())


def chunk_gemms_(tile, rows, scaled_hidden, weight, d_weight, first, need_p, next_hidden, bias, alpha,
                 exp_shift=None, targets=None, d_bias=None, bias_scale=None, target_values=None):
    """One chunk's pass over the vocabulary, in place on tile [V, ld] fp32 (ld a multiple of 16) and d_weight /
    d_bias. The first ``rows`` columns of the tile hold this chunk's logits l when exp_shift [rows] and targets
    [rows] (-1: ignored) are given, and become E' = exp(l - exp_shift) with each labelled row's target entry set
    to target_values [rows] (0 if None); without them they hold E' already. Then d_weight [V, H] (+)= E' scaled_hidden [rows, H] (both or neither;
    written when ``first``), d_bias [V] (+)= E' bias_scale [rows] (both or neither), and E'^T W [rows, H] is
    returned when need_p. Last, tile <- alpha W next_hidden^T + bias (next_hidden [Cn, H] or None; bias [V]
    already divided by the temperature, alpha = 1 / temperature) in its first Cn columns, 0 in the rest, and the
    new logits' column max [Cn] and sum of exp(logit - max) [Cn] are returned (empty without next_hidden)."""
    return _chunk_gemms(tile, rows, scaled_hidden, weight, d_weight, first, need_p, next_hidden, bias, float(alpha),
                        exp_shift, targets, d_bias, bias_scale, target_values)


# One chunk of the fused pass with its per-row arithmetic (csrc/chunk_step.cpp): in place, returns nothing.
@torch.library.custom_op("fastalign::cpp_chunk_step_",
                         mutates_args=("tile", "logp", "stats", "d_weight", "d_hidden", "d_bias"))
def _chunk_step(tile: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: float,
                hidden: torch.Tensor, targets: torch.Tensor, logp: torch.Tensor, stats: torch.Tensor, start: int,
                stop: int, next_start: int, next_stop: int, coeff: Optional[torch.Tensor],
                d_weight: Optional[torch.Tensor], d_hidden: Optional[torch.Tensor], d_bias: Optional[torch.Tensor],
                first: bool) -> None:
    _ext.C.chunk_step_(tile, weight, bias, alpha, hidden, targets, logp, stats, start, stop, next_start, next_stop,
                       coeff, d_weight, d_hidden, d_bias, first)


@_chunk_step.register_fake
def _(tile, weight, bias, alpha, hidden, targets, logp, stats, start, stop, next_start, next_stop, coeff, d_weight,
      d_hidden, d_bias, first):
    return None


def chunk_step_(tile, weight, bias, alpha, hidden, targets, logp, stats, start, stop, next_start, next_stop,
                coeff=None, d_weight=None, d_hidden=None, d_bias=None, first=False):
    """One chunk of chunk_pass_fused's loop, in place (fp32; tile [V, ld], stats [2, ld], hidden [N, H], targets
    [N] int64, negative for ignored rows, logp [N]). On entry the tile holds the logits of rows [start, stop), stats
    their column max and sum of exp, logp their log-probs. With coeff [stop - start] (d loss / d logp): the rows'
    share of d_weight [V, H] and d_bias [V] (written when ``first``, else added to) and their rows of d_hidden
    [N, H]. Then the tile, stats and logp hold those of rows [next_start, next_stop) (logp 0 for ignored rows).
    bias [V] is already divided by the temperature; alpha = 1 / temperature."""
    _chunk_step(tile, weight, bias, float(alpha), hidden, targets, logp, stats, int(start), int(stop),
                int(next_start), int(next_stop), coeff, d_weight, d_hidden, d_bias, bool(first))
