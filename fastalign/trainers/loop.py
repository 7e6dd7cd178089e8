"""The training loop every trainer shares: setup, data, the step loop with accumulation (logging and evaluation:
logging_eval.py; checkpoints and resume: state.py). Each trainer (dpo.py, reward.py, sft.py) states how a batch
becomes a loss."""
import contextlib
import math
import os
import time
import warnings

import torch
import torch.distributed as dist

from fastalign.checkpoint import RunStateError
from fastalign.config import ConfigError
from fastalign.data import check_enough_rows, collate_preference, collate_sft, prepare_examples
from fastalign.integrations.hf import _unwrap, run_trunk, trunk_and_head
from fastalign.integrations.probe import check_trainer_model
from fastalign.trainers.models import StepModule as _StepModule
from fastalign.trainers.models import flash_varlen_ready as _flash_varlen_ready
from fastalign.trainers.models import disable_dropout as _disable_dropout
from fastalign.trainers.models import apply_peft_config as _apply_peft_config
from fastalign.trainers.models import fsdp2_fully_shard, model_from_folder
from fastalign.trainers.callbacks import CallbackHandler, TrainerControl, TrainerState
from fastalign.trainers.logging_eval import LoggingEvalMixin
from fastalign.trainers.reporting import mean_by_key, micro_step_metrics, reduce_across_ranks
from fastalign.trainers.state import CheckpointMixin


class TrainResult(list):
    """What train() returns: the logged rows (a list, as before), plus transformers' TrainOutput fields:
    ``global_step``, ``training_loss`` (the mean of the logged training losses) and ``metrics`` (the last
    training row)."""

    def __init__(self, rows, global_step):
        super().__init__(rows)
        self.global_step = global_step
        losses = [r["loss"] for r in rows if "loss" in r]
        self.training_loss = sum(losses) / len(losses) if losses else float("nan")
        self.metrics = next((dict(r) for r in reversed(rows) if "loss" in r), {})


def _check_output_dir_writable(output_dir):
    """RunStateError unless output_dir is, or can become, a writable folder: its nearest existing ancestor must be
    a writable folder (nothing is created here)."""
    path = os.path.abspath(output_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise RunStateError(f"output_dir {output_dir}: {path} is a file, so the folder cannot be created there")
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunStateError(f"output_dir {output_dir}: {path} is not writable by this user")


def _input_tokens(batch):
    """The batch's input tokens, padding left out (what TRL's num_tokens counts)."""
    if batch.sequence_index is not None:  # packed rows: -1 marks padding
        return int((batch.sequence_index >= 0).sum())
    if batch.attention_mask is not None and batch.attention_mask.dim() == 2:
        return int(batch.attention_mask.sum())
    return batch.input_ids.numel()


def trl_arguments(owner, args, config, processing_class, tokenizer, unsupported):
    """(config, tokenizer) from TRL's names (``args``, ``processing_class``) or fastalign's (``config``,
    ``tokenizer``); giving both names of one thing is an error, and so is any TRL option fastalign lacks."""
    if args is not None and config is not None:
        raise TypeError(f"{owner}: pass the config once, as args= (TRL) or config=, not both")
    if processing_class is not None and tokenizer is not None:
        raise TypeError(f"{owner}: pass the tokenizer once, as processing_class= (TRL) or tokenizer=, not both")
    given = [name for name, value in unsupported.items() if value is not None and value != (None, None)]
    if given:
        raise NotImplementedError(f"{owner}: {', '.join(given)} is not supported by fastalign (the loop builds its "
                                  "own batches, AdamW optimizer and metrics); leave it unset")
    return (args if args is not None else config), (processing_class if processing_class is not None else tokenizer)


class BaseTrainer(CheckpointMixin, LoggingEvalMixin):
    data_kind = "preference"
    config_class = None

    def __init__(self, model, tokenizer, train_dataset=None, eval_dataset=None, config=None, ref_model=None, *,
                 callbacks=None, peft_config=None):
        name = type(self).__name__
        kind = "rm" if self.data_kind == "reward" else "causal-lm"
        if isinstance(model, (str, os.PathLike)):  # TRL takes a model by name: here a local folder
            model, folder_tokenizer = model_from_folder(name, model, kind)
            tokenizer = tokenizer if tokenizer is not None else folder_tokenizer
        if isinstance(ref_model, (str, os.PathLike)):
            ref_model, _ = model_from_folder(name, ref_model, kind, what="ref_model")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{name}: model must be a transformers model (a torch.nn.Module) or a local folder written "
                            f"by save_pretrained, got {type(model).__name__}")
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        config.validate()
        _check_output_dir_writable(config.output_dir)  # before the data and the model check, not at train()
        if tokenizer is None:
            raise ValueError("a tokenizer is required (processing_class=tokenizer, or tokenizer=)")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.config, self.tokenizer, self.ref_model = config, tokenizer, ref_model
        self.callback_handler = CallbackHandler(callbacks)
        self.state, self.control = TrainerState(), TrainerControl()
        self._setup_distributed()
        if config.fp16 and self.device.type != "cuda":
            raise ConfigError("fp16=True needs a CUDA device (float16 autocast with a gradient scaler); "
                              "on CPU use bf16=True, or neither")
        model = _apply_peft_config(model, peft_config)
        if config.disable_dropout:
            _disable_dropout(model)
            if ref_model is not None:
                _disable_dropout(ref_model)
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
        check_enough_rows(len(self.train_examples), config.per_device_train_batch_size, self.world_size,
                          config.gradient_accumulation_steps)
        self._warned_packing = False
        self._setup()  # loss module and reference, before any DDP/FSDP wrapping touches the model
        self.model_check = check_trainer_model(self)  # fused path vs the model's own logits, or a clear refusal
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
            if local >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK={local} but {torch.cuda.device_count()} CUDA device(s) are visible: "
                                   f"start at most one process per GPU (torchrun --nproc_per_node), or hide CUDA "
                                   f"(CUDA_VISIBLE_DEVICES=) to train on CPU with gloo")
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
            fully_shard = fsdp2_fully_shard(self.device)
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
        return prepare_examples(data, "sft" if self.data_kind == "sft" else "preference", self.tokenizer,
                                self.config, name)

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

    def _grad_in_forward(self):
        """Whether the loss computes its gradient in forward (fastalign.fused_grad): config on/off, auto = CPU,
        where it was measured (bench/bench_linear_logprobs.py); on CUDA the triton op path is the default."""
        choice = self.config.grad_in_forward
        return choice == "on" or (choice == "auto" and self.device.type == "cpu")

    # ---- the model ------------------------------------------------------------------------------------
    @staticmethod
    def _trunk_hidden(trunk, batch):
        kw = {"position_ids": batch.position_ids} if batch.position_ids is not None else {}
        return run_trunk(trunk, input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kw).last_hidden_state

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
        if self.config.bf16 or self.config.fp16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.config.bf16 else torch.float16)
        return contextlib.nullcontext()

    def add_callback(self, callback):
        """Add a callback (an instance or a class), as transformers' Trainer.add_callback."""
        self.callback_handler.add_callback(callback)

    def _event(self, event, **kwargs):
        self.control = self.callback_handler.call(event, self.config, self.state, self.control, **kwargs)

    # ---- the loop -------------------------------------------------------------------------------------
    def _extra(self, batch):
        """Per-batch inputs computed outside the differentiated step (reference log-probs)."""
        return None

    def _before_training(self):
        pass

    def _metrics_of(self, out):
        raise NotImplementedError

    def train(self, resume_from_checkpoint=None):
        """Train for max_steps (or num_train_epochs); returns the trainer's logged metric dicts as a ``TrainResult``
        (a list, with transformers' ``global_step``, ``training_loss`` and ``metrics`` too).
        resume_from_checkpoint: a checkpoint folder, or "latest" (or True, as in transformers) for output_dir's
        newest."""
        with self._run(resume_from_checkpoint) as resume:  # the output folder's lock and checks (state.py)
            return TrainResult(self._train(resume), self.global_step)

    @property
    def args(self):
        """The config, under transformers' and TRL's name."""
        return self.config

    @property
    def processing_class(self):
        """The tokenizer, under TRL's name."""
        return self.tokenizer

    def _train(self, resume):
        cfg = self.config
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
                                       num_warmup_steps=cfg.warmup_steps_for(total), num_training_steps=total)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.fp16 else None
        self.global_step = 0
        # the reference comes from the model as given (before any checkpoint's weights are loaded into it)
        self._before_training()
        if resume:
            self._load_checkpoint(resume)
            if self.global_step >= total and self.is_main:
                warnings.warn(f"resumed at step {self.global_step}, which already reaches this run's {total} steps: "
                              "nothing left to train (raise max_steps or num_train_epochs to train further)",
                              stacklevel=3)
        writer = self._writer = self._open_writers()
        self.state.max_steps, self.state.num_train_epochs = total, total / steps_per_epoch
        self.state.global_step, self.state.epoch = self.global_step, self.global_step / steps_per_epoch
        self.state.is_world_process_zero = self.state.is_local_process_zero = self.is_main
        self.control.should_training_stop = False
        self._event("on_train_begin")
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=self.global_step, desc=f"{type(self).__name__}",
                   disable=not self.is_main or cfg.disable_tqdm, dynamic_ncols=True)
        self.model.train()
        window = self._log_window  # persisted in checkpoints: a resumed run logs what an uninterrupted one does
        t0, tokens = time.perf_counter(), 0
        self._num_tokens = self._num_tokens or 0  # input tokens of every process since the run began (TRL's key)
        while self.global_step < total and not self.control.should_training_stop:
            epoch, within = divmod(self.global_step, steps_per_epoch)
            order = self._epoch_order(epoch, self.train_examples, cfg.per_device_train_batch_size)
            micro = order[within * ga:(within + 1) * ga]
            step_metrics, step_inputs = [], 0
            for k, global_batch in enumerate(micro):
                batch = self._collate([self.train_examples[i] for i in self._local(global_batch)])
                tokens += int((batch.labels != -100).sum())
                step_inputs += _input_tokens(batch)
                extra = self._extra(batch)
                sync = contextlib.nullcontext() if (k == len(micro) - 1 or not hasattr(self.wrapped, "no_sync")) \
                    else self.wrapped.no_sync()
                with sync:
                    with self._autocast():
                        out = self.wrapped(batch, extra)
                    loss = out.loss / len(micro)
                    (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                step_metrics.append(self._metrics_of(out))
            grad_norm = None
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if cfg.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            means, counts = micro_step_metrics(step_metrics)
            means["_input_tokens"], counts["_input_tokens"] = step_inputs, 1  # in the same collective
            m = reduce_across_ranks(means, counts)
            # every process has the key once: the mean over processes times their number is the sum
            self._num_tokens += round(m.pop("_input_tokens") * self.world_size)
            m.update(step=self.global_step, epoch=self.global_step / steps_per_epoch,
                     learning_rate=self.scheduler.get_last_lr()[0])
            if grad_norm is not None:
                m["grad_norm"] = grad_norm
            window.append(m)
            self.state.global_step, self.state.epoch = self.global_step, m["epoch"]
            bar.update(1)
            bar.set_postfix({k: f"{m[k]:.3f}" for k in ("loss", "rewards/accuracies") if k in m})
            self._event("on_step_end")
            if self.global_step % cfg.logging_steps == 0 or self.global_step == total or self.control.should_log:
                logged = mean_by_key([{k: v for k, v in w.items() if k not in ("step", "epoch")} for w in window])
                logged.update(step=self.global_step, epoch=m["epoch"], num_tokens=self._num_tokens,
                              tokens_per_second=tokens * self.world_size / (time.perf_counter() - t0))
                self._emit_log(logged)
                window.clear()  # in place: the window object is the one saved in checkpoints
            if self.eval_examples is not None and (self._eval_due(steps_per_epoch) or self.control.should_evaluate):
                self.evaluate()
            if self._save_due(steps_per_epoch, total) or self.control.should_save:
                self.save_checkpoint()
                self._event("on_save")
            self.control._new_step()
        bar.close()
        self._event("on_train_end")
        if writer is not None:
            writer.close()
        self._writer = None
        return self.history
