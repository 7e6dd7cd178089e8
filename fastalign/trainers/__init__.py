"""Thin, fast trainers for Hugging Face models on the fused losses: DPO (and SimPO/ORPO/RPO), reward models,
SFT. The policy's logits are never computed: the trunk's hidden states go with the lm_head weight into
the fused op. One loop (loop.py) serves all of them; state.py holds checkpointing and resume; each trainer's
file states how a batch becomes a loss.
"""
from fastalign.trainers.afd_reward import AfDRewardTrainer
from fastalign.trainers.dpo import DPOTrainer
from fastalign.trainers.loop import BaseTrainer
from fastalign.trainers.reward import RewardTrainer
from fastalign.trainers.sft import SFTTrainer

__all__ = ["AfDRewardTrainer", "BaseTrainer", "DPOTrainer", "RewardTrainer", "SFTTrainer"]
