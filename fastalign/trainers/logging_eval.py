"""What every trainer shares for its output besides checkpoints: progress bars, metric rows (the metrics file and the
trackers, main process only), the callbacks' on_log, and evaluation with TRL's ``eval_`` keys. A mixin of
loop.BaseTrainer, which provides config, model, step_module, the batch helpers and the event dispatch."""
import torch

from fastalign.trainers.reporting import Trackers


class LoggingEvalMixin:
    def _eval_due(self, steps_per_epoch):
        strategy = self.config.resolved_eval_strategy
        if strategy == "steps":
            return self.global_step % self.config.resolved_eval_steps == 0
        return strategy == "epoch" and self.global_step % steps_per_epoch == 0

    def _emit_log(self, metrics):
        """Write one row (metrics file and trackers, main process only) and tell the callbacks."""
        self._log(metrics, getattr(self, "_writer", None))
        self.state.log_history.append(metrics)
        self._event("on_log", logs=metrics)

    def _progress(self, iterable, desc):
        from tqdm.auto import tqdm
        return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True,
                    disable=not self.is_main or self.config.disable_tqdm)

    def _open_writers(self):
        if not self.is_main:
            return None
        return Trackers(self.config) or None

    def _log(self, metrics, writer=None):
        self.history.append(metrics)
        if not self.is_main or "none" in self.config.reports:
            return
        self._write_metrics_row(metrics)
        if writer is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, metrics["step"])

    # ---- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_dataset=None, metric_key_prefix="eval"):
        """Mean metrics over the eval set, keys prefixed ``eval_`` (TRL's names), logged as one row of the metrics
        file and passed to the callbacks' on_evaluate. Under torchrun every process must call it (FSDP's forward
        is a collective); each evaluates all of the data, so every process returns the same numbers and only the
        main process writes."""
        examples = self._prepare(eval_dataset, "eval_dataset") if eval_dataset is not None else self.eval_examples
        if examples is None:
            raise ValueError("no eval_dataset was given")
        if eval_dataset is not None and getattr(self, "ref_cache", None) is not None:
            raise ValueError("with precompute_ref_log_probs the reference log-probs exist only for the eval_dataset "
                             "given at construction; evaluate() it, or build a trainer for the new data")
        was_training = self.model.training
        self.model.eval()
        sums, counts, per_behaviour = {}, {}, {}
        b = self.config.per_device_eval_batch_size
        for i in self._progress(range(0, len(examples), b), "evaluate"):
            chunk = examples[i:i + b]
            batch = self._collate(chunk)
            with self._autocast():
                out = self.step_module(batch, self._extra(batch))
            for k, v in self._metrics_of(out).items():
                sums[k] = sums.get(k, 0.0) + v * len(chunk)
                counts[k] = counts.get(k, 0) + len(chunk)
            for name, stats in self._per_example_stats(out, chunk):
                acc = per_behaviour.setdefault(name, {"n": 0})
                acc["n"] += 1
                for k, v in stats.items():
                    acc[k] = acc.get(k, 0.0) + v
        self.model.train(was_training)
        result = {k: v / counts[k] for k, v in sums.items()}
        for name, acc in sorted(per_behaviour.items()):
            for k, v in acc.items():
                if k != "n":
                    result[f"{k}/{name}"] = v / acc["n"]
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in result.items()}
        self._emit_log({**metrics, "step": self.global_step})
        self._event("on_evaluate", metrics=metrics)
        return metrics

    def _per_example_stats(self, out, examples):
        """(behaviour, {stat: value}) for examples that carry a behaviour label; averaged per behaviour."""
        if not hasattr(out, "reward_margins"):
            return []
        return [(e["behaviour"], {"accuracy": a, "margin": m})
                for e, a, m in zip(examples, out.reward_accuracies.tolist(), out.reward_margins.tolist())
                if e.get("behaviour")]

    @staticmethod
    def _reward_metrics(out):
        return {"loss": out.loss.item(), "rewards/chosen": out.chosen_rewards.mean().item(),
                "rewards/rejected": out.rejected_rewards.mean().item(),
                "rewards/margins": out.reward_margins.mean().item(),
                "rewards/accuracies": out.reward_accuracies.mean().item()}
