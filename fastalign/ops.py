"""The fused op: per-token log-probabilities of targets straight from hidden states and the lm_head weight.

logits = (hidden @ weight.T + bias) / temperature, then softcap * tanh(logits / softcap) when softcap is set;
result[t] = log_softmax(logits[t])[targets[t]]. The [N, V] logits never exist in memory, except on CPU with
gradients and backend="auto", which keeps one tile of them for speed (fastalign/kept_tiles.py).
"""
import numbers

import torch

from fastalign.backends import get_backend, resolve_backend
from fastalign.kept_tiles import kept_tile_logprobs
from fastalign.options import LogprobOptions

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _empty_result(hidden):
    return hidden.new_zeros(0, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)


class LinearLogprobsFunction(torch.autograd.Function):
    """Autograd for the fused op; the chosen backend does the work, both directions."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: LogprobOptions):
        impl = get_backend(opts.backend)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if hidden.shape[0] == 0:  # the empty case: no backend call; backward gives zero gradients
            logp, lse, basis = _empty_result(hidden), _empty_result(hidden), None
        else:
            logp, lse, basis = impl.forward(hidden, weight, bias, targets, opts, save_for_hidden=need_hidden)
        ctx.opts = opts
        ctx.save_for_backward(hidden, weight, bias, targets, lse, basis)
        ctx.mark_non_differentiable(lse)
        return logp, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, _grad_lse):
        hidden, weight, bias, targets, lse, basis = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        impl = get_backend(ctx.opts.backend)
        grad = grad_logp.to(lse.dtype)
        # Ignored rows and rows with zero upstream gradient contribute nothing: drop them before the
        # O(N*H*V) work (prompt tokens are often half of all rows).
        active = (targets >= 0) & (grad != 0)
        n_active = int(active.sum())
        n = hidden.shape[0]
        if n_active == 0:
            return (torch.zeros_like(hidden) if need_hidden else None,
                    torch.zeros_like(weight) if need_weight else None,
                    torch.zeros_like(bias) if need_bias else None, None, None)
        if n_active < n:
            idx = active.nonzero().squeeze(1)
            d_h, d_w, d_b = impl.backward(
                grad.index_select(0, idx), hidden.index_select(0, idx), weight, bias, targets.index_select(0, idx),
                lse.index_select(0, idx), None if basis is None else basis.index_select(0, idx), ctx.opts,
                need_hidden, need_weight, need_bias)
            if d_h is not None:
                d_h = torch.zeros_like(hidden).index_copy_(0, idx, d_h)
        else:
            d_h, d_w, d_b = impl.backward(grad, hidden, weight, bias, targets, lse, basis, ctx.opts,
                                          need_hidden, need_weight, need_bias)
        return d_h, d_w, d_b, None, None


def _check_inputs(hidden, weight, targets, bias, ignore_index, temperature, softcap):
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 (or float64 on the cpp/torch backends), "
                        f"got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] disagree on H: hidden {tuple(hidden.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64 token ids), got {targets.dtype}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be 1-D [N] with N = hidden.shape[0] = {hidden.shape[0]}, "
                         f"got shape {tuple(targets.shape)}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be 1-D [V] with V = weight.shape[0] = {weight.shape[0]}, "
                             f"got shape {tuple(bias.shape)}")
        if bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"bias must be a float tensor, got {bias.dtype}")
    devices = {t.device for t in (hidden, weight, targets) + ((bias,) if bias is not None else ())}
    if len(devices) > 1:
        raise ValueError(f"hidden, weight, targets and bias must be on one device, got {sorted(map(str, devices))}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not softcap > 0):
        raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")


def map_targets(targets, v, ignore_index):
    """targets [N] as int64 with ``ignore_index`` mapped to -1 (what every backend takes); a target outside
    [0, V) that is not ignore_index raises, naming the first one."""
    targets = targets.long()
    ignored = targets == ignore_index
    bad = ~ignored & ((targets < 0) | (targets >= v))
    if targets.numel() and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{i}] = {int(targets[i])} is outside [0, {v}) and is not "
                         f"ignore_index={ignore_index}; {int(bad.sum())} such target(s) in all")
    return torch.where(ignored, torch.full_like(targets, -1), targets)


def _autocast_inputs(hidden, weight, bias):
    device = hidden.device.type
    if device not in ("cuda", "cpu") or not torch.is_autocast_enabled(device):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device)
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return hidden, weight, bias
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def linear_logprobs(hidden, weight, targets, bias=None, *, ignore_index=-100, temperature=1.0, softcap=None,
                    backend="auto", deterministic=False, grad_filter_eps=None):
    """Log-probability of each target token, fused from hidden states and the output projection.

    hidden [N, H] (fp32/bf16/fp16), weight [V, H] (same dtype), targets [N] int, bias [V] or None.
    Returns float32 [N] (float64 for float64 inputs, cpp/torch only); rows whose target is ``ignore_index`` give 0 and receive no gradient.
    Gradients reach hidden, weight and bias in their own dtypes (accumulated in fp32). Under
    ``torch.no_grad()`` a forward-only path runs and nothing is saved. Under autocast, hidden, weight and
    bias are cast to the autocast dtype first, as ``F.linear`` would.
    backend: "auto" (CUDA -> triton, CPU -> cpp when built, else torch), "triton", "cpp" or "torch". On CPU with
    gradients, "auto" keeps one [V, N] logits tile from forward to backward (3 GEMMs; measured never slower than naive
    PyTorch, see fastalign/kept_tiles.py) up to kept_tiles.MAX_TILE_BYTES (1 GiB), where "cpp" and "torch" recompute
    it in backward (4 GEMMs, O(chunk) memory).
    deterministic: bitwise reproducible gradients; on triton this costs one more logits recompute in backward.
    grad_filter_eps: opt-in approximate backward (Cut Cross-Entropy's filter): backward skips the tiles (cpp:
    a row's share of a vocabulary block) where every p_v * c'_v (c' the softcap's derivative, 1 without) is
    below eps and no row holds its target, so each dropped entry of dlogp/dlogits is below eps * |upstream
    grad| / temperature. None or 0: exact. cpp and triton (atomic strategy) backends; the torch backend and
    triton's deterministic strategies compute exact gradients.
    """
    if isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor):
        hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    _check_inputs(hidden, weight, targets, bias, ignore_index, temperature, softcap)
    if grad_filter_eps is not None and (isinstance(grad_filter_eps, bool) or
                                        not isinstance(grad_filter_eps, numbers.Real) or not 0 <= grad_filter_eps < 1):
        raise ValueError(f"grad_filter_eps must be None or a number in [0, 1) (a probability), "
                         f"got {grad_filter_eps!r}")
    n, v = hidden.shape[0], weight.shape[0]
    name = resolve_backend(backend, hidden.device, hidden.dtype)
    opts = LogprobOptions(backend=name, temperature=float(temperature),
                          softcap=None if softcap is None else float(softcap), deterministic=bool(deterministic),
                          grad_filter_eps=None if not grad_filter_eps else float(grad_filter_eps))
    targets = map_targets(targets, v, ignore_index)
    # No .contiguous() here: each backend decides (triton reads any strides in place, so a transposed or tied
    # weight is not copied on every call; cpp copies what its C++ needs contiguous).
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not needs_grad:
        if n == 0:
            return _empty_result(hidden)
        logp, _, _ = get_backend(name).forward(hidden, weight, bias, targets, opts, save_for_hidden=False)
        return logp
    if backend == "auto" and hidden.device.type == "cpu" and not opts.grad_filter_eps:  # auto on CPU: cpp or torch
        # with gradients on CPU, auto keeps the tile (3 GEMMs): the recompute path's fourth GEMM can make it slower
        # than naive PyTorch (see kept_tiles.py); backend="cpp" asks for the O(chunk)-memory recompute path
        logp = kept_tile_logprobs(hidden, weight, bias, targets, opts)
        if logp is not None:
            return logp
    # N = 0 goes through the Function too: the result is empty and hidden, weight and bias all get zero
    # gradients (not None), the empty case every loss follows (see losses.weighted_mean).
    logp, _ = LinearLogprobsFunction.apply(hidden, weight, bias, targets, opts)
    return logp


def sequence_logprobs(hidden, weight, labels, bias=None, *, ignore_index=-100, temperature=1.0, softcap=None,
                      backend="auto", deterministic=False, grad_filter_eps=None):
    """Summed log-probability of each sequence's labelled tokens.

    hidden [B, T, H], labels [B, T] already aligned (hidden[b, t] predicts labels[b, t]; shift before calling).
    Returns (seq_logps float32 [B], n_tokens int64 [B]); divide for length-normalized losses.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be a 3-D tensor [B, T, H], got "
                         f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels must be [B, T] = {tuple(hidden.shape[:2])} to match hidden, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    b, t, h = hidden.shape
    token_logps = linear_logprobs(hidden.reshape(b * t, h), weight, labels.reshape(b * t), bias,
                                  ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                                  backend=backend, deterministic=deterministic, grad_filter_eps=grad_filter_eps)
    n_tokens = (labels != ignore_index).sum(-1)
    return token_logps.view(b, t).sum(-1), n_tokens
