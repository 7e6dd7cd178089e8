"""The chunk pass under every gradient-in-forward loss (fastalign.fused_grad): for each chunk of rows, the logits
tile, its row statistics, the loss's d loss / d logp on the chunk, and the chunk's share of the gradients, as plain
BLAS calls around the backend's row passes (op "loss_rows"); GradInForwardFunction carries the result through
autograd."""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastalign.backends import get_backend, resolve_backend

# Rows per chunk: the tile holds about CHUNK_ELEMENTS (64 MiB in fp32, 32 MiB in bf16; or one group, if a group is
# larger), in a multiple of 64 rows, but never fewer than MIN_CHUNK_ROWS: thinner GEMMs lose BLAS efficiency
# (2-core EPYC, fp32, N=2048 H=1024 V=32000, the three GEMMs of all chunks against the same GEMMs unchunked: 1.10x /
# 1.04x / 1.03x with 256 / 384 / 512 rows per chunk; 262 rows, a tile line not a multiple of 16 floats: 1.27x,
# hence the padded lines, see _chunk_pass). A smaller tile means less memory, more time.
CHUNK_ELEMENTS = 16 << 20
MIN_CHUNK_ROWS = 256


@dataclass(frozen=True)
class GradInForwardPlan:
    """Non-tensor inputs of ``GradInForwardFunction``: the row backend, logit options, chunk bounds and
    ``coeff_fn(start, stop, logp [stop - start]) -> d loss / d logp`` for the rows of one chunk."""

    backend: str
    temperature: float
    softcap: Optional[float]
    bounds: tuple
    coeff_fn: Callable


def rows_per_chunk(v, chunk_rows=None):
    """Rows per chunk for a vocabulary of v: ``chunk_rows`` if given, else CHUNK_ELEMENTS / v rounded down to a
    multiple of 64, at least MIN_CHUNK_ROWS."""
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
        return chunk_rows
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(v, 1) // 64 * 64)


def row_bounds(n, step):
    """Row bounds (start, stop) of consecutive chunks of ``step`` rows (the last one shorter) over n rows."""
    return tuple((s, min(s + step, n)) for s in range(0, n, step))


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def group_bounds(group_sizes, max_rows):
    """Row bounds (start, stop) of consecutive chunks, each holding whole groups and at most ``max_rows`` rows
    (a group larger than that is a chunk of its own). group_sizes: rows per group, in row order."""
    bounds, start, rows = [], 0, 0
    for size in group_sizes:
        if rows and rows + size > max_rows:
            bounds.append((start, start + rows))
            start, rows = start + rows, 0
        rows += size
    if rows:
        bounds.append((start, start + rows))
    return tuple(bounds)


def _chunk_pass(hidden, weight, bias, targets, plan, need_h, need_w, need_b):
    """logp [N] fp32 (fp64 for fp64 inputs) and the gradients (d_h [N, H] in hidden's dtype, d_w in weight's, d_b
    fp32 or fp64) of the plan's loss. bf16/fp16 inputs run their GEMMs in that type, as naive PyTorch's would; d_w
    then accumulates in that type too, chunk by chunk (as Liger-Kernel's chunked losses do): an fp32 [V, H]
    accumulator would cost twice the memory of the gradient itself."""
    from fastalign.chunk_pass_fused import fused_chunk_pass, fused_chunks_usable
    if fused_chunks_usable(hidden, weight, plan):
        return fused_chunk_pass(hidden, weight, bias, targets, plan, need_h, need_w, need_b)
    rows_impl = get_backend(plan.backend, op="loss_rows")
    ct = _compute_dtype(hidden)
    n, v = hidden.shape[0], weight.shape[0]
    inv_t = 1.0 / plan.temperature
    logp = torch.zeros(n, dtype=ct, device=hidden.device)
    d_h = torch.empty_like(hidden) if need_h else None
    # d_w and d_b: the first chunk writes them (no zero fill of a [V, H] buffer), the others add
    new = torch.empty if plan.bounds else torch.zeros
    d_w = new(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
    d_b = new(v, dtype=ct, device=weight.device) if need_b else None
    widest = max([e - s for s, e in plan.bounds] or [0])
    # the tile: [V, C] = logits^T, vocabulary-major (BLAS runs W h_c^T near full speed for thin chunks, see
    # csrc/linear_logprobs_rows.cpp), in the GEMMs' type; with a softcap and bf16/fp16 inputs the GEMMs write a
    # narrow buffer and the tile is fp32. Buffers are made once: a fresh large tensor per chunk costs page faults.
    tile_dtype = tile_dtype_for(hidden, plan.softcap)
    tile_buf = padded_buffer(v, widest, tile_dtype, hidden.device)
    widened = tile_dtype != hidden.dtype
    if widened:
        narrow_buf = padded_buffer(v, widest, hidden.dtype, hidden.device)
    bias_c = scaled_bias(bias, ct, inv_t)
    for i, (s, e) in enumerate(plan.bounds):
        hc, tgt = hidden[s:e], targets[s:e]
        tile = tile_buf[:, :e - s]
        narrow = narrow_buf[:, :e - s] if widened else None
        fill_tile(tile, narrow, hc, weight, bias_c, inv_t)
        lp, lse, shift = rows_impl.rows_logsumexp_(tile, tgt, plan)
        logp[s:e] = lp
        if need_h or need_w or need_b:
            tile_gradients(rows_impl, plan, tile, narrow, hc, weight, tgt, plan.coeff_fn(s, e, lp), lp, lse, shift,
                           d_h[s:e] if need_h else None, d_w, d_b, i == 0)
    return logp, d_h, d_w, d_b


def tile_dtype_for(hidden, softcap):
    """The tile's dtype: bf16/fp16 inputs keep it in their type (fp32 statistics) unless a softcap needs c'(l) from
    an fp32 tile; fp32 and fp64 inputs use theirs."""
    if hidden.dtype in (torch.bfloat16, torch.float16) and softcap is None:
        return hidden.dtype
    return _compute_dtype(hidden)


def scaled_bias(bias, ct, inv_t):
    """bias / temperature as a [V, 1] column in the compute dtype (the temperature is the GEMM's alpha and scales
    the bias, never the [V, C] tile in a pass of its own), or None."""
    return None if bias is None else (bias.to(ct) * inv_t).unsqueeze(1)


def fill_tile(tile, narrow, hc, weight, bias_c, inv_t):
    """tile [V, C] <- (W hc^T) / temperature + bias_c: one GEMM outside any parallel region (BLAS threads it itself),
    with 1 / temperature as its alpha, so a bf16 tile is rounded once, as F.linear's logits are (scaling hc or the
    tile first would round twice). bias_c is already divided by the temperature. narrow: a buffer shaped like the
    tile in the GEMM's (input) dtype when the tile is wider (bf16/fp16 inputs with a softcap), else None."""
    if narrow is not None:  # the fp32 tile takes the fp32 bias after the GEMM's one rounding
        tile.copy_(torch.addmm(narrow, weight, hc.t(), beta=0, alpha=inv_t, out=narrow))
        if bias_c is not None:
            tile.add_(bias_c)
    elif bias_c is not None:
        torch.addmm(bias_c.to(tile.dtype), weight, hc.t(), alpha=inv_t, out=tile)
    elif inv_t != 1.0:
        torch.addmm(tile, weight, hc.t(), beta=0, alpha=inv_t, out=tile)  # beta=0: the tile's old values unread
    else:
        torch.mm(weight, hc.t(), out=tile)


def tile_gradients(rows_impl, opts, tile, narrow, hc, weight, tgt, coeff, logp, lse, shift, d_h_c, d_w, d_b, first,
                   zero_targets=True):
    """One chunk's share of the gradients from its tile after ``rows_logsumexp_`` (E = exp(l - shift) without a
    softcap: _exp_tile_gradients; with one, the row pass forms d logits in the tile, which the same two GEMMs take).
    coeff [C]: d loss / d logp per row. d_h_c [C, H] is written; d_w, d_b are written when ``first``, else added to.
    opts: anything with ``temperature`` and ``softcap``. zero_targets=False: E's target entries are already 0."""
    inv_t = 1.0 / opts.temperature
    if opts.softcap is None:
        _exp_tile_gradients(tile, hc, weight, tgt, coeff, logp, lse, shift, inv_t, d_h_c, d_w, d_b, first,
                            zero_targets)
        return
    rows_impl.rows_dlogits_(tile, lse, shift, tgt, coeff, opts)
    if d_b is not None:
        _write_or_add(d_b, tile.sum(1), first)
    d = narrow.copy_(tile) if narrow is not None else tile
    if d_h_c is not None:
        torch.mm(d.t(), weight, out=d_h_c)
    if d_w is not None:
        _mm_write_or_add(d_w, d, hc, first)


def zero_target_entries(tile, tgt):
    """Set E's entry at each labelled row's target to 0 (see _exp_tile_gradients): tile [V, C], tgt [C]."""
    live_rows = (tgt >= 0).nonzero().squeeze(1)
    tile.index_put_((tgt.index_select(0, live_rows), live_rows), torch.zeros((), dtype=tile.dtype, device=tile.device))
    return live_rows


def padded_buffer(v, c, dtype, device):
    """A [V, ld] buffer for tiles of up to c columns, ld = _padded(c), with columns [c, ld) zeroed: they are never
    part of a tile, but a bf16 GEMM reads a matrix's padding and multiplies it by 0 (torch 2.13 CPU, [257, 45] in
    48-element lines). An uninitialized NaN there would make that product NaN, and the gradient with it."""
    buf = torch.empty(v, _padded(c), dtype=dtype, device=device)
    buf[:, c:].zero_()
    return buf


def _padded(c):
    """Tile line length for up to c rows: a multiple of 16 elements (BLAS took 1.27x the time of the three chunk
    GEMMs with 262-float lines against 1.08x with the same 262 columns in 272-float lines)."""
    return max(16, (c + 15) // 16 * 16)


def _write_or_add(dst, src, first):
    if first:
        dst.copy_(src)
    else:
        dst.add_(src)


def _mm_write_or_add(dst, a, b, first):
    if first:
        torch.mm(a, b, out=dst)
    else:
        dst.addmm_(a, b)


def _exp_tile_gradients(tile, hc, weight, tgt, coeff, logp, lse, shift, inv_t, d_h_c, d_w, d_b, first,
                        zero_targets=True):
    """Gradients of one chunk (no softcap) straight from the tile E = exp(l - shift) [V, C], without a pass that
    turns it into d logits. With g = coeff / tau (0 for ignored rows), f = -g exp(shift - lse) and E' = E with each
    row's target entry set to 0,

        d logits^T = E' diag(f) + onehot(y) diag(t),   t = g (1 - p_y) = -g expm1(logp)

    so d_h_c = f * (E'^T W) + t * W[y], d_W += E' (f * h_c) + t * h_c added to the rows y, d_b += E' f + t at y:
    the scaling lands on the thin [C, H] operands, not on the [V, C] tile. The target's term is taken out of the
    GEMMs and computed from logp: 1 - p_y from E_y would cancel when p_y is near 1 (in a bf16 tile E_y is only
    good to 2^-9, so a confident prediction's gradient would be mostly rounding error)."""
    ct = lse.dtype
    f, t, live_rows, y_live = exp_tile_factors(tile, tgt, coeff, logp, lse, shift, inv_t, zero_targets)
    y = tgt.clamp_min(0)
    if d_h_c is not None:
        prod = torch.mm(tile.t(), weight).to(ct)
        d_h_c.copy_(prod.mul_(f.unsqueeze(1)).addcmul_(t.unsqueeze(1), weight.index_select(0, y).to(ct)))
    t_live = t.index_select(0, live_rows)
    if d_w is not None:
        _mm_write_or_add(d_w, tile, (hc.to(ct) * f.unsqueeze(1)).to(weight.dtype), first)
        d_w.index_add_(0, y_live, (hc.index_select(0, live_rows).to(ct) * t_live.unsqueeze(1)).to(d_w.dtype))
    if d_b is not None:
        _write_or_add(d_b, torch.mv(tile, f.to(tile.dtype)).to(ct), first)
        d_b.index_add_(0, y_live, t_live)


def exp_tile_factors(tile, tgt, coeff, logp, lse, shift, inv_t, zero_targets=True):
    """The row factors of _exp_tile_gradients' formula: (f [C], t [C], the labelled rows live_rows and their
    targets y_live); with zero_targets, E's entry at each labelled row's target is set to 0 (E becomes E')."""
    ct = lse.dtype
    live = tgt >= 0
    gs = torch.where(live, coeff.to(ct) * inv_t, torch.zeros((), dtype=ct, device=tile.device))
    f = -gs * torch.exp(shift.to(ct) - lse)
    t = -gs * torch.expm1(logp.to(ct))
    live_rows = zero_target_entries(tile, tgt) if zero_targets else live.nonzero().squeeze(1)
    return f, t, live_rows, tgt.index_select(0, live_rows)


class GradInForwardFunction(torch.autograd.Function):
    """Forward runs the whole chunk pass and returns per-row log-probs (fp32, no gradient of their own) and
    ``grad_carrier``, a zero scalar whose gradient carries the loss's: backward scales the gradients computed
    in forward by the upstream gradient of ``grad_carrier`` (add it to the loss value)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, plan: GradInForwardPlan):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        logp, d_h, d_w, d_b = _chunk_pass(hidden, weight, bias, targets, plan, need_h, need_w, need_b)
        ctx.save_for_backward(d_h, d_w, d_b)
        ctx.bias_dtype = None if bias is None else bias.dtype  # d_h and d_w are already in their input's dtype
        ctx.mark_non_differentiable(logp)
        return logp, logp.new_zeros(())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _grad_logp, grad_carrier):
        # scaled in place: no second copy of d_weight. A second backward through the same graph
        # (retain_graph=True) after one with an upstream gradient other than 1 then fails autograd's check on the
        # saved tensors' versions, loudly (after a gradient of exactly 1 nothing was modified, and it succeeds).
        d_h, d_w, d_b = ctx.saved_tensors
        g = grad_carrier
        if not (g.device.type == "cpu" and float(g) == 1.0):  # loss.backward() on the loss itself: nothing to scale
            for d in (d_h, d_w, d_b):
                if d is not None:
                    d.mul_(g)  # g as fp32: a bf16-rounded scale would bias a bf16 d_h / d_w
        return d_h, d_w, None if d_b is None else d_b.to(ctx.bias_dtype), None, None


def _plan(hidden, bounds, coeff_fn, temperature, softcap, backend):
    name = resolve_backend(backend, hidden.device, hidden.dtype)
    return GradInForwardPlan(backend=name, temperature=float(temperature),
                             softcap=None if softcap is None else float(softcap), bounds=tuple(bounds),
                             coeff_fn=coeff_fn)


def run_grad_in_forward(hidden, weight, bias, targets, bounds, coeff_fn, *, temperature, softcap, backend):
    """(logp [N] fp32, grad_carrier scalar): see GradInForwardFunction. hidden [N, H] rows in chunk order,
    targets [N] with -1 for ignored rows, bounds from ``group_bounds`` or ``row_bounds``."""
    plan = _plan(hidden, bounds, coeff_fn, temperature, softcap, backend)
    return GradInForwardFunction.apply(hidden, weight, bias, targets, plan)


