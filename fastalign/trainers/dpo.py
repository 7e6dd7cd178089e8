"""DPO-family trainer (sigmoid, robust, hinge, ipo; rpo_alpha), SimPO and ORPO on the fused losses."""
import contextlib
import copy
import hashlib
import json
import os

import torch

from fastalign.config import DPOConfig
from fastalign.data import DataError, load_rows, row_positions, with_distinct_locations
from fastalign.dynamics import finalize_group_metrics, group_sums
from fastalign.integrations.hf import _unwrap, hash_model, lm_head_config
from fastalign.losses import FusedDPOLoss, FusedORPOLoss, FusedSimPOLoss
from fastalign.trainers.loop import BaseTrainer, trl_arguments
from fastalign.trainers.models import is_peft as _is_peft
from fastalign.trainers.models import strip_parallel as _strip_parallel


class DPOTrainer(BaseTrainer):
    """DPO family (sigmoid, robust, hinge, ipo; rpo_alpha), SimPO and ORPO on the fused losses.

    Reference: ``ref_model`` if given; else, for a peft model, the same model with adapters disabled; else
    a frozen copy of the model made at start; or, with precompute_ref_log_probs, one pass before training
    cached on disk (keyed by model and dataset fingerprints), so no reference model is held while training.

    Rows with a group (``config.group_column``, default ``behaviour``) get per-group metrics from the batch's
    per-pair outputs (no extra forward): ``groups/<g>/<metric>`` at every logging step and
    ``eval_groups/<g>/<metric>`` in evaluation, for the metrics in ``fastalign.dynamics.GROUP_METRICS``
    (unweighted per-pair means; evaluation adds ``n_pairs``).
    """

    config_class = DPOConfig

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None, *, tokenizer=None, config=None):
        """TRL 1.16's signature (``args``, ``processing_class``, ``callbacks``, ``peft_config``); fastalign's
        ``tokenizer=`` and ``config=`` are accepted too."""
        config, tokenizer = trl_arguments(type(self).__name__, args, config, processing_class, tokenizer,
                                          {"data_collator": data_collator, "compute_metrics": compute_metrics,
                                           "optimizers": optimizers, "quantization_config": quantization_config})
        super().__init__(model, tokenizer, train_dataset, eval_dataset, config, ref_model, callbacks=callbacks,
                         peft_config=peft_config)

    def _prepare(self, data, name):
        """Tokenized examples whose "behaviour" field holds the row's group (config.group_column)."""
        col = self.config.group_column
        if col == "behaviour":
            return super()._prepare(data, name)
        rows = with_distinct_locations(load_rows(data))
        if col is not None and name == "train_dataset" and not any(col in r for r in rows):
            cols = sorted({k for r in rows for k in r})
            raise DataError(f"{name}: group_column {col!r} is in no row; the rows have columns: {', '.join(cols)}")
        examples = super()._prepare(rows, name)
        # by each example's own row: tokenization may drop rows, and then "index" no longer counts rows
        for e, i in zip(examples, row_positions(rows, examples)):
            g = rows[i].get(col) if col is not None else None
            e["behaviour"] = None if g is None or g == "" else str(g)
        return examples

    def _setup(self):
        cfg = self.config
        # every step's metrics carry the same group keys (zeros where a batch has none of a group), so that
        # averaging over micro-batches, steps and processes lines up
        self.group_names = sorted({str(e["behaviour"]) for e in self.train_examples if e.get("behaviour") is not None})
        self._batch_groups = None
        temperature, softcap = lm_head_config(self.model)
        common = dict(temperature=temperature, softcap=softcap, backend=cfg.backend, deterministic=cfg.deterministic,
                      grad_in_forward=self._grad_in_forward(), chunk_rows=cfg.loss_chunk_rows)
        if cfg.loss_type == "simpo":
            self.loss_module = FusedSimPOLoss(beta=cfg.beta, gamma=cfg.simpo_gamma,
                                              label_smoothing=cfg.label_smoothing, **common)
        elif cfg.loss_type == "orpo":
            self.loss_module = FusedORPOLoss(lam=cfg.beta, **common)
        else:
            self.loss_module = FusedDPOLoss(beta=cfg.beta, loss_type=cfg.loss_type,
                                            label_smoothing=cfg.label_smoothing, rpo_alpha=cfg.rpo_alpha, **common)
        self.ref_cache = None
        if cfg.uses_reference and self.ref_model is None and not cfg.precompute_ref_log_probs \
                and not _is_peft(self.model):
            self.ref_model = copy.deepcopy(_unwrap(self.model)).eval().requires_grad_(False)
        if cfg.clone_robust:  # pair weights w(chosen) * w(rejected) before any step (fastalign/clone_robust_train.py)
            from fastalign.clone_robust_train import apply_to_trainer
            apply_to_trainer(self)

    # reference log-probs ------------------------------------------------------------------------------
    @torch.no_grad()
    def _reference_logps(self, batch):
        ref = self.ref_model
        ctx = contextlib.nullcontext()
        if ref is None:
            # peft: the model itself with its adapters disabled; otherwise (precompute before training) the
            # policy as it is at the start, which is the reference
            ref = self.model
            if _is_peft(self.model):
                ctx = _strip_parallel(self.model).disable_adapter()
        with ctx, self._autocast():
            hidden, head = self._hidden(ref, batch)
            h, labels, seq = self._shifted(hidden, batch)
            logps, _ = self.loss_module.sequence_logps(h, head.weight, labels, getattr(head, "bias", None), seq,
                                                       batch.n_sequences if seq is not None else None)
        b = batch.n_sequences // 2
        return logps[:b].float(), logps[b:].float()

    def _fingerprint(self):
        h = hashlib.sha256()
        hash_model(h, self.ref_model if self.ref_model is not None else self.model)
        for examples in (self.train_examples, self.eval_examples or []):
            h.update(json.dumps([(e["chosen_ids"], e["chosen_labels"], e["rejected_ids"], e["rejected_labels"])
                                 for e in examples]).encode())
        h.update(f"{self.config.padding_free}{self.config.bf16}{self.loss_module.temperature}"
                 f"{self.loss_module.softcap}".encode())
        return h.hexdigest()[:20]

    def _checkpoint_extra(self):
        return {"ref_fingerprint": self.ref_fingerprint} if self.ref_cache is not None else {}

    def _check_resume_state(self, state, path):
        saved = state.get("ref_fingerprint")
        if self.ref_cache is not None and saved is not None and saved != self.ref_fingerprint:
            raise ValueError(f"cannot resume from {path}: its reference log-probs were computed from another model "
                             "or data (fingerprints differ). Pass the same initial model and datasets as the "
                             "original run: the checkpoint's weights are loaded on top of them.")

    def _before_training(self):
        cfg = self.config
        if not (cfg.uses_reference and cfg.precompute_ref_log_probs) or self.ref_cache is not None:
            return
        from safetensors.torch import load_file, save_file
        cache_dir = cfg.ref_cache_dir or os.path.join(cfg.output_dir, "ref_cache")
        self.ref_fingerprint = self._fingerprint()
        path = os.path.join(cache_dir, f"ref_logps-{self.ref_fingerprint}.safetensors")
        if os.path.isfile(path):
            self.ref_cache = {k: v.to(self.device) for k, v in load_file(path).items()}
            return
        cache = {}
        for name, examples in (("train", self.train_examples), ("eval", self.eval_examples)):
            if examples is None:
                continue
            c, r = [], []
            b = cfg.per_device_eval_batch_size
            for i in self._progress(range(0, len(examples), b), f"reference log-probs ({name})"):
                rc, rr = self._reference_logps(self._collate(examples[i:i + b]))
                c.append(rc)
                r.append(rr)
            cache[f"{name}/chosen"] = torch.cat(c).cpu()
            cache[f"{name}/rejected"] = torch.cat(r).cpu()
        if self.is_main:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = path + f".tmp-{os.getpid()}"
            save_file(cache, tmp)
            os.replace(tmp, path)
        self.ref_cache = {k: v.to(self.device) for k, v in cache.items()}

    def _extra(self, batch):
        if not self.config.uses_reference:
            return None
        if self.ref_cache is not None:
            split = "train" if self.model.training else "eval"
            idx = torch.tensor(batch.indices, device=self.device)
            return self.ref_cache[f"{split}/chosen"][idx], self.ref_cache[f"{split}/rejected"][idx]
        if self.config.precompute_ref_log_probs:
            self._before_training()
            return self._extra(batch)
        return self._reference_logps(batch)

    # the step --------------------------------------------------------------------------------------------
    def _loss(self, model, batch, extra):
        self._batch_groups = batch.behaviours  # for _metrics_of (kept here: DDP may rebuild the output object)
        hidden, head = self._hidden(model, batch)
        h, labels, seq = self._shifted(hidden, batch)
        kw = {}
        if extra is not None:
            kw = dict(ref_chosen_logps=extra[0], ref_rejected_logps=extra[1])
        return self.loss_module(h, head.weight, labels, bias=getattr(head, "bias", None), pair_weights=batch.weights,
                                sequence_index=seq, n_sequences=batch.n_sequences if seq is not None else None,
                                **kw)

    def _metrics_of(self, out):
        m = self._reward_metrics(out)
        m.update({"logps/chosen": out.chosen_logps.mean().item(), "logps/rejected": out.rejected_logps.mean().item()})
        if out.nll_loss is not None:
            m["nll_loss"] = out.nll_loss.item()
        groups = self._batch_groups
        if groups is not None and (self.group_names or any(g is not None for g in groups)):
            m.update(group_sums(out, groups, self.group_names))
        return m

    def evaluate(self, eval_dataset=None):
        """Mean metrics over the eval set, with per-group means (``groups/<g>/<metric>``, ``n_pairs``)."""
        result = super().evaluate(eval_dataset)  # raises when there is no eval data
        examples = self.eval_examples if eval_dataset is None else self._prepare(eval_dataset, "eval_dataset")
        return finalize_group_metrics(result, n_total=len(examples))

    def _log(self, metrics, writer=None):
        super()._log(finalize_group_metrics(metrics), writer)
