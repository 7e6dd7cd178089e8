"""Triton backend (fastalign.kernels), exposed as torch.library custom ops so torch.compile can trace through.

Three backward strategies, same results (to rounding):
  atomic         one fused kernel; each [rows x vocab] tile adds into d_hidden and d_weight with fp32 atomics
  vocab-chunked  a kernel writes D for one vocabulary chunk, cuBLAS does D @ W and D^T @ h (deterministic)
  two-pass       two atomics-free kernels, one owning row blocks, one owning vocabulary blocks (deterministic)
BACKWARD picks the default (env FASTALIGN_TRITON_BACKWARD); deterministic=True never uses "atomic".
grad_filter_eps (opt-in, approximate) is honoured by the atomic strategy; the deterministic ones stay exact.
Every launch runs under torch.cuda.device(hidden.device): tensors on cuda:1 launch on cuda:1.
hidden and weight are read through both of their strides: a transposed ([H, V] storage), tied or sliced weight
and a row-strided hidden are never copied (only the tiny bias [V], grad [N] and targets are made contiguous).
"""
import contextlib
import os
from typing import List, Optional

import torch

from fastalign.kernels.linear_logprobs_bwd import linear_logprobs_backward
from fastalign.kernels.linear_logprobs_bwd_deterministic import linear_logprobs_backward_deterministic
from fastalign.kernels.linear_logprobs_bwd_vocab_chunked import linear_logprobs_backward_vocab_chunked
from fastalign.kernels.linear_logprobs_fwd import linear_logprobs_forward

STRATEGIES = {"atomic": linear_logprobs_backward, "vocab-chunked": linear_logprobs_backward_vocab_chunked,
              "two-pass": linear_logprobs_backward_deterministic}
DETERMINISTIC = ("vocab-chunked", "two-pass")
BACKWARD = os.environ.get("FASTALIGN_TRITON_BACKWARD", "atomic")


def backward_strategy(deterministic):
    if BACKWARD not in STRATEGIES:
        raise ValueError(f"unknown triton backward strategy {BACKWARD!r} (FASTALIGN_TRITON_BACKWARD); "
                         f"valid: {', '.join(STRATEGIES)}")
    if deterministic and BACKWARD not in DETERMINISTIC:
        return "two-pass"
    return BACKWARD


def _softcap(value):
    return None if value <= 0 else value


def _on_device(tensor):
    """Triton launches on the current CUDA device: make it the tensors' device for the launch."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("fastalign::triton_linear_logprobs_fwd", mutates_args=())
def _fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
         temperature: float, softcap: float) -> List[torch.Tensor]:
    with _on_device(hidden):
        return list(linear_logprobs_forward(hidden, weight, bias, targets, temperature, _softcap(softcap)))


@_fwd.register_fake
def _(hidden, weight, bias, targets, temperature, softcap):
    n = hidden.shape[0]
    return [hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)]


@torch.library.custom_op("fastalign::triton_linear_logprobs_bwd", mutates_args=())
def _bwd(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
         targets: torch.Tensor, lse: torch.Tensor, temperature: float, softcap: float, need_hidden: bool,
         need_weight: bool, need_bias: bool, strategy: str, grad_filter_eps: float = 0.0) -> List[torch.Tensor]:
    extra = {"grad_filter_eps": grad_filter_eps} if strategy == "atomic" and grad_filter_eps > 0 else {}
    with _on_device(hidden):
        d_h, d_w, d_b = STRATEGIES[strategy](grad, hidden, weight, bias, targets, lse, temperature, _softcap(softcap),
                                             need_hidden, need_weight, need_bias, **extra)
    # each missing gradient gets its own empty tensor: custom op outputs may not alias each other
    return [hidden.new_empty(0, dtype=torch.float32) if x is None else x for x in (d_h, d_w, d_b)]


@_bwd.register_fake
def _(grad, hidden, weight, bias, targets, lse, temperature, softcap, need_hidden, need_weight, need_bias, strategy,
      grad_filter_eps=0.0):
    f32 = dict(dtype=torch.float32)
    w_dtype = weight.dtype if strategy == "vocab-chunked" else torch.float32
    return [hidden.new_empty(hidden.shape if need_hidden else (0,), **f32),
            weight.new_empty(weight.shape if need_weight else (0,), dtype=w_dtype),
            weight.new_empty((weight.shape[0],) if need_bias else (0,), **f32)]


def _softcap_arg(opts):
    return -1.0 if opts.softcap is None else opts.softcap


def forward(hidden, weight, bias, targets, opts, save_for_hidden=False):
    logp, lse = _fwd(hidden, weight, bias, targets, opts.temperature, _softcap_arg(opts))
    return logp, lse, None


def backward(grad, hidden, weight, bias, targets, lse, basis, opts, need_hidden, need_weight, need_bias):
    g = torch.where(targets >= 0, grad, torch.zeros_like(grad)).contiguous()
    d_h, d_w, d_b = _bwd(g, hidden, weight, bias, targets, lse, opts.temperature, _softcap_arg(opts),
                         need_hidden, need_weight, need_bias, backward_strategy(opts.deterministic),
                         float(getattr(opts, "grad_filter_eps", None) or 0.0))
    return (d_h.to(hidden.dtype) if need_hidden else None,
            d_w.to(weight.dtype) if need_weight else None,
            d_b.to(bias.dtype) if need_bias else None)
