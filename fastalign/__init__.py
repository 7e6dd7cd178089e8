"""fastalign: fused linear -> token log-prob kernels and the preference losses built on them."""
from fastalign._version import __version__
from fastalign.backends import available_backends
from fastalign.losses import (DPO_LOSS_TYPES, FusedDPOLoss, FusedORPOLoss, FusedSFTLoss, FusedSimPOLoss,
                              PreferenceLossOutput, SFTLossOutput, dpo_loss, orpo_loss, sft_loss, simpo_loss,
                              weighted_bt_loss)
from fastalign.ops import linear_logprobs, sequence_logprobs

__all__ = [
    "__version__", "available_backends", "linear_logprobs", "sequence_logprobs",
    "dpo_loss", "simpo_loss", "orpo_loss", "sft_loss", "weighted_bt_loss", "DPO_LOSS_TYPES",
    "FusedDPOLoss", "FusedSimPOLoss", "FusedORPOLoss", "FusedSFTLoss", "PreferenceLossOutput", "SFTLossOutput",
]

# Trainers and configs import transformers: load them on first use, not with `import fastalign`.
_LAZY = {"DPOTrainer": "fastalign.trainers", "RewardTrainer": "fastalign.trainers", "SFTTrainer": "fastalign.trainers",
         "DPOConfig": "fastalign.config", "RewardConfig": "fastalign.config", "SFTConfig": "fastalign.config",
         "TrainConfig": "fastalign.config",
         "distinguishability": "fastalign.dynamics", "DistinguishabilityResult": "fastalign.dynamics"}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastalign' has no attribute {name!r}")
