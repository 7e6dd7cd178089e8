"""Supervised fine-tuning on demonstrations with the fused SFT loss."""
import math

from fastalign.config import SFTConfig
from fastalign.losses import FusedSFTLoss
from fastalign.integrations.hf import lm_head_config
from fastalign.trainers.loop import BaseTrainer, trl_arguments


class SFTTrainer(BaseTrainer):
    """Supervised fine-tuning on demonstrations with the fused SFT loss (mean token NLL)."""

    config_class = SFTConfig
    data_kind = "sft"

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_loss_func=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), optimizer_cls_and_kwargs=None, preprocess_logits_for_metrics=None,
                 quantization_config=None, peft_config=None, formatting_func=None, *, tokenizer=None, config=None):
        """TRL 1.16's signature (``args``, ``processing_class``, ``callbacks``, ``peft_config``); fastalign's
        ``tokenizer=`` and ``config=`` are accepted too."""
        config, tokenizer = trl_arguments(type(self).__name__, args, config, processing_class, tokenizer,
                                          {"data_collator": data_collator, "compute_loss_func": compute_loss_func,
                                           "compute_metrics": compute_metrics, "optimizers": optimizers,
                                           "optimizer_cls_and_kwargs": optimizer_cls_and_kwargs,
                                           "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
                                           "quantization_config": quantization_config,
                                           "formatting_func": formatting_func})
        super().__init__(model, tokenizer, train_dataset, eval_dataset, config, callbacks=callbacks,
                         peft_config=peft_config)

    def _setup(self):
        temperature, softcap = lm_head_config(self.model)
        self.loss_module = FusedSFTLoss(temperature=temperature, softcap=softcap, backend=self.config.backend,
                                        deterministic=self.config.deterministic,
                                        grad_in_forward=self._grad_in_forward(),
                                        chunk_rows=self.config.loss_chunk_rows)

    def _loss(self, model, batch, extra):
        hidden, head = self._hidden(model, batch)
        h, labels, seq = self._shifted(hidden, batch)
        return self.loss_module(h, head.weight, labels, bias=getattr(head, "bias", None), sequence_index=seq,
                                n_sequences=batch.n_sequences if seq is not None else None)

    def _metrics_of(self, out):
        return {"loss": out.loss.item(), "perplexity": math.exp(min(out.loss.item(), 50.0))}
