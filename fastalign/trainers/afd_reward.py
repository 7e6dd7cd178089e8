"""The AfD discriminator reward model (Sun and van der Schaar, 2024, "Inverse-RL Alignment from Demonstrations"):
a sequence-classification model trained with binary cross-entropy to tell positives (label 1) from negatives
(label 0); its logit is the reward. Rows are {prompt, answer (or completion), label}.

    loss = mean_i BCEWithLogits(s_i, y_i) = mean_i [ softplus(s_i) - y_i * s_i ],  s_i = score(last answer token)
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastalign.config import ConfigError, RewardConfig, _f
from fastalign.data import DataError, is_nonempty, collate_sequences, load_rows, locations, tokenize_pair
from fastalign.integrations.hf import _unwrap, trunk_of
from fastalign.trainers.loop import BaseTrainer, trl_arguments

# positives vs negatives of each reward-model kind (the paper's names)
RM_KINDS = {"init-sft": ("sft", "init"), "init-demo": ("demo", "init"), "sft-demo": ("demo", "sft")}


@dataclass
class AfDRewardConfig(RewardConfig):
    """AfD discriminator reward model. rm_kind names what is positive and what negative: "init-sft" (SFT samples
    vs initial-model samples; the paper's recommendation), "init-demo" (demonstrations vs initial-model samples),
    "sft-demo" (demonstrations vs SFT samples). eval_fraction: share of prompts held out by the AfD pipeline."""
    rm_kind: str = _f("init-sft", "what is positive vs negative: init-sft = SFT samples vs initial-model samples "
                      "(the paper's choice), init-demo = demonstrations vs initial-model samples, sft-demo = "
                      "demonstrations vs SFT samples", choices=RM_KINDS)
    eval_fraction: float = _f(0.1, "share of the prompts held out for evaluation when the rows are built from "
                              "--rm-kind's parts, in [0, 1) (all rows of a prompt on one side); not used with --data")

    def validate(self):
        super().validate()
        if self.rm_kind not in RM_KINDS:
            raise ConfigError(f"unknown rm_kind {self.rm_kind!r}; valid: {', '.join(RM_KINDS)}")
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)) \
                or not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.padding_free:
            raise ConfigError("padding_free=True is not supported by AfDRewardTrainer (its rows are single short "
                              "answers, right-padded); leave padding_free=False")


def validate_labelled_rows(rows):
    """Rows must have prompt, answer (or completion) and label 0/1 (or bool); DataError lists the bad ones, each
    by file:line (or row) as the loader recorded it."""
    problems = []
    for r, where in zip(rows, locations(rows)):
        answer_key = "answer" if "answer" in r else "completion" if "completion" in r else None
        if "prompt" not in r or answer_key is None or "label" not in r:
            problems.append(f"{where}: needs prompt, answer (or completion) and label; has {sorted(r)}")
            continue
        if not is_nonempty(r["prompt"]):
            found = "an empty string" if isinstance(r["prompt"], str) else type(r["prompt"]).__name__
            problems.append(f"{where}: prompt must be non-empty text (or chat messages), got {found}")
        if not isinstance(r[answer_key], str):
            problems.append(f"{where}: {answer_key} must be text, got {type(r[answer_key]).__name__}")
        if not isinstance(r["label"], (bool, int, float)) or r["label"] not in (0, 1):
            problems.append(f"{where}: label must be 0 or 1, got {r['label']!r}")
    if problems:
        raise DataError(f"{len(problems)} malformed row(s):\n  " + "\n  ".join(problems[:10]))
    labels = {int(r["label"]) for r in rows}
    if labels != {0, 1}:
        raise DataError(f"the rows hold only label {labels.pop()}: a discriminator needs positives and negatives")


def binary_auc(scores, labels):
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties counting 1/2
    (Mann-Whitney U from average ranks). nan when one class is absent."""
    scores, labels = torch.as_tensor(scores).double(), torch.as_tensor(labels).bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    uniq, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    upper = counts.cumsum(0).double()  # 1-based rank of the last copy of each value
    avg_rank = upper - (counts.double() - 1) / 2
    rank_sum = avg_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class _AfDOutput:
    def __init__(self, loss, logits, targets):
        self.loss, self.logits, self.targets = loss, logits, targets
        self.accuracies = ((logits.detach() > 0).float() == targets).float()


class AfDRewardTrainer(BaseTrainer):
    """Binary discriminator reward model for alignment from demonstrations: BCE on (prompt, answer, label) rows
    (build them with ``fastalign.afd.reward_rows``). The model is a sequence-classification model with
    num_labels=1; its logit at the last answer token is the reward. Same loop, checkpoints, resume, DDP and
    logging as the other trainers. Metrics: loss, rewards/accuracies (logit > 0 agrees with the label),
    rewards/positive and rewards/negative (mean logit of each class); evaluate() adds auc."""

    config_class = AfDRewardConfig
    data_kind = "reward"  # a sequence-classification model (no lm_head), like RewardTrainer

    def __init__(self, model, tokenizer=None, train_dataset=None, eval_dataset=None, config=None, *, args=None,
                 processing_class=None, **kwargs):
        """fastalign's names (tokenizer=, config=) or TRL's (processing_class=, args=), as the other trainers."""
        config, tokenizer = trl_arguments(type(self).__name__, args, config, processing_class, tokenizer, {})
        inner = _unwrap(model)
        if not isinstance(getattr(inner, "score", None), torch.nn.Module):
            raise TypeError(f"AfDRewardTrainer needs a sequence-classification model with a `score` head and "
                            f"num_labels=1 (e.g. AutoModelForSequenceClassification), got {type(inner).__name__}")
        if getattr(inner.score, "out_features", 1) != 1:
            raise TypeError(f"AfDRewardTrainer needs num_labels=1 (one logit), got {inner.score.out_features}")
        super().__init__(model, tokenizer, train_dataset, eval_dataset, config, **kwargs)

    def _prepare(self, data, name):
        from fastalign.generation import chat_prompt
        rows = load_rows(data)
        try:
            validate_labelled_rows(rows)
        except DataError as exc:
            raise DataError(f"{name}: {exc}") from None
        out = []
        for i, r in enumerate(rows):
            answer = r["answer"] if "answer" in r else r["completion"]
            ids, labels = tokenize_pair(self.tokenizer, chat_prompt(self.tokenizer, r["prompt"]), answer,
                                        self.config.max_length, self.config.resolved_max_prompt_length)
            out.append({"index": i, "ids": ids, "labels": labels, "label": float(r["label"]),
                        "behaviour": r.get("behaviour")})
        return out

    def _collate(self, examples):
        # right padding: the score is read at each row's last real token (packing is not needed for short rows)
        b = collate_sequences([e["ids"] for e in examples], [e["labels"] for e in examples],
                              self.tokenizer.pad_token_id)
        b.weights = torch.tensor([e["label"] for e in examples], dtype=torch.float32)  # the BCE targets
        b.indices = [e["index"] for e in examples]
        return b.to(self.device)

    def _loss(self, model, batch, extra):
        from fastalign.scoring import last_token_hidden
        inner = _unwrap(model)
        hidden = self._trunk_hidden(trunk_of(inner), batch)
        logits = inner.score(last_token_hidden(hidden, batch.attention_mask)).squeeze(-1).float()
        loss = F.binary_cross_entropy_with_logits(logits, batch.weights)
        return _AfDOutput(loss, logits, batch.weights)

    @staticmethod
    def _class_mean(values, mask):
        return float(values[mask].mean()) if bool(mask.any()) else 0.0

    def _metrics_of(self, out):
        logits = out.logits.detach()
        pos = out.targets > 0.5
        return {"loss": out.loss.item(), "rewards/accuracies": out.accuracies.mean().item(),
                "rewards/positive": self._class_mean(logits, pos), "rewards/negative": self._class_mean(logits, ~pos)}

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, metric_key_prefix="eval"):
        """eval_loss, eval_rewards/accuracies, eval_auc, eval_rewards/positive|negative|margins over the eval set
        (TRL's ``eval_`` prefix), logged and passed to the callbacks' on_evaluate as the other trainers' are."""
        examples = self._prepare(eval_dataset, "eval_dataset") if eval_dataset is not None else self.eval_examples
        if examples is None:
            raise ValueError("no eval_dataset was given")
        was_training = self.model.training
        self.model.eval()
        logits, targets = [], []
        b = self.config.per_device_eval_batch_size
        for i in self._progress(range(0, len(examples), b), "evaluate"):
            batch = self._collate(examples[i:i + b])
            with self._autocast():
                out = self.step_module(batch, None)
            logits.append(out.logits.float().cpu())
            targets.append(out.targets.cpu())
        self.model.train(was_training)
        s, y = torch.cat(logits), torch.cat(targets)
        pos = y > 0.5
        loss = float(F.binary_cross_entropy_with_logits(s.double(), y.double()))
        mp, mn = self._class_mean(s, pos), self._class_mean(s, ~pos)
        metrics = {"loss": loss, "rewards/accuracies": float(((s > 0).float() == y).float().mean()),
                   "auc": binary_auc(s, y), "rewards/positive": mp, "rewards/negative": mn, "rewards/margins": mp - mn}
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self._emit_log({**metrics, "step": self.global_step})  # logged and passed on, as BaseTrainer.evaluate does
        self._event("on_evaluate", metrics=metrics)
        return metrics
