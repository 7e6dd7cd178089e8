"""Hugging Face causal LMs without their logits: the trunk's last hidden states plus what the lm_head needs.

A model's logits are ``transform(trunk(x)) @ W.T + b``, then scaled and soft-capped. The fused op computes
``(h @ W'.T + b') / temperature`` and ``softcap * tanh(. / softcap)`` without materializing them, so each
model is mapped onto that form here:
- a transform module before the decoder (Bert/Roberta/Electra/RemBert causal-LM heads: dense -> activation ->
  LayerNorm) runs on the trunk side (``trunk_and_head`` returns a trunk that applies it), so it trains;
- a per-vocabulary-token learned scale (Dory's ``lm_head.logit_scale``) folds into the weight and bias
  (``W'_v = s_v W_v``), so it gets its gradient through autograd;
- scalar multipliers and soft caps come from the config (``lm_head_config``).
What cannot be expressed (an adaptive softmax) is refused with ``UnsupportedModelError``. The probe in
``fastalign.integrations.probe`` checks the result against the model's own logits before training.
"""
import inspect
from dataclasses import dataclass
from typing import Optional

import torch

from fastalign.errors import UnsupportedModelError


@dataclass
class HeadInputs:
    """What the fused losses take in place of logits. hidden [B, T-1, H] and labels [B, T-1] are already
    shifted (hidden[b, t] predicts labels[b, t]); temperature and softcap come from the model config."""
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    temperature: float = 1.0
    softcap: Optional[float] = None

    def loss_kwargs(self):
        return {"temperature": self.temperature, "softcap": self.softcap}


def _unwrap(model):
    """The transformers model inside DDP / FSDP / peft wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
            if inner is model:
                return model
            model = inner
        else:
            return model


def _number(cfg, name):
    v = getattr(cfg, name, None)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def strip_parallel(model):
    """The module inside DDP/FSDP wrappers, keeping a peft wrapper (unlike integrations.hf._unwrap)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def is_peft(model):
    model = strip_parallel(model)
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def hash_model(h, model):
    """Feed a model's config and a cheap digest of every tensor (name, shape, dtype, first 64 values, sum) into
    hashlib object ``h``: the key of caches computed from the model (reference log-probs, embeddings)."""
    import json
    inner = _unwrap(model)
    h.update(json.dumps(inner.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in inner.state_dict().items():
        flat = p.detach().reshape(-1).float()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(flat[:64].cpu().numpy().tobytes())
        h.update(flat.sum().cpu().numpy().tobytes())
    return h


def lm_head_config(model):
    """(temperature, softcap) that turn lm_head outputs into the model's logits, from its config.

    logits = lm_head(h) * multiplier, multiplier = 1 / temperature:
      Cohere ``logit_scale`` (multiplies), Granite ``logits_scaling`` (divides), HyperCLOVAX
      ``logits_scaling`` (multiplies), FalconH1 ``lm_head_multiplier`` (multiplies).
    softcap: Gemma-2/3 ``final_logit_softcapping``, RecurrentGemma ``logits_soft_cap``,
      xLSTM ``output_logit_soft_cap``.
    """
    cfg = getattr(_unwrap(model), "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    model_type = getattr(cfg, "model_type", "")
    multiplier = 1.0
    scale = _number(cfg, "logit_scale")
    if scale:
        multiplier *= scale
    scaling = _number(cfg, "logits_scaling")
    if scaling:
        multiplier = multiplier * scaling if model_type == "hyperclovax" else multiplier / scaling
    head_mult = _number(cfg, "lm_head_multiplier")
    if head_mult:
        multiplier *= head_mult
    softcap = None
    for name in ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap"):
        cap = _number(cfg, name)
        if cap:
            softcap = cap
            break
    return 1.0 / multiplier, softcap


_FORWARD_TAKES = {}  # (module class, keyword) -> "yes", "no" or "kwargs": inspect.signature costs about 17 us


def _forward_takes(module, name):
    """Whether module's forward accepts the keyword ``name``. A forward that takes it through **kwargs accepts it,
    unless the module is a wrapper that passes them on (torch.compile's ``_orig_mod``; DDP, FSDP and peft, which
    _unwrap sees through): then the module it wraps is asked."""
    key = (type(module), name)
    if key not in _FORWARD_TAKES:
        try:
            params = inspect.signature(module.forward).parameters
            _FORWARD_TAKES[key] = "yes" if name in params else "kwargs" if any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else "no"
        except (TypeError, ValueError):
            _FORWARD_TAKES[key] = "kwargs"
    answer = _FORWARD_TAKES[key]
    if answer == "kwargs":
        inner = getattr(module, "_orig_mod", None)
        inner = inner if isinstance(inner, torch.nn.Module) else _unwrap(module)
        if inner is not module:
            return _forward_takes(inner, name)
    return answer != "no"


def run_trunk(trunk, **inputs):
    """trunk(**inputs) with use_cache=False where the trunk's forward takes it: a training or scoring forward builds
    no key/value cache. Some trunks have no such argument (XLM's in transformers 4.x), and they are called without."""
    if _forward_takes(trunk, "use_cache"):
        inputs["use_cache"] = False
    return trunk(**inputs)


def trunk_of(model):
    """The transformer trunk (returning last hidden states) of a causal LM or sequence-classification model."""
    inner = _unwrap(model)
    trunk = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    if trunk is None or trunk is inner:
        trunk = getattr(inner, "model", None)
    if trunk is None:
        raise TypeError(f"cannot find the transformer trunk of {type(inner).__name__} "
                        f"(looked for .{getattr(inner, 'base_model_prefix', 'model')} and .model)")
    return trunk


class _DenseActNorm(torch.nn.Module):
    """A prediction head minus its decoder: norm(act(dense(x))), sharing the head's modules (so they train)."""

    def __init__(self, dense, act, norm):
        super().__init__()
        self.dense, self.act, self.norm = dense, act, norm

    def forward(self, x):
        return self.norm(self.act(self.dense(x)))


def head_transform(model):
    """The module between the trunk's last hidden state and the decoder, or None for a plain lm_head.

    Bert-style ``cls.predictions.transform``, Electra's ``generator_predictions``, RemBert-style
    ``cls.predictions`` (dense, activation, LayerNorm, decoder) and Roberta-style ``lm_head`` (dense, gelu,
    layer_norm, decoder)."""
    inner = _unwrap(model)
    predictions = getattr(getattr(inner, "cls", None), "predictions", None)
    if isinstance(getattr(predictions, "transform", None), torch.nn.Module):
        return predictions.transform
    if isinstance(getattr(inner, "generator_predictions", None), torch.nn.Module):
        return inner.generator_predictions
    if all(isinstance(getattr(predictions, a, None), torch.nn.Module) for a in ("dense", "LayerNorm", "decoder")) \
            and callable(getattr(predictions, "activation", None)):
        return _DenseActNorm(predictions.dense, predictions.activation, predictions.LayerNorm)
    lm_head = getattr(inner, "lm_head", None)
    if all(isinstance(getattr(lm_head, a, None), torch.nn.Module) for a in ("dense", "layer_norm", "decoder")):
        return _DenseActNorm(lm_head.dense, torch.nn.functional.gelu, lm_head.layer_norm)
    return None


class _TrunkOutput:
    def __init__(self, last_hidden_state):
        self.last_hidden_state = last_hidden_state

    def __getitem__(self, i):
        if i != 0:
            raise IndexError(i)
        return self.last_hidden_state


class TrunkWithTransform:
    """Calls the trunk, then the head's transform module on its last hidden state (so the transform trains).
    Attribute lookups (``.layers`` for FSDP wrapping, ...) reach the trunk."""

    def __init__(self, trunk, transform):
        self.trunk, self.transform = trunk, transform

    def __call__(self, *args, **kwargs):
        out = self.trunk(*args, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return _TrunkOutput(self.transform(hidden))

    def __getattr__(self, name):
        return getattr(self.__dict__["trunk"], name)


class ScaledHead:
    """An lm_head whose logits are multiplied by a per-vocabulary-token scale s [V]: presented as a plain
    head with weight s[:, None] * W and bias s * b, so autograd gives s, W and b their gradients."""

    def __init__(self, head, scale):
        self.head, self.scale = head, scale

    @property
    def weight(self):
        w = self.head.weight
        return w * self.scale.to(w.dtype).unsqueeze(1)

    @property
    def bias(self):
        b = getattr(self.head, "bias", None)
        return None if b is None else b * self.scale.to(b.dtype)


def _per_token_scale(head, vocab):
    """Dory-style learned ``logit_scale`` [V] on the head (times ``logit_scale_factor``), or None."""
    scale = getattr(head, "logit_scale", None)
    if not isinstance(scale, torch.Tensor):
        return None
    if scale.dim() != 1 or scale.shape[0] != vocab:
        raise UnsupportedModelError(f"{type(head).__name__}.logit_scale has shape {tuple(scale.shape)}; the fused "
                                    f"op can fold only a per-token scale of shape ({vocab},) into the weight")
    factor = getattr(head, "logit_scale_factor", 1.0)
    return scale * factor if factor != 1.0 else scale


def _refuse_unexpressible(inner):
    cfg = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if getattr(cfg, "asm", False) or isinstance(head, torch.nn.AdaptiveLogSoftmaxWithLoss) \
            or isinstance(getattr(head, "proj", None), torch.nn.AdaptiveLogSoftmaxWithLoss):
        raise UnsupportedModelError(f"{type(inner).__name__} uses an adaptive softmax (config.asm=True): its "
                                    "log-probs are not one softmax over hidden @ lm_head.T, which is what the fused "
                                    "op computes; train it without fastalign's fused losses")


def trunk_and_head(model):
    """(trunk returning last hidden states, head with .weight [V, H] and .bias) of a causal LM, with any head
    transform folded into the trunk and any per-token scale folded into the head (see the module docstring)."""
    inner = _unwrap(model)
    _refuse_unexpressible(inner)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise UnsupportedModelError(f"{type(inner).__name__} has no output embeddings (lm_head) with a weight; "
                                    "a causal LM is expected")
    trunk = trunk_of(inner)
    transform = head_transform(inner)
    if transform is not None:
        trunk = TrunkWithTransform(trunk, transform)
    scale = _per_token_scale(head, head.weight.shape[0])
    if scale is not None:
        head = ScaledHead(head, scale)
    return trunk, head


def head_inputs(model, input_ids, attention_mask=None, labels=None, *, shift=True, **model_kwargs):
    """Run the trunk of ``model`` (never its lm_head) and return ``HeadInputs`` for the fused losses.

    input_ids [B, T]; labels [B, T] in Hugging Face convention (unshifted, -100 ignored), or None.
    With shift=True the last position's hidden state is dropped and labels move left by one.
    Extra keyword arguments (position_ids, ...) go to the trunk.
    """
    trunk, head = trunk_and_head(model)
    out = run_trunk(trunk, input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if shift:
        hidden = hidden[:, :-1]
        labels = labels[:, 1:] if labels is not None else None
    temperature, softcap = lm_head_config(model)
    return HeadInputs(hidden=hidden, weight=head.weight, bias=getattr(head, "bias", None), labels=labels,
                      temperature=temperature, softcap=softcap)
