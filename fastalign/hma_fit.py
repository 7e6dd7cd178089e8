"""Fitting the ratios of Heterogeneous Model Averaging (``fastalign.averaging.hma``) on alignment data.

``fit_hma_ratios`` chooses HMA's K per-group ratios a_k (weights on the pre-alignment model, mean(a_k) =
weight_on_pre, 0 <= a_k <= 1) that maximize the averaged model's log-likelihood of alignment data. theta is
linear in the ratios, so d loss / d a_k = sum over the parameters p of group k of
<grad_p loss, theta_pre_p - theta_post_p>: one forward and backward of the averaged model per step (through the
fused log-prob op, ``_nll``), then an Adam step projected back onto the constraint set (``project_ratios``).
``hma_ratio_grad`` exposes one such gradient; ``prompt_and_answer`` and ``_encode_rows`` turn preference, SFT,
chat or text rows into labelled tokens. ``fastalign.averaging`` re-exports every name here.
"""
import copy
import math
import numbers

import torch

from fastalign.averaging import AveragingError, _check_groups, check_compatible, check_weight_on_pre, group_of_names
from fastalign.integrations.hf import is_peft


def project_ratios(values, mean):
    """Euclidean projection of ``values`` [K] onto {a : mean(a) = mean, 0 <= a_k <= 1}: a_k = clip(v_k - t, 0, 1)
    with the shift t found by bisection (the mean is monotone in t)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    lo, hi = float(v.min()) - 1.0, float(v.max()) + 1.0
    for _ in range(100):
        t = 0.5 * (lo + hi)
        if float((v - t).clamp(0, 1).mean()) > mean:
            lo = t
        else:
            hi = t
    return (v - 0.5 * (lo + hi)).clamp(0, 1)


class _AveragedModel:
    """A model whose parameters are post + a_k (pre - post) per group, rewritten in place for each ratio."""

    def __init__(self, pre, post, groups):
        if not (isinstance(pre, torch.nn.Module) and isinstance(post, torch.nn.Module)):
            raise TypeError("fit_hma_ratios needs two models (nn.Module), not state dicts")
        for name, m in (("pre", pre), ("post", post)):
            if is_peft(m):
                raise AveragingError(f"{name} is a peft (LoRA) model: merge its adapters first (merge_and_unload())")
        if type(pre) is not type(post):
            raise AveragingError(f"pre is a {type(pre).__name__} but post is a {type(post).__name__}")
        check_compatible(pre.state_dict(), post.state_dict())
        self.model = copy.deepcopy(post).eval()
        self.k = _check_groups(groups)
        names = [n for n, _ in self.model.named_parameters()]
        where = group_of_names(names, self.k)
        pre_p, post_p = dict(pre.named_parameters()), dict(post.named_parameters())
        self.params = []  # (parameter of the working model, group, post fp32, delta = pre - post fp32)
        for n, p in self.model.named_parameters():
            p.requires_grad_(True)
            work = torch.promote_types(p.dtype, torch.float32)  # fp32, or fp64 for fp64 models
            base = post_p[n].detach().to(work)
            self.params.append((p, where[n], base, pre_p[n].detach().to(work) - base))

    @torch.no_grad()
    def set(self, ratios):
        for p, g, base, delta in self.params:
            p.copy_(base + float(ratios[g]) * delta)

    def ratio_grad(self):
        """d loss / d a_k from the parameters' gradients: sum over group k of <grad_p, pre_p - post_p>."""
        grad = torch.zeros(self.k, dtype=torch.float64)
        for p, g, _, delta in self.params:
            if p.grad is not None:
                grad[g] += float((p.grad.to(delta.dtype) * delta).sum())
        return grad


def prompt_and_answer(row, where="data row"):
    """(prompt, answer) of a text row ({"text"}: empty prompt), a preference row (its chosen answer), an SFT row
    (prompt + completion) or a conversation (its last assistant turn)."""
    if "text" in row:
        return "", row["text"]
    if "chosen" in row:
        return row.get("prompt", ""), row["chosen"]
    if "completion" in row:
        return row.get("prompt", ""), row["completion"]
    if "messages" in row:
        msgs = row["messages"]
        last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        return msgs[:last], [msgs[last]]
    raise ValueError(f"{where}: expected a 'text', 'chosen', 'completion' or 'messages' field, got fields {sorted(row)}")


def _encode_rows(data, tokenizer, max_length, max_prompt_length):
    """Token ids and labels (-100 on prompts) of alignment data: preference rows (prompt + chosen), SFT rows
    (prompt + completion, or messages), text rows ({"text": ...}), or pre-tokenized {"input_ids", "labels"}."""
    from fastalign.data import load_rows, tokenize_pair
    from fastalign.data.loading import locations
    rows = load_rows(data)
    out = []
    for r, where in zip(rows, locations(rows)):
        if "input_ids" in r:
            ids = list(r["input_ids"])
            labels = list(r.get("labels", ids))
        else:
            if tokenizer is None:
                raise ValueError("data holds text: pass tokenizer= to tokenize it")
            prompt, answer = prompt_and_answer(r, f"fit data {where}")
            ids, labels = tokenize_pair(tokenizer, prompt, answer, max_length, max_prompt_length)
        if not any(t != -100 for t in labels):
            raise ValueError(f"fit data {where} has no labelled token after tokenization")
        out.append((ids, labels))
    return out


def _nll(model, examples, pad_id, backend="auto"):
    """Mean token NLL of ``examples`` [(ids, labels)] under ``model`` through the fused op (grad enabled)."""
    from fastalign.data import collate_sequences
    from fastalign.integrations.hf import head_inputs
    from fastalign.losses import FusedSFTLoss
    batch = collate_sequences([e[0] for e in examples], [e[1] for e in examples], pad_id)
    device = next(model.parameters()).device
    inp = head_inputs(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                      labels=batch.labels.to(device))
    loss_fn = FusedSFTLoss(backend=backend, **inp.loss_kwargs())
    return loss_fn(inp.hidden, inp.weight, inp.labels, bias=inp.bias).loss


def hma_ratio_grad(pre, post, data, ratios, *, groups=3, tokenizer=None, max_length=256, max_prompt_length=128,
                   backend="auto"):
    """(loss, d loss / d ratios [K]) of the HMA-averaged model's mean token NLL on ``data`` at ``ratios``: one
    forward and backward of the averaged model. Exposed so the gradient can be checked by finite differences."""
    avg = _AveragedModel(pre, post, groups)
    examples = _encode_rows(data, tokenizer, max_length, max_prompt_length)
    avg.set([float(r) for r in ratios])
    pad = _pad_id(tokenizer)
    loss = _nll(avg.model, examples, pad, backend)
    loss.backward()
    return float(loss.detach()), avg.ratio_grad()


def _pad_id(tokenizer):
    if tokenizer is None:
        return 0
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def fit_hma_ratios(pre, post, data, *, weight_on_pre, groups=3, steps=50, lr=0.05, tokenizer=None, batch_size=16,
                   max_length=256, max_prompt_length=128, seed=0, backend="auto", progress=True,
                   return_history=False):
    """Fit HMA's K ratios to maximize the averaged model's log-likelihood of alignment data.

    data: a path or rows: the aligned model's own samples (prompt + completion), or preference rows (their chosen
    answers), or text rows. Minimizes the mean token NLL (fused op) over ratios a [K] under mean(a) =
    weight_on_pre and 0 <= a_k <= 1: each step takes one minibatch (``batch_size`` rows, a seeded order),
    computes d loss / d a_k = sum over group k of <grad_theta loss, theta_pre - theta_post>, takes an Adam step
    on a along its mean-free part and projects back onto the constraint set. Starts from a_k = weight_on_pre (plain averaging).
    Returns the ratios as a list of K floats (bottom group first); with return_history, also the per-step losses.
    """
    a0 = check_weight_on_pre(weight_on_pre)
    k = _check_groups(groups)
    for name, v, low in (("steps", steps, 0), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0 or math.isinf(lr):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    avg = _AveragedModel(pre, post, k)
    examples = _encode_rows(data, tokenizer, max_length, max_prompt_length)
    pad = _pad_id(tokenizer)
    a = torch.full((k,), a0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([a], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=gen).tolist()
    history = []
    from tqdm.auto import tqdm
    bar = tqdm(range(steps), desc="fit HMA ratios", disable=not progress, leave=False, dynamic_ncols=True)
    pos = 0
    for _ in bar:
        if pos + batch_size > len(order):
            order = torch.randperm(len(examples), generator=gen).tolist()
            pos = 0
        chunk = [examples[i] for i in order[pos:pos + batch_size]]
        pos += batch_size
        avg.set(a.detach().tolist())
        avg.model.zero_grad(set_to_none=True)
        loss = _nll(avg.model, chunk, pad, backend)
        loss.backward()
        opt.zero_grad()
        # only moves that keep the mean are allowed: step along the gradient's mean-free part (Adam normalizes
        # each coordinate, so a raw gradient whose components share a sign would step every ratio alike and the
        # projection would undo the step)
        grad = avg.ratio_grad()
        a.grad = grad - grad.mean()
        opt.step()
        with torch.no_grad():
            a.copy_(project_ratios(a.detach(), a0))
        history.append(float(loss.detach()))
        bar.set_postfix(nll=f"{history[-1]:.4f}", ratios=",".join(f"{x:.2f}" for x in a.tolist()))
    ratios = [float(x) for x in a.detach()]
    # the projection's bisection leaves ~1e-16 of slack: restore the mean exactly
    shift = a0 - sum(ratios) / k
    ratios = [min(1.0, max(0.0, r + shift)) for r in ratios]
    return (ratios, history) if return_history else ratios


__all__ = ["fit_hma_ratios", "hma_ratio_grad", "project_ratios", "prompt_and_answer"]
