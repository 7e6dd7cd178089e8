"""Thin, fast trainers for Hugging Face models on the fused losses: DPO (and SimPO/ORPO/RPO), reward models,
SFT. The policy's logits are never computed: the trunk's hidden states go with the lm_head weight into
the fused op. One loop serves all three; each trainer states how a batch becomes a loss.
"""
import contextlib
import copy
import hashlib
import json
import math
import os
import time
import warnings

import torch
import torch.distributed as dist

from fastalign import checkpoint as ckpt
from fastalign.config import DPOConfig, RewardConfig, SFTConfig
from fastalign.data import (collate_preference, collate_sft, load_rows, tokenize_preference_rows, tokenize_sft_rows,
                            validate_rows)
from fastalign.integrations.hf import _unwrap, lm_head_config, trunk_and_head, trunk_of
from fastalign.losses import FusedDPOLoss, FusedORPOLoss, FusedSFTLoss, FusedSimPOLoss, weighted_bt_loss


def _strip_parallel(model):
    """The module inside DDP/FSDP wrappers, keeping a peft wrapper (unlike integrations.hf._unwrap)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _is_peft(model):
    model = _strip_parallel(model)
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def _flash_varlen_ready(model):
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:
        return False
    impl = getattr(getattr(_unwrap(model), "config", None), "_attn_implementation", None)
    return is_flash_attn_2_available() and impl == "flash_attention_2"


class _StepModule(torch.nn.Module):
    """What DDP wraps: model forward + loss inside one forward, so every parameter's use is seen by DDP."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch, extra):
        return self.loss_fn(self.model, batch, extra)


class _BaseTrainer:
    data_kind = "preference"
    config_class = None

    def __init__(self, model, tokenizer, train_dataset=None, eval_dataset=None, config=None, ref_model=None):
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        config.validate()
        if tokenizer is None:
            raise ValueError("a tokenizer is required")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.config, self.tokenizer, self.ref_model = config, tokenizer, ref_model
        self._setup_distributed()
        self.model = model.to(self.device)
        if config.gradient_checkpointing:
            inner = _unwrap(self.model)
            if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5
                inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            inner.config.use_cache = False
        if ref_model is not None:
            self.ref_model = ref_model.to(self.device).eval().requires_grad_(False)
        if train_dataset is None:
            raise ValueError("train_dataset is required (a path, a list of dicts or a datasets.Dataset)")
        self.train_examples = self._prepare(train_dataset, "train_dataset")
        self.eval_examples = self._prepare(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        global_batch = config.per_device_train_batch_size * self.world_size
        if len(self.train_examples) < global_batch:
            raise ValueError(f"train_dataset has {len(self.train_examples)} rows, fewer than one global batch "
                             f"({config.per_device_train_batch_size} x {self.world_size} processes)")
        self._warned_packing = False
        self._setup()  # loss module and reference, before any DDP/FSDP wrapping touches the model
        self.step_module = _StepModule(self.model, self._loss)
        self.wrapped = self._wrap(self.step_module)
        self.global_step = 0
        self.history = []

    # ---- setup --------------------------------------------------------------------------------------
    def _setup(self):
        pass

    def _setup_distributed(self):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        self.is_main = self.rank == 0

    def _wrap(self, module):
        if self.config.fsdp:
            if not self.distributed:
                warnings.warn("fsdp=True outside torchrun: running unsharded on one process", stacklevel=2)
                return module
            from torch.distributed.fsdp import fully_shard
            trunk, _ = trunk_and_head(self.model) if self.data_kind != "reward" else (None, None)
            layers = getattr(trunk, "layers", None) if trunk is not None else None
            for layer in layers or []:
                fully_shard(layer)
            fully_shard(module)
            return module
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel
            kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            return DistributedDataParallel(module, **kw)
        return module

    def _prepare(self, data, name):
        rows = load_rows(data)
        try:
            validate_rows(rows, "sft" if self.data_kind == "sft" else "preference")
        except ValueError as exc:
            raise type(exc)(f"{name}: {exc}") from None
        tok = tokenize_sft_rows if self.data_kind == "sft" else tokenize_preference_rows
        return tok(rows, self.tokenizer, self.config.max_length, self.config.max_prompt_length)

    # ---- batches -------------------------------------------------------------------------------------
    def _collate(self, examples):
        fn = collate_sft if self.data_kind == "sft" else collate_preference
        pf = self.config.padding_free
        varlen = pf and _flash_varlen_ready(self.model)
        if pf and not varlen and not self._warned_packing and self.is_main:
            warnings.warn("padding_free=True without flash-attn's varlen attention (install flash-attn and load "
                          "the model with attn_implementation='flash_attention_2'): packing with a block-diagonal "
                          "attention mask instead, exact but with O(T^2) mask memory", stacklevel=2)
            self._warned_packing = True
        batch = fn(examples, self.tokenizer.pad_token_id, padding_free=pf, use_4d_mask=pf and not varlen)
        if batch.attention_mask is not None and batch.attention_mask.dim() == 4:
            impl = getattr(_unwrap(self.model).config, "_attn_implementation", "sdpa")
            if impl == "eager":  # eager attention adds the mask: it must be additive, not boolean
                m = batch.attention_mask
                batch.attention_mask = torch.zeros(m.shape).masked_fill_(~m, torch.finfo(torch.float32).min)
        return batch.to(self.device)

    def _epoch_order(self, epoch, examples, batch_size):
        """Global batches of example indices for an epoch: a seeded permutation, so a resumed run sees the
        same order. Incomplete last global batches are dropped (every process needs a full share)."""
        g = torch.Generator().manual_seed(self.config.seed + epoch)
        perm = torch.randperm(len(examples), generator=g).tolist()
        gb = batch_size * self.world_size
        return [perm[i:i + gb] for i in range(0, len(perm) - gb + 1, gb)]

    def _local(self, global_batch):
        b = self.config.per_device_train_batch_size
        return global_batch[self.rank * b:(self.rank + 1) * b]

    # ---- the model ------------------------------------------------------------------------------------
    @staticmethod
    def _trunk_hidden(trunk, batch):
        kw = {"position_ids": batch.position_ids} if batch.position_ids is not None else {}
        return trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                     **kw).last_hidden_state

    def _hidden(self, model, batch):
        trunk, head = trunk_and_head(model)
        return self._trunk_hidden(trunk, batch), head

    def _shifted(self, hidden, batch):
        """hidden[:, t] predicts labels[:, t + 1]; packed rows shift the same way (each sequence's first
        label is -100 because it is a prompt token or because the shift crosses into it)."""
        labels = batch.labels[:, 1:]
        seq = batch.sequence_index[:, 1:] if batch.sequence_index is not None else None
        if seq is not None:  # a label of another sequence must not be predicted across the boundary
            same = batch.sequence_index[:, 1:] == batch.sequence_index[:, :-1]
            labels = torch.where(same, labels, torch.full_like(labels, -100))
        return hidden[:, :-1], labels, seq

    def _autocast(self):
        if self.config.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- the loop -------------------------------------------------------------------------------------
    def _extra(self, batch):
        """Per-batch inputs computed outside the differentiated step (reference log-probs)."""
        return None

    def _before_training(self):
        pass

    def _metrics_of(self, out):
        raise NotImplementedError

    def train(self, resume_from_checkpoint=None):
        """Train for max_steps (or num_train_epochs); returns the list of logged metric dicts."""
        cfg = self.config
        resume = resume_from_checkpoint or cfg.resume_from_checkpoint
        if resume == "latest":
            resume = ckpt.latest_checkpoint(cfg.output_dir)
            if resume is None:
                raise FileNotFoundError(f"resume_from_checkpoint='latest' but {cfg.output_dir} has no checkpoint")
        torch.manual_seed(cfg.seed)
        ga = cfg.gradient_accumulation_steps
        steps_per_epoch = len(self._epoch_order(0, self.train_examples, cfg.per_device_train_batch_size)) // ga
        if steps_per_epoch == 0:
            raise ValueError(f"one optimizer step needs {ga} global batches of "
                             f"{cfg.per_device_train_batch_size * self.world_size}; the data has too few rows")
        total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                           fused=self.device.type == "cuda")
        from transformers import get_scheduler
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=int(cfg.warmup_ratio * total), num_training_steps=total)
        self.global_step = 0
        # the reference comes from the model as given (before any checkpoint's weights are loaded into it)
        self._before_training()
        if resume:
            self._load_checkpoint(resume)
        writer = self._open_writers()
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=self.global_step, desc=f"{type(self).__name__}",
                   disable=not self.is_main or cfg.disable_tqdm, dynamic_ncols=True)
        self.model.train()
        window = []
        t0, tokens = time.perf_counter(), 0
        while self.global_step < total:
            epoch, within = divmod(self.global_step, steps_per_epoch)
            order = self._epoch_order(epoch, self.train_examples, cfg.per_device_train_batch_size)
            micro = order[within * ga:(within + 1) * ga]
            step_metrics = []
            for k, global_batch in enumerate(micro):
                batch = self._collate([self.train_examples[i] for i in self._local(global_batch)])
                tokens += int((batch.labels != -100).sum())
                extra = self._extra(batch)
                sync = contextlib.nullcontext() if (k == len(micro) - 1 or not hasattr(self.wrapped, "no_sync")) \
                    else self.wrapped.no_sync()
                with sync:
                    with self._autocast():
                        out = self.wrapped(batch, extra)
                    (out.loss / len(micro)).backward()
                step_metrics.append(self._metrics_of(out))
            grad_norm = None
            if cfg.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            m = self._reduce({k: sum(d[k] for d in step_metrics) / len(step_metrics) for k in step_metrics[0]})
            m.update(step=self.global_step, epoch=self.global_step / steps_per_epoch,
                     lr=self.scheduler.get_last_lr()[0])
            if grad_norm is not None:
                m["grad_norm"] = grad_norm
            window.append(m)
            bar.update(1)
            bar.set_postfix({k: f"{m[k]:.3f}" for k in ("loss", "rewards/accuracies") if k in m})
            if self.global_step % cfg.logging_steps == 0 or self.global_step == total:
                logged = {k: sum(w[k] for w in window) / len(window) for k in window[-1] if k not in ("step", "epoch")}
                logged.update(step=self.global_step, epoch=m["epoch"],
                              tokens_per_second=tokens * self.world_size / (time.perf_counter() - t0))
                self._log(logged, writer)
                window = []
            if cfg.eval_steps and self.eval_examples is not None and self.global_step % cfg.eval_steps == 0:
                self._log({f"eval/{k}": v for k, v in self.evaluate().items()} | {"step": self.global_step}, writer)
            if cfg.save_steps and self.global_step % cfg.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        if writer is not None:
            writer.close()
        return self.history

    def _progress(self, iterable, desc):
        from tqdm.auto import tqdm
        return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True,
                    disable=not self.is_main or self.config.disable_tqdm)

    def _reduce(self, metrics):
        if not self.distributed:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def _open_writers(self):
        if not self.is_main or "tensorboard" not in self.config.reports:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("report_to includes 'tensorboard' but tensorboard is not installed "
                          "(pip install tensorboard); logging to metrics.jsonl only", stacklevel=2)
            return None
        return SummaryWriter(os.path.join(self.config.output_dir, "tensorboard"))

    def _log(self, metrics, writer=None):
        self.history.append(metrics)
        if not self.is_main or "none" in self.config.reports:
            return
        os.makedirs(self.config.output_dir, exist_ok=True)
        with open(os.path.join(self.config.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if writer is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, metrics["step"])

    # ---- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_dataset=None):
        """Mean metrics over the eval set (every process evaluates all of it; no communication)."""
        examples = self._prepare(eval_dataset, "eval_dataset") if eval_dataset is not None else self.eval_examples
        if examples is None:
            raise ValueError("no eval_dataset was given")
        if eval_dataset is not None and getattr(self, "ref_cache", None) is not None:
            raise ValueError("with precompute_ref_log_probs the reference log-probs exist only for the eval_dataset "
                             "given at construction; evaluate() it, or build a trainer for the new data")
        was_training = self.model.training
        self.model.eval()
        sums, count, per_behaviour = {}, 0, {}
        b = self.config.per_device_eval_batch_size
        for i in self._progress(range(0, len(examples), b), "evaluate"):
            chunk = examples[i:i + b]
            batch = self._collate(chunk)
            with self._autocast():
                out = self.step_module(batch, self._extra(batch))
            for k, v in self._metrics_of(out).items():
                sums[k] = sums.get(k, 0.0) + v * len(chunk)
            count += len(chunk)
            for name, stats in self._per_example_stats(out, chunk):
                acc = per_behaviour.setdefault(name, {"n": 0})
                acc["n"] += 1
                for k, v in stats.items():
                    acc[k] = acc.get(k, 0.0) + v
        self.model.train(was_training)
        result = {k: v / count for k, v in sums.items()}
        for name, acc in sorted(per_behaviour.items()):
            for k, v in acc.items():
                if k != "n":
                    result[f"{k}/{name}"] = v / acc["n"]
        return result

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

    # ---- checkpoints ----------------------------------------------------------------------------------
    def _sharded(self):
        return self.config.fsdp and self.distributed

    def _full_states(self, with_optimizer=True):
        """Under FSDP2 the parameters are shards: gather full (CPU) model and optimizer states on every rank
        (a collective) so that the main process can write an ordinary checkpoint. None otherwise."""
        if not self._sharded():
            return None
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=opts)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=opts) if with_optimizer else None
        return model_sd, optim_sd

    def _checkpoint_payload(self, tmp, full=None):
        model_sd, optim_sd = full if full is not None else (None, self.optimizer.state_dict())
        _strip_parallel(self.model).save_pretrained(tmp, safe_serialization=True, state_dict=model_sd)
        self.tokenizer.save_pretrained(tmp)
        torch.save(optim_sd, os.path.join(tmp, "optimizer.pt"))
        torch.save(self.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        torch.save(ckpt.rng_state(), os.path.join(tmp, "rng_state.pt"))

    def save_checkpoint(self):
        """checkpoint-{step} under output_dir with model (safetensors), tokenizer, optimizer, scheduler, RNG
        states and step, written atomically. Returns its path (on the main process)."""
        if not hasattr(self, "optimizer"):
            raise RuntimeError("save_checkpoint() saves training state and needs train() to have started; "
                               "use save_model() to save the weights alone")
        path = None
        full = self._full_states()
        if self.is_main:
            state = {"global_step": self.global_step, "config": self.config.to_dict(),
                     "trainer": type(self).__name__, "world_size": self.world_size, **self._checkpoint_extra()}
            path = ckpt.save_checkpoint(self.config.output_dir, self.global_step,
                                        lambda tmp: self._checkpoint_payload(tmp, full), state)
            if self.config.save_total_limit:
                ckpt.prune_checkpoints(self.config.output_dir, self.config.save_total_limit)
        if self.distributed:
            dist.barrier()
        return path

    def _checkpoint_extra(self):
        return {}

    def _check_resume_state(self, state, path):
        pass

    def _load_checkpoint(self, path):
        state = ckpt.read_state(path)
        self._check_resume_state(state, path)
        optim_sd = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False)
        if self._sharded():
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.model, ckpt.read_model_weights(path), options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, optim_sd, options=opts)
        else:
            ckpt.load_model_weights(_strip_parallel(self.model), path)
            self.optimizer.load_state_dict(optim_sd)
        self.scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
        ckpt.set_rng_state(torch.load(os.path.join(path, "rng_state.pt"), weights_only=False))
        self.global_step = int(state["global_step"])

    def save_model(self, output_dir=None):
        """save_pretrained of the model (safetensors) and tokenizer, written atomically into output_dir."""
        out = output_dir or os.path.join(self.config.output_dir, "final")
        full = self._full_states(with_optimizer=False)
        if self.is_main:
            def write(tmp):
                _strip_parallel(self.model).save_pretrained(tmp, safe_serialization=True,
                                                            state_dict=None if full is None else full[0])
                self.tokenizer.save_pretrained(tmp)
            ckpt.write_dir_atomically(out, write)
        if self.distributed:
            dist.barrier()
        return out


class DPOTrainer(_BaseTrainer):
    """DPO family (sigmoid, robust, hinge, ipo; rpo_alpha), SimPO and ORPO on the fused losses.

    Reference: ``ref_model`` if given; else, for a peft model, the same model with adapters disabled; else
    a frozen copy of the model made at start; or, with precompute_ref_log_probs, one pass before training
    cached on disk (keyed by model and dataset fingerprints), so no reference model is held while training.
    """

    config_class = DPOConfig

    def __init__(self, model, ref_model=None, tokenizer=None, train_dataset=None, eval_dataset=None, config=None):
        super().__init__(model, tokenizer, train_dataset, eval_dataset, config, ref_model)

    def _setup(self):
        cfg = self.config
        temperature, softcap = lm_head_config(self.model)
        common = dict(temperature=temperature, softcap=softcap, backend=cfg.backend, deterministic=cfg.deterministic)
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
        model = _unwrap(self.ref_model if self.ref_model is not None else self.model)
        h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1).float()
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(flat[:64].cpu().numpy().tobytes())
            h.update(flat.sum().cpu().numpy().tobytes())
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
        return m


class _RewardOutput:
    """A reward model's scores are its rewards: the same field names as PreferenceLossOutput."""

    def __init__(self, loss, chosen, rejected):
        self.loss, self.chosen_rewards, self.rejected_rewards = loss, chosen, rejected
        self.reward_margins = (chosen - rejected).detach()
        self.reward_accuracies = (chosen > rejected).float().detach()


class RewardTrainer(_BaseTrainer):
    """Bradley-Terry reward model: score(chosen) vs score(rejected) through ``weighted_bt_loss``; a per-pair
    ``weight`` column turns the mean into the weighted MLE (Clone-Robust AI Alignment). The model is a
    sequence-classification model with one label (its ``score`` head reads the last token of each answer)."""

    config_class = RewardConfig
    data_kind = "reward"

    def __init__(self, model, tokenizer=None, train_dataset=None, eval_dataset=None, config=None):
        inner = _unwrap(model)
        if not isinstance(getattr(inner, "score", None), torch.nn.Module):
            raise TypeError(f"RewardTrainer needs a sequence-classification model with a `score` head and "
                            f"num_labels=1 (e.g. AutoModelForSequenceClassification), got {type(inner).__name__}")
        super().__init__(model, tokenizer, train_dataset, eval_dataset, config)

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
        loss = weighted_bt_loss(scores[:b], scores[b:], batch.weights)
        return _RewardOutput(loss, scores[:b], scores[b:])

    def _metrics_of(self, out):
        return self._reward_metrics(out)


class SFTTrainer(_BaseTrainer):
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
