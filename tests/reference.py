"""Independent references for the fused op: they materialize the [N, V] logits on purpose.

``reference_linear_logprobs`` computes in float64 (the ground truth of every test);
``naive_linear_logprobs`` is what a user writes in plain PyTorch, in the inputs' dtype (the benchmark
baseline, and the yardstick for low-precision tolerances).
"""
import torch


def _logprobs_from_logits(logits, targets, ignore_index):
    logp = torch.log_softmax(logits, dim=-1)
    keep = targets != ignore_index
    picked = logp.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, torch.zeros_like(picked))


def reference_linear_logprobs(hidden, weight, targets, bias=None, *, ignore_index=-100, temperature=1.0,
                              softcap=None):
    """float64 log_softmax((hidden @ weight.T + bias) / temperature, softcapped)[targets]; differentiable."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    logits = logits / temperature
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return _logprobs_from_logits(logits, targets, ignore_index)


def naive_linear_logprobs(hidden, weight, targets, bias=None, *, ignore_index=-100, temperature=1.0,
                          softcap=None):
    """Plain PyTorch as users write it: logits in the inputs' dtype, log_softmax in fp32."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return _logprobs_from_logits(logits, targets, ignore_index)


def reference_sequence_logprobs(hidden, weight, labels, bias=None, *, ignore_index=-100, temperature=1.0,
                                softcap=None):
    """float64 per-sequence sums; hidden [B, T, H], labels [B, T] -> ([B], n_tokens [B])."""
    b, t, h = hidden.shape
    tok = reference_linear_logprobs(hidden.reshape(b * t, h), weight, labels.reshape(b * t), bias,
                                    ignore_index=ignore_index, temperature=temperature, softcap=softcap)
    return tok.view(b, t).sum(-1), (labels != ignore_index).sum(-1)
