"""Losses with the gradient computed in forward: three GEMMs for forward+backward instead of four.

The fused op (``linear_logprobs``) must serve any upstream gradient, so its backward recomputes the logits:
one GEMM in forward, three in backward. A loss whose derivative with respect to each token's log-prob is
known once the log-probs of a few rows are (the mean token NLL; a preference loss, once both answers of a
pair are scored) can do better, as Liger-Kernel's chunked losses do: for each chunk of rows,

    tile = (h_c W^T + b) / tau        [C, V], one GEMM            (logits of the chunk, the whole vocabulary)
    logp, lse per row                  row pass                     (backend: cpp or torch)
    coeff = d loss / d logp            the loss on the chunk's sequences (a few scalars, autograd)
    tile <- coeff (onehot - p) c'/tau  row pass, in place
    d_h_c = tile W,  d_W += tile^T h_c two GEMMs

and backward only scales the stored gradients by the upstream scalar. Memory: one [C, V] fp32 tile (C rows,
the chunk) plus the gradients themselves; chunks hold whole groups (a sequence, or the two answers of a pair).
For bf16/fp16 inputs the GEMMs run in the input dtype (as naive PyTorch's would) and the tile is fp32.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastalign.backends import get_backend, resolve_backend
from fastalign.losses import check_pair_weights, check_token_inputs, weighted_mean
from fastalign.ops import _autocast_inputs, _check_inputs, map_targets

# Rows per chunk: the fp32 tile holds about CHUNK_BYTES (or one group, if a group is larger), but never fewer
# than MIN_CHUNK_ROWS rows: thinner GEMMs lose BLAS efficiency (2-core EPYC, fp32, N=1024 H=256 V=256000:
# forward+backward took 1.89x / 1.24x / 1.13x / 1.07x the 3-GEMM floor with 32 / 128 / 256 / 512 rows per
# chunk). A smaller tile means less memory but more passes over d_weight (each chunk adds into all of it).
CHUNK_BYTES = 32 << 20
MIN_CHUNK_ROWS = 256
DW_BLOCK = 4096  # bf16/fp16 inputs: vocabulary rows of d_weight per GEMM (see _chunk_pass)


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
    """Rows per chunk for a vocabulary of v: ``chunk_rows`` if given, else what fits CHUNK_BYTES in fp32, at least
    MIN_CHUNK_ROWS."""
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
        return chunk_rows
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * max(v, 1)))


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
    """logp [N] fp32 and the gradients (d_h [N, H] in hidden's dtype, d_w/d_b fp32) of the plan's loss."""
    rows_impl = get_backend(plan.backend, op="loss_rows")
    ct = _compute_dtype(hidden)
    n, v = hidden.shape[0], weight.shape[0]
    inv_t = 1.0 / plan.temperature
    logp = torch.zeros(n, dtype=ct, device=hidden.device)
    d_h = torch.empty_like(hidden) if need_h else None
    d_w = torch.zeros(weight.shape, dtype=ct, device=weight.device) if need_w else None
    d_b = torch.zeros(v, dtype=ct, device=weight.device) if need_b else None
    widest = max((e - s for s, e in plan.bounds), default=0)
    # buffers made once: a fresh large tensor per chunk costs page faults on CPU
    tile_buf = torch.empty(widest * v, dtype=ct, device=hidden.device)
    same = hidden.dtype == ct
    if not same:  # bf16/fp16: GEMMs in the input type (as naive PyTorch's), logits widened into the fp32 tile
        narrow_buf = torch.empty(widest * v, dtype=hidden.dtype, device=hidden.device)
        # d_weight's bf16 products land in a [DW_BLOCK, H] buffer, a vocabulary block at a time, before the fp32
        # accumulator takes them: a whole [V, H] bf16 buffer would add half a d_weight to the peak
        dw_rows = min(v, DW_BLOCK)
        dw_buf = torch.empty((dw_rows, weight.shape[1]), dtype=hidden.dtype, device=weight.device) if need_w else None
    bias_c = None if bias is None else bias.to(ct)
    w_t = weight.t()
    for s, e in plan.bounds:
        hc, tgt = hidden[s:e], targets[s:e]
        tile = tile_buf[:(e - s) * v].view(e - s, v)
        # GEMMs outside any parallel region: BLAS threads them itself (see csrc/linear_logprobs.cpp)
        if same and bias_c is not None:
            torch.addmm(bias_c, hc, w_t, beta=inv_t, alpha=inv_t, out=tile)
        else:
            if same:
                torch.mm(hc, w_t, out=tile)
            else:
                narrow = narrow_buf[:(e - s) * v].view(e - s, v)
                tile.copy_(torch.mm(hc, w_t, out=narrow))
            if bias_c is not None:
                tile.add_(bias_c)
            if inv_t != 1.0:
                tile.mul_(inv_t)
        lp, lse, shift = rows_impl.rows_logsumexp_(tile, tgt, plan)
        logp[s:e] = lp
        if not (need_h or need_w or need_b):
            continue
        coeff = plan.coeff_fn(s, e, lp)
        rows_impl.rows_dlogits_(tile, lse, shift, tgt, coeff, plan)
        if need_b:
            d_b.add_(tile.sum(0))
        if same:
            if need_h:
                torch.mm(tile, weight, out=d_h[s:e])
            if need_w:
                d_w.addmm_(tile.t(), hc)
        else:
            d = narrow.copy_(tile)
            if need_h:
                torch.mm(d, weight, out=d_h[s:e])
            if need_w:
                for v0 in range(0, v, dw_rows):
                    v1 = min(v, v0 + dw_rows)
                    d_w[v0:v1].add_(torch.mm(d[:, v0:v1].t(), hc, out=dw_buf[:v1 - v0]))
    return logp, d_h, d_w, d_b


class GradInForwardFunction(torch.autograd.Function):
    """Forward runs the whole chunk pass and returns per-row log-probs (fp32, no gradient of their own) and
    ``grad_carrier``, a zero scalar whose gradient carries the loss's: backward scales the gradients computed
    in forward by the upstream gradient of ``grad_carrier`` (add it to the loss value)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, plan: GradInForwardPlan):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        logp, d_h, d_w, d_b = _chunk_pass(hidden, weight, bias, targets, plan, need_h, need_w, need_b)
        ctx.save_for_backward(d_h, d_w, d_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logp)
        return logp, logp.new_zeros(())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _grad_logp, grad_carrier):
        # scaled in place: no second copy of d_weight. A second backward through the same graph
        # (retain_graph=True) then fails autograd's check on the saved tensors' versions, loudly.
        d_h, d_w, d_b = ctx.saved_tensors
        hd, wd, bd = ctx.dtypes
        g = grad_carrier
        return (None if d_h is None else d_h.mul_(g.to(hd)),
                None if d_w is None else d_w.mul_(g).to(wd),
                None if d_b is None else d_b.mul_(g).to(bd), None, None)


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


def fused_linear_nll_loss(hidden, weight, targets, bias=None, *, token_weights=None, reduction="mean",
                          ignore_index=-100, temperature=1.0, softcap=None, backend="auto", chunk_rows=None):
    """Token negative log-likelihood from hidden states and the lm_head, gradient computed in forward.

    hidden [N, H], weight [V, H], targets [N] (``ignore_index`` rows count for nothing), bias [V] or None,
    token_weights [N] or None (1 each). Returns a scalar:

        reduction="sum":  -sum_t w_t logp_t          reduction="mean": that / sum of w_t over labelled tokens

    Same value and gradients as ``-(w * linear_logprobs(...)).sum()`` (divided for "mean"), with three GEMMs
    for forward+backward instead of four and one [chunk_rows, V] fp32 tile of memory (Liger-Kernel's fused
    linear cross-entropy does the same). Under ``torch.no_grad()`` nothing is computed for backward.
    """
    if isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor):
        hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    _check_inputs(hidden, weight, targets, bias, ignore_index, temperature, softcap)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    n, v = hidden.shape[0], weight.shape[0]
    orig_targets = targets
    targets = map_targets(targets, v, ignore_index)
    ignored = targets < 0
    ct = _compute_dtype(hidden)
    if token_weights is None:
        w = (~ignored).to(ct)
    else:
        if not isinstance(token_weights, torch.Tensor) or tuple(token_weights.shape) != (n,):
            raise ValueError(f"token_weights must be a tensor [N] = [{n}], got "
                             f"{tuple(getattr(token_weights, 'shape', ())) or type(token_weights).__name__}")
        w = torch.where(ignored, torch.zeros((), dtype=ct, device=hidden.device), token_weights.detach().to(ct))
    denom = float(w.sum()) if reduction == "mean" else 1.0
    scale = -1.0 / denom if denom > 0 else 0.0  # nothing labelled: loss 0, zero gradients
    coeff = w * scale
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if not needs_grad or n == 0:
        from fastalign.ops import linear_logprobs
        with torch.no_grad():
            logp = linear_logprobs(hidden, weight, orig_targets, bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                                   backend=backend) if n else hidden.new_zeros(0, dtype=ct)
        loss = (coeff * logp.to(ct)).sum()
        if n == 0 and needs_grad:  # connected to the graph: zero gradients, the empty case of every loss
            loss = loss + 0.0 * hidden.sum() + 0.0 * weight.sum()
        return loss
    bounds = row_bounds(n, rows_per_chunk(v, chunk_rows))
    logp, carrier = run_grad_in_forward(hidden, weight, bias, targets, bounds,
                                        lambda s, e, lp: coeff[s:e], temperature=temperature, softcap=softcap,
                                        backend=backend)
    return (coeff * logp).sum() + carrier


def _token_layout(hidden, labels, ignore_index, sequence_index, n_sequences):
    """Flattened hidden [R*T, H], targets [R*T] (-1: not a labelled token), each token's sequence [R*T] (-1 for
    none), the number of sequences S, the labelled tokens' rows ``live`` and the labelled tokens per sequence [S]."""
    check_token_inputs(hidden, labels, sequence_index)
    r, t, h = hidden.shape
    flat_labels = labels.reshape(-1)
    if sequence_index is None:
        seq = torch.arange(r, device=labels.device).repeat_interleave(t)
        n_sequences = r
    else:
        seq = sequence_index.reshape(-1).to(labels.device)
        if n_sequences is None:
            n_sequences = int(seq.max()) + 1
    active = (seq >= 0) & (flat_labels != ignore_index)
    targets = torch.where(active, flat_labels.long(), torch.full_like(flat_labels, -1, dtype=torch.long))
    seq = torch.where(active, seq, torch.full_like(seq, -1))
    live = active.nonzero().squeeze(1)
    n_tok = torch.zeros(n_sequences, dtype=torch.long, device=seq.device).index_add_(0, seq[live],
                                                                                    torch.ones_like(live))
    return hidden.reshape(r * t, h), targets, seq, n_sequences, live, n_tok


def _pair_order(seq, live, n_tok, b):
    """Labelled tokens ordered pair 0 chosen, pair 0 rejected, pair 1 chosen, ... (a stable sort keeps the
    token order within each answer): (order [n] into the flat rows, pair-local key [n], tokens per pair)."""
    s_live = seq[live]
    key = (s_live % b) * 2 + (s_live >= b).long()
    key_sorted, perm = torch.sort(key, stable=True)
    return live[perm], key_sorted, (n_tok[:b] + n_tok[b:]).tolist()


def forward_logps(loss_module, hidden, weight, labels, bias=None, sequence_index=None, n_sequences=None,
                  pairs=False):
    """(summed log-probs [S], token counts [S]) by the same row pass, chunks and row order as the
    gradient-in-forward losses, without gradients: a reference model's log-probs computed here cancel the
    policy's exactly when the two models are equal (DPO's first loss is then exactly ln 2)."""
    flat_h, targets, seq, n_seq, live, n_tok = _token_layout(hidden, labels, loss_module.ignore_index,
                                                             sequence_index, n_sequences)
    step = rows_per_chunk(weight.shape[0], loss_module.chunk_rows)
    if pairs and n_seq % 2 == 0 and n_seq > 0:
        order, _, sizes = _pair_order(seq, live, n_tok, n_seq // 2)
        bounds = group_bounds(sizes, step)
    else:
        order = live
        bounds = row_bounds(order.numel(), step)
    if order.numel() == 0:
        return torch.zeros(n_seq, dtype=_compute_dtype(hidden), device=hidden.device), n_tok
    plan = _plan(hidden, bounds, None, loss_module.temperature, loss_module.softcap, loss_module.backend)
    with torch.no_grad():
        logp, _, _, _ = _chunk_pass(flat_h.index_select(0, order), weight, bias, targets[order], plan,
                                    False, False, False)
    return torch.zeros(n_seq, dtype=logp.dtype, device=logp.device).index_add_(0, seq[order], logp), n_tok


def preference_forward(loss_module, hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, ref_hidden,
                       ref_weight, bias, ref_bias, pair_weights, sequence_index, n_sequences):
    """_FusedPreferenceLoss.forward with the gradient computed in forward (see the module docstring).

    Rows are reordered so that each pair's labelled tokens (chosen, then rejected) are consecutive; a chunk
    holds whole pairs, so the loss of each of its pairs, and hence d loss / d logp of each of its tokens, is
    known once the chunk's log-probs are. Same value and gradients as the op-based path; the per-pair outputs
    (losses, log-probs, rewards) are detached.
    """
    from fastalign.losses import PreferenceLossOutput
    flat_h, targets, seq, n_seq, live, n_tok = _token_layout(hidden, labels, loss_module.ignore_index,
                                                             sequence_index, n_sequences)
    if n_seq % 2:
        raise ValueError(f"n_sequences must be even (B chosen, then B rejected), got {n_seq}")
    b = n_seq // 2
    ct = _compute_dtype(hidden)
    if bool((n_tok == 0).any()):
        i = int((n_tok == 0).nonzero()[0, 0])
        raise ValueError(f"row {i} of labels has no labelled token (all ignore_index): every chosen and "
                         "rejected answer needs at least one token")
    rc = rr = None
    if loss_module.uses_reference:
        rc, rr = loss_module._reference(labels, b, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight,
                                        ref_bias, sequence_index, n_seq)
    order, key_sorted, tokens_per_pair = _pair_order(seq, live, n_tok, b)
    bounds = group_bounds(tokens_per_pair, rows_per_chunk(weight.shape[0], loss_module.chunk_rows))
    starts = [0]
    for c in tokens_per_pair:
        starts.append(starts[-1] + c)
    first_pair = {s: p for p, s in enumerate(starts[:-1])}

    nc, nr = n_tok[:b].to(ct), n_tok[b:].to(ct)
    if pair_weights is not None:
        w = check_pair_weights(pair_weights, (b,), ct, hidden.device)
        total = float(w.sum())
    else:
        w, total = torch.ones(b, dtype=ct, device=hidden.device), float(b)
    denom = total if total > 0 else 1.0  # weighted_mean's denominator: the chunks' parts add up to its value

    def pair_terms(pc, pr, p0, p1):
        """Per-pair losses (with RPO's term) for pairs p0..p1-1 from their summed policy log-probs."""
        if loss_module.length_normalized:
            pc_n, pr_n = pc / nc[p0:p1], pr / nr[p0:p1]
            rc_n = None if rc is None else rc[p0:p1] / nc[p0:p1]
            rr_n = None if rr is None else rr[p0:p1] / nr[p0:p1]
        else:
            pc_n, pr_n = pc, pr
            rc_n = None if rc is None else rc[p0:p1]
            rr_n = None if rr is None else rr[p0:p1]
        losses = loss_module.pair_losses(pc_n, pr_n, rc_n, rr_n)
        nll = None
        if loss_module.rpo_alpha:
            nll = -pc / nc[p0:p1]
            losses = losses + loss_module.rpo_alpha * nll
        return losses, nll, (pc_n, pr_n, rc_n, rr_n)

    def coeff_fn(s, e, lp):
        p0 = first_pair[s]
        p1 = p0
        while starts[p1] < e:
            p1 += 1
        local = key_sorted[s:e] - 2 * p0
        sums = torch.zeros(2 * (p1 - p0), dtype=ct, device=lp.device).index_add_(0, local, lp.to(ct))
        with torch.enable_grad():
            pc = sums[0::2].detach().requires_grad_()
            pr = sums[1::2].detach().requires_grad_()
            losses, _, _ = pair_terms(pc, pr, p0, p1)
            wp = w[p0:p1]
            part = torch.where(wp > 0, wp * losses, torch.zeros_like(losses)).sum() / denom
            gc, gr = torch.autograd.grad(part, (pc, pr))
        per_seq = torch.stack((gc, gr), 1).reshape(-1)
        return per_seq[local].to(lp.dtype)

    logp, carrier = run_grad_in_forward(flat_h.index_select(0, order), weight, bias, targets[order], bounds,
                                        coeff_fn, temperature=loss_module.temperature, softcap=loss_module.softcap,
                                        backend=loss_module.backend)
    sums = torch.zeros(n_seq, dtype=ct, device=logp.device).index_add_(0, seq[order], logp)
    pc, pr = sums[:b], sums[b:]
    losses, nll, (pc_n, pr_n, rc_n, rr_n) = pair_terms(pc, pr, 0, b)
    loss = weighted_mean(losses, None if pair_weights is None else w) + carrier
    cr, rj = loss_module.rewards(pc_n, pr_n, rc_n, rr_n)
    return PreferenceLossOutput(loss=loss, losses=losses, chosen_logps=pc, rejected_logps=pr, chosen_rewards=cr,
                                rejected_rewards=rj, reward_margins=cr - rj, reward_accuracies=(cr > rj).float(),
                                chosen_n_tokens=nc, rejected_n_tokens=nr,
                                nll_loss=None if nll is None else nll.mean())


def sft_forward(loss_module, hidden, weight, labels, bias, sequence_index, n_sequences):
    """FusedSFTLoss.forward with the gradient computed in forward: -sum logp / labelled tokens."""
    from fastalign.losses import SFTLossOutput
    flat_h, targets, seq, n_seq, live, n_tok = _token_layout(hidden, labels, loss_module.ignore_index,
                                                             sequence_index, n_sequences)
    total = int(live.numel())
    scale = -1.0 / total if total else 0.0
    bounds = row_bounds(total, rows_per_chunk(weight.shape[0], loss_module.chunk_rows))
    if total == 0:
        loss = 0.0 * hidden.sum() + 0.0 * weight.sum()
        return SFTLossOutput(loss=loss, sequence_logps=torch.zeros(n_seq, device=hidden.device), n_tokens=n_tok)
    logp, carrier = run_grad_in_forward(flat_h.index_select(0, live), weight, bias, targets[live], bounds,
                                        lambda s, e, lp: torch.full_like(lp, scale),
                                        temperature=loss_module.temperature, softcap=loss_module.softcap,
                                        backend=loss_module.backend)
    sums = torch.zeros(n_seq, dtype=logp.dtype, device=logp.device).index_add_(0, seq[live], logp)
    return SFTLossOutput(loss=scale * sums.sum() + carrier, sequence_logps=sums, n_tokens=n_tok)
