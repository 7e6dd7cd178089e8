"""Losses with the gradient computed in forward: three GEMMs for forward+backward instead of four.

The fused op (``linear_logprobs``) must serve any upstream gradient, so its backward recomputes the logits:
one GEMM in forward, three in backward. A loss whose derivative with respect to each token's log-prob is
known once the log-probs of a few rows are (the mean token NLL; a preference loss, once both answers of a
pair are scored) can do better, as Liger-Kernel's chunked losses do: for each chunk of rows,

    tile = (W h_c^T + b) / tau        [V, C], one GEMM            (logits of the chunk, transposed)
    logp, lse per row; tile <- E       row pass                     (backend: cpp or torch; E = exp(l - max))
    coeff = d loss / d logp            the loss on the chunk's sequences (a few scalars, autograd)
    d_h_c, d_W from E                  two GEMMs                    (row scaling on the thin operands, the
                                                                     target's term from logp: chunk_pass.py)

and backward only scales the stored gradients by the upstream scalar. With a softcap the row pass forms
d logits = coeff (onehot - p) c'(l) / tau in the tile first, then the same two GEMMs take it as it is. Memory: one [V, C] tile (C rows,
the chunk) plus the gradients themselves; chunks hold whole groups (a sequence, or the two answers of a pair).
For bf16/fp16 inputs the GEMMs run in the input dtype (as naive PyTorch's would), and so does the tile (its
statistics are fp32), except with a softcap, whose derivative is taken from an fp32 tile.
"""
import torch

from fastalign.chunk_pass import (_chunk_pass, _compute_dtype, _plan, group_bounds, row_bounds, rows_per_chunk,
                                  run_grad_in_forward)
from fastalign.losses import check_pair_weights, check_token_inputs, weighted_mean
from fastalign.ops import _autocast_inputs, _check_inputs, map_targets

def fused_linear_nll_loss(hidden, weight, targets, bias=None, *, token_weights=None, reduction="mean",
                          ignore_index=-100, temperature=1.0, softcap=None, backend="auto", chunk_rows=None):
    """Token negative log-likelihood from hidden states and the lm_head, gradient computed in forward.

    hidden [N, H], weight [V, H], targets [N] (``ignore_index`` rows count for nothing), bias [V] or None,
    token_weights [N] or None (1 each). Returns a scalar:

        reduction="sum":  -sum_t w_t logp_t          reduction="mean": that / sum of w_t over labelled tokens

    Same value and gradients as ``-(w * linear_logprobs(...)).sum()`` (divided for "mean"), with three GEMMs
    for forward+backward instead of four and one [V, chunk_rows] tile of memory (Liger-Kernel's fused
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
            loss = loss + _connected_zero(hidden, weight)
        return loss
    live = (~ignored).nonzero().squeeze(1)
    if live.numel() == 0:  # nothing labelled: loss 0, zero gradients, connected to the graph
        return _connected_zero(hidden, weight, bias)
    if live.numel() < n:  # only labelled rows reach the tile (an ignored row's logits may be anything, even inf)
        hidden, targets, coeff = hidden.index_select(0, live), targets[live], coeff[live]
    bounds = row_bounds(live.numel(), rows_per_chunk(v, chunk_rows))
    logp, carrier = run_grad_in_forward(hidden, weight, bias, targets, bounds,
                                        lambda s, e, lp: coeff[s:e], temperature=temperature, softcap=softcap,
                                        backend=backend)
    return (coeff * logp).sum() + carrier


def _connected_zero(*tensors):
    """A zero loss connected to the graph of each tensor given (None skipped): zero gradients, not none."""
    return sum(0.0 * t.sum() for t in tensors if t is not None)


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
        loss = _connected_zero(hidden, weight)
        return SFTLossOutput(loss=loss, sequence_logps=torch.zeros(n_seq, device=hidden.device), n_tokens=n_tok)
    logp, carrier = run_grad_in_forward(flat_h.index_select(0, live), weight, bias, targets[live], bounds,
                                        lambda s, e, lp: torch.full_like(lp, scale),
                                        temperature=loss_module.temperature, softcap=loss_module.softcap,
                                        backend=loss_module.backend)
    sums = torch.zeros(n_seq, dtype=logp.dtype, device=logp.device).index_add_(0, seq[live], logp)
    return SFTLossOutput(loss=scale * sums.sum() + carrier, sequence_logps=sums, n_tokens=n_tok)
