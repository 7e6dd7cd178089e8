"""Portable PyTorch backend: chunked over rows; each chunk's logits are made, used and freed.

Memory is O(chunk_rows * V), independent of N and of sequence length. Backward recomputes the chunk's
logits. The baseline every compiled backend is benchmarked against.
"""
import torch

# Rows per chunk are chosen so that one fp32 logits chunk holds about this many elements (64 MiB).
CHUNK_ELEMENTS = 1 << 24


def _rows_per_chunk(n, v):
    return max(1, min(n, CHUNK_ELEMENTS // max(v, 1)))


def _compute_dtype(hidden):
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _chunk_logits(h, weight, bias, opts):
    """fp32 logits of one chunk of rows after bias, temperature and softcap."""
    z = torch.nn.functional.linear(h, weight).to(_compute_dtype(h))
    if bias is not None:  # added in the compute dtype, whatever the bias dtype (as the cpp and triton backends)
        z = z + bias.to(z.dtype)
    if opts.temperature != 1.0:
        z = z / opts.temperature
    if opts.softcap is not None:
        z = torch.tanh(z / opts.softcap) * opts.softcap
    return z


def forward(hidden, weight, bias, targets, opts, save_for_hidden=False):
    n = hidden.shape[0]
    logp = torch.empty(n, dtype=_compute_dtype(hidden), device=hidden.device)
    lse = torch.empty_like(logp)
    step = _rows_per_chunk(n, weight.shape[0])
    for s in range(0, n, step):
        z = _chunk_logits(hidden[s:s + step], weight, bias, opts)
        chunk_lse = torch.logsumexp(z, dim=-1)
        tgt = targets[s:s + step]
        picked = z.gather(1, tgt.clamp_min(0).unsqueeze(1)).squeeze(1)
        lse[s:s + step] = chunk_lse
        logp[s:s + step] = torch.where(tgt >= 0, picked - chunk_lse, torch.zeros_like(chunk_lse))
    return logp, lse, None


def backward(grad, hidden, weight, bias, targets, lse, basis, opts, need_hidden, need_weight, need_bias):
    n, v = hidden.shape[0], weight.shape[0]
    d_h = torch.empty_like(hidden) if need_hidden else None
    acc = _compute_dtype(hidden)
    d_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
    d_b = torch.zeros(v, dtype=acc, device=weight.device) if need_bias else None
    step = _rows_per_chunk(n, v)
    for s in range(0, n, step):
        h = hidden[s:s + step]
        tgt = targets[s:s + step]
        g = torch.where(tgt >= 0, grad[s:s + step], torch.zeros_like(grad[s:s + step]))
        z = _chunk_logits(h, weight, bias, opts)
        # D = g * (onehot(y) - softmax) * d(softcap)/dz / temperature
        d = torch.exp(z - lse[s:s + step, None]).neg_()
        d.scatter_add_(1, tgt.clamp_min(0).unsqueeze(1), torch.ones_like(d[:, :1]))
        d.mul_(g[:, None])
        if opts.softcap is not None:
            d.mul_(1.0 - (z / opts.softcap) ** 2)
        if opts.temperature != 1.0:
            d.div_(opts.temperature)
        del z
        if need_hidden:
            d_h[s:s + step] = d.to(weight.dtype) @ weight
        if need_weight:
            d_w.addmm_(d.t(), h.to(acc))
        if need_bias:
            d_b.add_(d.sum(0))
    return (d_h,
            None if d_w is None else d_w.to(weight.dtype),
            None if d_b is None else d_b.to(bias.dtype))
