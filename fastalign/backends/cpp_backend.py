"""C++ CPU backend (fastalign._C), exposed as torch.library custom ops so torch.compile can trace through."""
from typing import List, Optional

import torch

from fastalign import _ext

# Measured on 2 cores at N=2048, H=1024, V=32000 fp32 (fwd+bwd ms): 128x1024: 2283, 256x1024: 2126,
# 256x512: 2114, 512x512: 1998. Larger row blocks reuse each weight tile read from memory more often.
BLOCK_N = 512   # rows per tile (capped per call so that every thread gets row blocks in forward)
BLOCK_V = 512   # vocabulary entries per tile
MIN_BLOCK_N = 16


def _block_n(n):
    """Forward threads own row blocks: with few rows, smaller blocks keep every thread busy."""
    per_thread = -(-n // max(1, torch.get_num_threads()))
    return max(MIN_BLOCK_N, min(BLOCK_N, per_thread))


def _compute_dtype(hidden):
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _softcap_arg(opts):
    return -1.0 if opts.softcap is None else opts.softcap


@torch.library.custom_op("fastalign::cpp_linear_logprobs_fwd", mutates_args=())
def _fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
         temperature: float, softcap: float, with_basis: bool) -> List[torch.Tensor]:
    return list(_ext.C.linear_logprobs_forward(hidden, weight, bias, targets, temperature, softcap, with_basis,
                                               _block_n(hidden.shape[0]), BLOCK_V))


@_fwd.register_fake
def _(hidden, weight, bias, targets, temperature, softcap, with_basis):
    n, h = hidden.shape
    f32 = dict(dtype=_compute_dtype(hidden), device=hidden.device)
    return [hidden.new_empty(n, **f32), hidden.new_empty(n, **f32),
            hidden.new_empty((n, h) if with_basis else (0,), **f32)]


@torch.library.custom_op("fastalign::cpp_linear_logprobs_bwd_weight", mutates_args=())
def _bwd_weight(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor, lse: torch.Tensor, temperature: float, softcap: float, need_weight: bool,
                need_bias: bool) -> List[torch.Tensor]:
    return list(_ext.C.linear_logprobs_backward_weight(grad, hidden, weight, bias, targets, lse, temperature,
                                                       softcap, need_weight, need_bias, BLOCK_N, BLOCK_V))


@_bwd_weight.register_fake
def _(grad, hidden, weight, bias, targets, lse, temperature, softcap, need_weight, need_bias):
    v, h = weight.shape
    f32 = dict(dtype=_compute_dtype(hidden), device=weight.device)
    return [weight.new_empty((v, h) if need_weight else (0,), **f32),
            weight.new_empty((v,) if need_bias else (0,), **f32)]


def forward(hidden, weight, bias, targets, opts, save_for_hidden=False):
    logp, lse, basis = _fwd(hidden, weight, bias, targets, opts.temperature, _softcap_arg(opts), save_for_hidden)
    return logp, lse, (basis if save_for_hidden else None)


def backward(grad, hidden, weight, bias, targets, lse, basis, opts, need_hidden, need_weight, need_bias):
    d_h = None
    if need_hidden:
        if basis is None:
            raise RuntimeError("cpp backend: d_hidden requested but forward kept no basis (internal error)")
        d_h = (basis * grad.unsqueeze(1)).to(hidden.dtype)
    d_w = d_b = None
    if need_weight or need_bias:
        g = torch.where(targets >= 0, grad, torch.zeros_like(grad))
        d_w32, d_b32 = _bwd_weight(g, hidden, weight, bias, targets, lse, opts.temperature, _softcap_arg(opts),
                                   need_weight, need_bias)
        d_w = d_w32.to(weight.dtype) if need_weight else None
        d_b = d_b32.to(bias.dtype) if need_bias else None
    return d_h, d_w, d_b
