"""Supervised fine-tuning on demonstrations with the fused SFT loss."""
import math

from fastalign.config import SFTConfig
from fastalign.losses import FusedSFTLoss
from fastalign.integrations.hf import lm_head_config
from fastalign.trainers.loop import BaseTrainer


class SFTTrainer(BaseTrainer):
    """Supervised fine-tuning on demonstrations with the fused SFT loss (mean token NLL)."""

    config_class = SFTConfig
    data_kind = "sft"

    def _setup(self):
        temperature, softcap = lm_head_config(self.model)
        self.loss_module = FusedSFTLoss(temperature=temperature, softcap=softcap, backend=self.config.backend,
                                        deterministic=self.config.deterministic)

    def _loss(self, model, batch, extra):
        hidden, head = self._hidden(model, batch)
        h, labels, seq = self._shifted(hidden, batch)
        return self.loss_module(h, head.weight, labels, bias=getattr(head, "bias", None), sequence_index=seq,
                                n_sequences=batch.n_sequences if seq is not None else None)

    def _metrics_of(self, out):
        return {"loss": out.loss.item(), "perplexity": math.exp(min(out.loss.item(), 50.0))}
