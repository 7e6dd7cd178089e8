"""Hugging Face causal LMs without their logits: the trunk's last hidden states plus what the lm_head needs."""
from dataclasses import dataclass
from typing import Optional

import torch


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


def lm_head_config(model):
    """(temperature, softcap) that turn lm_head outputs into the model's logits, from its config.

    Gemma-2/3: final_logit_softcapping; Cohere: logits * logit_scale; Granite: logits / logits_scaling.
    """
    cfg = getattr(_unwrap(model), "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    temperature = 1.0
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale not in (0, 1):
        temperature = 1.0 / float(scale)
    scaling = getattr(cfg, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling not in (0, 1):
        temperature = float(scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return temperature, (float(softcap) if softcap else None)


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


def trunk_and_head(model):
    """(trunk module returning last hidden states, lm_head module) of a causal LM."""
    inner = _unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(inner).__name__} has no output embeddings (lm_head); a causal LM is expected")
    return trunk_of(inner), head


def head_inputs(model, input_ids, attention_mask=None, labels=None, *, shift=True, **model_kwargs):
    """Run the trunk of ``model`` (never its lm_head) and return ``HeadInputs`` for the fused losses.

    input_ids [B, T]; labels [B, T] in Hugging Face convention (unshifted, -100 ignored), or None.
    With shift=True the last position's hidden state is dropped and labels move left by one.
    Extra keyword arguments (position_ids, ...) go to the trunk.
    """
    trunk, head = trunk_and_head(model)
    out = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if shift:
        hidden = hidden[:, :-1]
        labels = labels[:, 1:] if labels is not None else None
    temperature, softcap = lm_head_config(model)
    return HeadInputs(hidden=hidden, weight=head.weight, bias=getattr(head, "bias", None), labels=labels,
                      temperature=temperature, softcap=softcap)
