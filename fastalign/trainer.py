"""The trainers' import face (kept for ``from fastalign.trainer import DPOTrainer``); the code lives in
``fastalign.trainers``."""
from fastalign.trainers import BaseTrainer, DPOTrainer, RewardTrainer, SFTTrainer

__all__ = ["BaseTrainer", "DPOTrainer", "RewardTrainer", "SFTTrainer"]
