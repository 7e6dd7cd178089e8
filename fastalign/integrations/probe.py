"""Before training: check that the fused path reproduces the model's own log-probs on a tiny probe batch.

A table of config names cannot vouch for a model it has not seen, so the check is empirical: run the
model's own forward (its logits) and the fused path (trunk -> head transform -> linear_logprobs with the
temperature, softcap and folded scales of ``integrations.hf``) on a few short random rows, and compare the
log-probs of several targets per position (the next token, the model's most and least likely token, a
random one: the extremes are where a missed soft cap or multiplier shows most). On a mismatch, refuse with
``ModelCheckError`` naming the model class and the size of the difference.
"""
from dataclasses import dataclass

import torch

from fastalign.errors import ModelCheckError, UnsupportedModelError
from fastalign.integrations.hf import _forward_takes, _unwrap, lm_head_config, run_trunk, trunk_and_head

# Per compute dtype: absolute tolerance plus a multiple of the dtype's epsilon times the row's largest |logit|
# (the model's own logits are rounded to its dtype; the fused op accumulates in fp32).
_ATOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
_EPS_MULTIPLE = 16


@dataclass(frozen=True)
class ProbeResult:
    """What the probe measured: max |fused - model| over the probed log-probs, and the tolerance it allowed."""
    model_class: str
    dtype: str
    n_logprobs: int
    max_abs_diff: float
    tolerance: float

    def summary(self):
        return (f"{self.model_class}: fused path matches the model's own log-probs (max |diff| "
                f"{self.max_abs_diff:.2e} <= {self.tolerance:.2e} over {self.n_logprobs} log-probs, {self.dtype})")


def _device_of(model):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _model_logits(inner, ids, mask):
    """The model's own logits [rows, length, V]. attention_mask and use_cache=False go only to a forward that takes
    them (recurrent models take neither), asked of its signature: a TypeError raised inside the forward is the
    model's own error and is not retried without them."""
    inputs = {"input_ids": ids}
    if _forward_takes(inner, "attention_mask"):
        inputs["attention_mask"] = mask
    out = run_trunk(inner, **inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def check_fused_head(model, *, backend="auto", rows=2, length=8, seed=0):
    """Compare the fused path with ``model``'s own forward on ``rows`` x ``length`` random tokens (no grad,
    eval mode, restored afterwards). Returns a ``ProbeResult``; raises ``ModelCheckError`` on a mismatch and
    ``UnsupportedModelError`` for a model the fused path cannot run at all."""
    from fastalign.ops import linear_logprobs
    inner = _unwrap(model)
    name = type(inner).__name__
    trunk, head = trunk_and_head(inner)  # refuses what cannot be expressed (adaptive softmax, no lm_head)
    temperature, softcap = lm_head_config(inner)
    device = _device_of(inner)
    vocab = head.weight.shape[0]
    cfg_vocab = getattr(getattr(inner, "config", None), "vocab_size", None) or vocab
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, cfg_vocab), (rows, length), generator=g).to(device)
    mask = torch.ones_like(ids)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            try:
                logits = _model_logits(inner, ids, mask)[:, :-1].double()
            except Exception as exc:
                raise UnsupportedModelError(f"{name}: the model's own forward failed on {rows} x {length} random "
                                            f"tokens ({type(exc).__name__}: {exc})") from exc
            try:
                out = run_trunk(trunk, input_ids=ids, attention_mask=mask)
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            except Exception as exc:
                raise UnsupportedModelError(f"{name}: the fused path could not run the model's trunk "
                                            f"({type(exc).__name__}: {exc})") from exc
            hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            flat = logits.reshape(-1, logits.shape[-1])
            n = flat.shape[0]
            if flat.shape[-1] != vocab:
                raise ModelCheckError(f"{name}: its logits have {flat.shape[-1]} entries per token but its lm_head "
                                      f"weight has {vocab} rows; the fused path cannot reproduce them")
            rand = torch.randint(0, vocab, (n,), generator=g).to(device)
            targets = torch.stack([ids[:, 1:].reshape(-1), flat.argmax(-1), flat.argmin(-1), rand], 1)  # [n, 4]
            k = targets.shape[1]
            weight = head.weight
            bias = getattr(head, "bias", None)
            try:
                fused = linear_logprobs(hidden.repeat_interleave(k, 0).to(weight.dtype), weight, targets.reshape(-1),
                                        None if bias is None else bias.to(weight.dtype), temperature=temperature,
                                        softcap=softcap, backend=backend).double().view(n, k)
            except ValueError as exc:  # shapes that do not fit (a head transform changed the width)
                raise UnsupportedModelError(f"{name}: the fused op cannot take this model's trunk output and "
                                            f"lm_head ({exc})") from exc
            want = torch.log_softmax(flat, -1).gather(1, targets)
            dtype = weight.dtype
            dtype_name = str(dtype).replace("torch.", "")
            tol = _ATOL.get(dtype, 1e-2) + _EPS_MULTIPLE * torch.finfo(dtype).eps * flat.abs().amax(-1, keepdim=True)
            diff = (fused - want).abs()
            worst = float(diff.max())
            if not bool(torch.isfinite(fused).all()) or bool((diff > tol).any()):
                raise ModelCheckError(
                    f"{name}: the fused log-probs differ from the model's own forward by up to {worst:.3g} "
                    f"(tolerance {float(tol.max()):.2g}, {dtype_name}) on a probe batch of {rows}x{length} tokens; its "
                    f"head computes logits in a way fastalign does not reproduce (temperature={temperature:g}, "
                    f"softcap={softcap}), so training would optimize the wrong objective. Refusing; "
                    "check_model=False skips this check.")
    finally:
        inner.train(was_training)
    return ProbeResult(model_class=name, dtype=dtype_name, n_logprobs=n * k,
                       max_abs_diff=worst, tolerance=float(tol.max()))


def check_trainer_model(trainer):
    """The check a trainer runs once at construction (causal LMs only; ``config.check_model=False`` skips)."""
    if not getattr(trainer.config, "check_model", True) or trainer.data_kind == "reward":
        return None
    return check_fused_head(trainer.model, backend=trainer.config.backend)


__all__ = ["ProbeResult", "check_fused_head", "check_trainer_model"]
