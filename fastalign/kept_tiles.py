"""The fused op on CPU with gradients and ``backend="auto"``: keep the logits tile from forward to backward.

The recompute path (``backend="cpp"``) does one GEMM in forward and three in backward (the logits again, then
d_hidden and d_weight), in O(chunk) memory. Naive PyTorch does three GEMMs plus a few passes over a stored [N, V].
Where the GEMMs dominate (fp32, H >= 1024 on a 2-core EPYC: 1.13x naive's time at N=2048, V=32000), that fourth
GEMM costs more than naive's passes. ``auto`` must never pick a CPU path slower than naive (issue 10), so it
takes this path instead: naive's three GEMMs and none of its extra passes.

    forward   T = (W H^T + b) / tau       [V, N], one GEMM
              row pass: logp, lse; T <- E = exp(l - shift); then E' = E with each row's target entry set to 0
    backward  g = upstream / tau,  f = -g exp(shift - lse),  t = -g expm1(logp)
              d_H = f * (E'^T W) + t * W[y],   d_W = E' (f * H) + t * H added at rows y,   d_b = E' f + t at y

These are two GEMMs over all rows at once (see chunk_pass._exp_tile_gradients for why the target's term is
taken from logp). With a softcap the tile keeps l. Backward then forms d logits chunk by chunk on a copy, because
the kept tile must survive a second backward with retain_graph=True, and runs the same two GEMMs per chunk.
bf16/fp16 inputs instead gather d logits in the input dtype and run two GEMMs over all rows, so d_weight is
accumulated in fp32 inside BLAS.

Memory: one [V, N] tile in the GEMMs' type. bf16/fp16 inputs without a softcap keep theirs. With a softcap the
tile is fp32, and backward adds a [V, N] d logits buffer in the input dtype. Naive keeps the logits, their
log-softmax and d logits. Only labelled rows enter. A tile over MAX_TILE_BYTES is not kept: auto then
recomputes, as ``backend="cpp"`` always does.
"""
import torch

from fastalign.backends import get_backend
from fastalign.chunk_pass import (_compute_dtype, _padded, _write_or_add, fill_tile, padded_buffer, row_bounds,
                                  rows_per_chunk, scaled_bias, tile_dtype_for, tile_gradients, zero_target_entries)

# The largest tile auto keeps (bytes; fp32 [V, N] at V=32000 is 1 GiB at N=8192). Above it auto recomputes, in
# O(chunk) memory, as it does on CUDA: naive PyTorch would need about three times this, and a user at that size is
# after memory, not the last fifth of the time.
MAX_TILE_BYTES = 1 << 30


class KeptTileFunction(torch.autograd.Function):
    """hidden [N, H] (all rows labelled), weight [V, H], bias [V] or None, targets [N] in [0, V), opts: a
    LogprobOptions whose backend names the row passes (op "loss_rows"). Returns logp [N] fp32 (fp64 for fp64).
    Deterministic for a given thread count, like the cpp backend (``opts.deterministic`` asks nothing more)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts):
        rows_impl = get_backend(opts.backend, op="loss_rows")
        ct = _compute_dtype(hidden)
        n, v = hidden.shape[0], weight.shape[0]
        inv_t = 1.0 / opts.temperature
        tile_dtype = tile_dtype_for(hidden, opts.softcap)
        tile = padded_buffer(v, n, tile_dtype, hidden.device)[:, :n]
        bias_c = scaled_bias(bias, ct, inv_t)
        if tile_dtype == hidden.dtype:
            fill_tile(tile, None, hidden, weight, bias_c, inv_t)
        else:  # bf16/fp16 with a softcap: an fp32 tile, filled chunk by chunk through a small GEMM buffer
            step = min(rows_per_chunk(v), n)
            narrow_buf = padded_buffer(v, step, hidden.dtype, hidden.device)
            for s, e in row_bounds(n, step):
                fill_tile(tile[:, s:e], narrow_buf[:, :e - s], hidden[s:e], weight, bias_c, inv_t)
            del narrow_buf
        logp, lse, shift = rows_impl.rows_logsumexp_(tile, targets, opts)
        if opts.softcap is None:
            zero_target_entries(tile, targets)  # E' of the docstring, once here: backward never writes to the tile
        ctx.opts = opts
        ctx.save_for_backward(hidden, weight, bias, targets, tile, logp, lse, shift)
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        hidden, weight, bias, targets, tile, logp, lse, shift = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        coeff = grad_logp.to(lse.dtype)
        # A row with a zero upstream gradient contributes nothing, but 0 times its tile column is NaN when that column
        # is not finite (an inf hidden row, say): leave such rows out, as the recompute backward leaves out every
        # zero-gradient row. Only then is a copy of the tile's other columns made.
        skip = (coeff == 0) & ~torch.isfinite(lse)
        if bool(skip.any()):
            keep = (~skip).nonzero().squeeze(1)
            d_h, d_w, d_b = _gradients(ctx.opts, tile.index_select(1, keep), hidden.index_select(0, keep), weight,
                                       targets[keep], coeff[keep], logp[keep], lse[keep], shift[keep],
                                       need_h, need_w, need_b)
            if d_h is not None:
                d_h = torch.zeros_like(hidden).index_copy_(0, keep, d_h)
        else:
            d_h, d_w, d_b = _gradients(ctx.opts, tile, hidden, weight, targets, coeff, logp, lse, shift,
                                       need_h, need_w, need_b)
        return d_h, d_w, None if d_b is None else d_b.to(bias.dtype), None, None


def _gradients(opts, tile, hidden, weight, targets, coeff, logp, lse, shift, need_h, need_w, need_b):
    """(d_h, d_w, d_b) of sum(coeff * logp) from the kept tile [V, n]; None where not needed."""
    rows_impl = get_backend(opts.backend, op="loss_rows")
    n, v = hidden.shape[0], weight.shape[0]
    d_h = torch.empty_like(hidden) if need_h else None
    d_w = torch.empty_like(weight) if need_w else None
    d_b = torch.empty(v, dtype=lse.dtype, device=weight.device) if need_b else None
    if n == 0:  # every row skipped
        return (d_h, None if d_w is None else d_w.zero_(), None if d_b is None else d_b.zero_())
    if opts.softcap is None:  # all rows at once: two full-size GEMMs, nothing written to the tile
        tile_gradients(rows_impl, opts, tile, None, hidden, weight, targets, coeff, logp, lse, shift,
                       d_h, d_w, d_b, True, zero_targets=False)
    elif tile.dtype == hidden.dtype:  # fp32/fp64: d logits chunk by chunk on a copy of the kept tile
        step = min(rows_per_chunk(v), n)
        scratch = padded_buffer(v, step, tile.dtype, tile.device)
        for i, (s, e) in enumerate(row_bounds(n, step)):
            tile_gradients(rows_impl, opts, scratch[:, :e - s].copy_(tile[:, s:e]), None, hidden[s:e], weight,
                           targets[s:e], coeff[s:e], logp[s:e], lse[s:e], shift[s:e],
                           d_h[s:e] if need_h else None, d_w, d_b, i == 0)
    else:  # bf16/fp16: d logits of every row in the input dtype, then one GEMM each, as naive's
        _narrow_softcap_gradients(rows_impl, opts, tile, hidden, weight, targets, coeff, lse, shift, d_h, d_w, d_b)
    return d_h, d_w, d_b


def _narrow_softcap_gradients(rows_impl, opts, tile, hidden, weight, targets, coeff, lse, shift, d_h, d_w, d_b):
    """bf16/fp16 inputs with a softcap: the kept tile is fp32 (c'(l) is taken from it). d logits are formed chunk
    by chunk in an fp32 copy, as in fp32, but gathered into one [V, N] buffer in the input dtype so that d_weight
    is a single GEMM (accumulated in fp32 inside BLAS, as naive PyTorch's). Adding bf16 chunk products instead
    had 8x naive's d_weight error at 64 chunks."""
    n, v = hidden.shape[0], weight.shape[0]
    step = min(rows_per_chunk(v), n)
    scratch = padded_buffer(v, step, tile.dtype, tile.device)
    d_logits = padded_buffer(v, n, hidden.dtype, hidden.device)[:, :n]
    for i, (s, e) in enumerate(row_bounds(n, step)):
        work = scratch[:, :e - s].copy_(tile[:, s:e])
        rows_impl.rows_dlogits_(work, lse[s:e], shift[s:e], targets[s:e], coeff[s:e], opts)
        if d_b is not None:
            _write_or_add(d_b, work.sum(1), i == 0)
        d_logits[:, s:e].copy_(work)
    del scratch
    if d_h is not None:
        torch.mm(d_logits.t(), weight, out=d_h)
    if d_w is not None:
        torch.mm(d_logits, hidden, out=d_w)


def kept_tile_logprobs(hidden, weight, bias, targets, opts):
    """linear_logprobs through KeptTileFunction: targets [N] with -1 for ignored rows (they give 0 and get no
    gradient; their hidden rows never reach the tile, so an inf there cannot poison the others). None when no
    row is labelled or the tile would exceed MAX_TILE_BYTES: the caller's general path (recompute) runs then."""
    n, v = hidden.shape[0], weight.shape[0]
    live = (targets >= 0).nonzero().squeeze(1)
    itemsize = tile_dtype_for(hidden, opts.softcap).itemsize
    if live.numel() == 0 or v * _padded(live.numel()) * itemsize > MAX_TILE_BYTES:
        return None
    if live.numel() == n:
        return KeptTileFunction.apply(hidden, weight, bias, targets, opts)
    logp_live = KeptTileFunction.apply(hidden.index_select(0, live), weight, bias, targets[live], opts)
    return logp_live.new_zeros(n).index_copy(0, live, logp_live)
