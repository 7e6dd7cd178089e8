"""Bradley-Terry reward-model trainer (optionally the weighted MLE of Clone-Robust AI Alignment)."""
import os

import torch

from fastalign.config import RewardConfig
from fastalign.integrations.hf import _unwrap, trunk_of
from fastalign.losses import weighted_bt_loss
from fastalign.trainers.loop import BaseTrainer, trl_arguments
from fastalign.trainers.models import model_from_folder


class _RewardOutput:
    """A reward model's scores are its rewards: the same field names as PreferenceLossOutput."""

    def __init__(self, loss, chosen, rejected):
        self.loss, self.chosen_rewards, self.rejected_rewards = loss, chosen, rejected
        self.reward_margins = (chosen - rejected).detach()
        self.reward_accuracies = (chosen > rejected).float().detach()


class RewardTrainer(BaseTrainer):
    """Bradley-Terry reward model: score(chosen) vs score(rejected) through ``weighted_bt_loss``; a per-pair
    ``weight`` column turns the mean into the weighted MLE (Clone-Robust AI Alignment). The model is a
    sequence-classification model with one label (its ``score`` head reads the last token of each answer)."""

    config_class = RewardConfig
    data_kind = "reward"

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics=None, callbacks=None, optimizers=(None, None),
                 optimizer_cls_and_kwargs=None, preprocess_logits_for_metrics=None, quantization_config=None,
                 peft_config=None, *, tokenizer=None, config=None):
        """TRL 1.16's signature (``args``, ``processing_class``, ``callbacks``, ``peft_config``); fastalign's
        ``tokenizer=`` and ``config=`` are accepted too."""
        config, tokenizer = trl_arguments(type(self).__name__, args, config, processing_class, tokenizer,
                                          {"data_collator": data_collator, "compute_metrics": compute_metrics,
                                           "optimizers": optimizers,
                                           "optimizer_cls_and_kwargs": optimizer_cls_and_kwargs,
                                           "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
                                           "quantization_config": quantization_config})
        if isinstance(model, (str, os.PathLike)):  # TRL takes a model by name: here a local folder
            model, folder_tokenizer = model_from_folder(type(self).__name__, model, "rm")
            tokenizer = tokenizer if tokenizer is not None else folder_tokenizer
        inner = _unwrap(model)
        if not isinstance(getattr(inner, "score", None), torch.nn.Module):
            raise TypeError(f"RewardTrainer needs a sequence-classification model with a `score` head and "
                            f"num_labels=1 (e.g. AutoModelForSequenceClassification), got {type(inner).__name__}")
        super().__init__(model, tokenizer, train_dataset, eval_dataset, config, callbacks=callbacks,
                         peft_config=peft_config)

    def _setup(self):
        if self.config.clone_robust:  # pair weights w(chosen) * w(rejected) (fastalign/clone_robust_train.py)
            from fastalign.clone_robust_train import apply_to_trainer
            apply_to_trainer(self)

    def _loss(self, model, batch, extra):
        inner = _unwrap(model)
        hidden = self._trunk_hidden(trunk_of(inner), batch)
        n = batch.n_sequences
        if batch.sequence_index is None:  # right padding: the last real token of each row
            last = batch.attention_mask.sum(-1) - 1
            h_last = hidden[torch.arange(n, device=hidden.device), last]
        else:
            seq = batch.sequence_index[0]
            pos = torch.arange(seq.shape[0], device=seq.device)
            last = torch.zeros(n, dtype=torch.long, device=seq.device).scatter_reduce_(0, seq, pos, "amax")
            h_last = hidden[0, last]
        scores = inner.score(h_last).squeeze(-1).float()
        b = n // 2
        loss = weighted_bt_loss(scores[:b], scores[b:], batch.weights, batch.margins)
        return _RewardOutput(loss, scores[:b], scores[b:])

    def _metrics_of(self, out):
        """fastalign's DPO-style keys and TRL's RewardTrainer keys (accuracy, margin, min/mean/max_reward)."""
        metrics = self._reward_metrics(out)
        scores = torch.cat([out.chosen_rewards, out.rejected_rewards])
        metrics.update(accuracy=metrics["rewards/accuracies"], margin=metrics["rewards/margins"],
                       min_reward=scores.min().item(), mean_reward=scores.mean().item(),
                       max_reward=scores.max().item())
        return metrics
