"""fastalign: fused linear -> token log-prob kernels and the preference losses built on them."""
from fastalign._lazy import lazy_attributes
from fastalign._version import __version__
from fastalign.averaging import average_models, fit_hma_ratios, hma, hma_groups
from fastalign.backends import available_backends
from fastalign.losses import (DPO_LOSS_TYPES, FusedDPOLoss, FusedORPOLoss, FusedSFTLoss, FusedSimPOLoss,
                              PreferenceLossOutput, SFTLossOutput, dpo_loss, orpo_loss, sft_loss, simpo_loss,
                              weighted_bt_loss)
from fastalign.ops import linear_logprobs, sequence_logprobs

__all__ = [
    "__version__", "available_backends", "linear_logprobs", "sequence_logprobs",
    "dpo_loss", "simpo_loss", "orpo_loss", "sft_loss", "weighted_bt_loss", "DPO_LOSS_TYPES",
    "FusedDPOLoss", "FusedSimPOLoss", "FusedORPOLoss", "FusedSFTLoss", "PreferenceLossOutput", "SFTLossOutput",
    "average_models", "hma", "hma_groups", "fit_hma_ratios",
]

# Clone-robust alignment: Voronoi weights of alternatives and the weighted MLE.
from fastalign.clone_robust import clone_robust_weights  # noqa: E402
from fastalign.losses import weighted_mle_loss  # noqa: E402

__all__ += ["clone_robust_weights", "weighted_mle_loss"]

# The gradient-in-forward loss path (3 GEMMs for forward+backward): token NLL; the Fused*Loss classes take
# grad_in_forward=True.
from fastalign.fused_grad import fused_linear_nll_loss  # noqa: E402

__all__ += ["fused_linear_nll_loss"]

# Trainers and configs import transformers: load them on first use, not with `import fastalign`.
_LAZY = {"DPOTrainer": "fastalign.trainers", "RewardTrainer": "fastalign.trainers", "SFTTrainer": "fastalign.trainers",
         "DPOConfig": "fastalign.config", "RewardConfig": "fastalign.config", "SFTConfig": "fastalign.config",
         "TrainConfig": "fastalign.config",
         "AfDRewardTrainer": "fastalign.trainers.afd_reward", "AfDRewardConfig": "fastalign.trainers.afd_reward",
         "sample": "fastalign.generation", "best_of_n": "fastalign.scoring",
         "log_ratio_score": "fastalign.scoring", "log_ratio_scorer": "fastalign.scoring",
         "reward_scores": "fastalign.scoring", "BestOfNResult": "fastalign.scoring",
         "distinguishability": "fastalign.dynamics", "DistinguishabilityResult": "fastalign.dynamics"}
__all__ += list(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)
