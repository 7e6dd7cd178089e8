"""Model plumbing the trainers share: unwrapping DDP/FSDP/peft, the step module DDP wraps."""
import torch
from torch.torch_version import TorchVersion

from fastalign.integrations.hf import _unwrap, is_peft, strip_parallel  # noqa: F401 (re-exported)


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


def disable_dropout(model):
    """Set every dropout probability in the model to 0, as TRL's disable_dropout does: nn.Dropout modules, and
    the float ``*dropout`` attributes that attention modules pass to a functional dropout (Llama's
    ``attention_dropout``). Returns the model."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool):
                setattr(module, name, 0.0)
    return model


def apply_peft_config(model, peft_config):
    """The model wrapped by peft.get_peft_model(model, peft_config) (TRL's ``peft_config=``); the model itself
    when peft_config is None."""
    if peft_config is None:
        return model
    try:
        import peft
    except ImportError:
        raise ImportError("peft_config was given but peft is not installed: pip install peft") from None
    if is_peft(model):
        raise ValueError("peft_config was given for a model that is already a peft model: pass the base model "
                         "with peft_config, or the peft model without it")
    return peft.get_peft_model(model, peft_config)


def model_from_folder(trainer_name, path, kind, what="model"):
    """(model, tokenizer) from a local save_pretrained folder, as TRL takes a model given by name. kind: "rm" (a
    sequence-classification model with one label) or "causal-lm". fastalign never downloads: a name that is not a
    local folder is refused."""
    import os
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{trainer_name}: {what}={path!r} is not a local folder; pass a transformers model "
                                "object, or a folder written by save_pretrained (fastalign never downloads; load a hub "
                                "model with from_pretrained yourself)")
    from fastalign.cli.common import load_model
    model, tokenizer, _ = load_model("rm" if kind == "rm" else "dpo", path)
    return model, tokenizer


def fsdp2_fully_shard(device):
    """FSDP2's ``fully_shard``, or a ConfigError where this torch is known not to run it (checked 2026-12-07: torch
    2.4 has no public ``torch.distributed.fsdp.fully_shard``; 2.6's fails on CPU in its first forward, calling
    ``Stream.record_event``, which CPU streams lack; 2.13 runs both)."""
    from fastalign.config import ConfigError
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ConfigError(f"fsdp=True needs FSDP2's torch.distributed.fsdp.fully_shard (torch >= 2.6); this is torch "
                          f"{torch.__version__}. Upgrade torch, or train with DDP (fsdp=False)") from None
    if device.type == "cpu" and TorchVersion(torch.__version__) < (2, 7):
        raise ConfigError(f"fsdp=True on CPU fails with torch {torch.__version__} (its FSDP2 calls Stream.record_event, "
                          "which CPU streams lack); it runs with torch 2.13. Upgrade torch, or train with DDP "
                          "(fsdp=False)")
    return fully_shard
