"""Model plumbing the trainers share: unwrapping DDP/FSDP/peft, the step module DDP wraps."""
import torch

from fastalign.integrations.hf import _unwrap


def strip_parallel(model):
    """The module inside DDP/FSDP wrappers, keeping a peft wrapper (unlike integrations.hf._unwrap)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def is_peft(model):
    model = strip_parallel(model)
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def flash_varlen_ready(model):
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:
        return False
    impl = getattr(getattr(_unwrap(model), "config", None), "_attn_implementation", None)
    return is_flash_attn_2_available() and impl == "flash_attention_2"


class StepModule(torch.nn.Module):
    """What DDP wraps: model forward + loss inside one forward, so every parameter's use is seen by DDP."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch, extra):
        return self.loss_fn(self.model, batch, extra)
