"""Checkpoints of a training run: the output folder's lock and checks at the start of a run, saves (crash-safe,
gathering FSDP shards first), resume that checks its configuration and data, and saving the model."""
import contextlib
import hashlib
import json
import os
import warnings

import torch
import torch.distributed as dist

from fastalign import checkpoint as ckpt
from fastalign.checkpoint import RunStateError
from fastalign.trainers import runlog
from fastalign.trainers.models import strip_parallel as _strip_parallel

# Options that do not change what is trained (transformers' and TRL's names, those fastalign has and those it
# may get): a resumed run may change them freely. Every other option must match the checkpoint's.
FREE_TO_CHANGE = frozenset((
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "allow_config_change", "logging_dir",
    "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter", "save_strategy",
    "save_steps", "save_total_limit", "save_only_model", "eval_strategy", "evaluation_strategy", "eval_steps",
    "eval_delay", "eval_on_start", "per_device_eval_batch_size", "eval_accumulation_steps", "report_to",
    "run_name", "disable_tqdm", "check_model", "backend", "grad_in_forward", "loss_chunk_rows", "deterministic", "gradient_checkpointing", "padding_free",
    "precompute_ref_log_probs", "ref_cache_dir",
    "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "early_stopping_patience",
    "early_stopping_threshold", "push_to_hub", "hub_model_id", "dataloader_num_workers", "log_level"))
# files and folders a run writes into its output folder (a fresh run refuses to start among another's)
_RUN_OUTPUTS = ("final", "tensorboard")


def _run_id_of(checkpoint, unreadable):
    """The run id a checkpoint records, or ``unreadable`` where its state file is damaged: an earlier checkpoint
    that can no longer be read is not taken for another run's (resuming from a later one does not need it)."""
    try:
        return ckpt.read_state(checkpoint).get("run_id")
    except ckpt.DamagedCheckpointError:
        return unreadable


class ResumeMismatchError(RunStateError):
    """Resuming would continue a different run (changed options or data); the message lists each difference."""


def _first_line(items, limit=6):
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


class CheckpointMixin:
    """Saving and loading a run's state; mixed into the trainer base class (needs model, optimizer, scheduler,
    tokenizer, config, global_step and the distributed attributes)."""

    _lock = None
    _runlog = None
    _run_id = None
    _resumed_from = None
    _log_window = None
    _num_tokens = None
    _own_output_paths = None  # what save_model() wrote, as real paths: not another run's when train() starts

    # ---- the life of a run: lock, checks, metrics segment --------------------------------------------------
    @contextlib.contextmanager
    def _run(self, resume_from_checkpoint=None):
        """Hold the output folder for one train() call; yields the checkpoint to resume from (or None)."""
        resume = self._begin_run(resume_from_checkpoint)
        try:
            yield resume
        finally:
            self._end_run()

    def _begin_run(self, resume_from_checkpoint):
        cfg = self.config
        resume = resume_from_checkpoint or cfg.resume_from_checkpoint
        if resume is True:  # transformers' and TRL's spelling of "the latest checkpoint of output_dir"
            resume = "latest"
        elif resume is not None and resume is not False and not isinstance(resume, (str, os.PathLike)):
            raise TypeError(f"resume_from_checkpoint must be a checkpoint folder, 'latest' or True, got "
                            f"{type(resume).__name__} {resume!r}")
        resume = os.fspath(resume) if resume else None
        error = None
        self._log_window, self._resumed_from, self._num_tokens = [], None, 0
        if self.is_main:
            try:
                resume = self._claim_output_dir(resume)
            except BaseException as exc:  # noqa: BLE001 -- re-raised below, after the other ranks are told
                error = exc
                self._end_run()
        if self.distributed:  # every rank resumes from the same checkpoint, or every rank stops
            shared = [resume, None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(shared, src=0)
            if error is None and shared[1] is not None:
                raise RunStateError(f"rank 0 could not start the run: {shared[1]}")
            resume = shared[0]
        if error is not None:
            raise error
        return resume

    def _claim_output_dir(self, resume):
        cfg = self.config
        out = cfg.output_dir
        self._lock = runlog.OutputDirLock(out).acquire()
        for line in ckpt.recover_output_dir(out) + runlog.repair_metrics(out):
            warnings.warn(f"{out}: {line}", stacklevel=6)  # points at the caller of train()
        if resume == "latest":
            resume = ckpt.latest_checkpoint(out)
            if resume is None:
                raise FileNotFoundError(f"resume_from_checkpoint='latest' but {out} has no checkpoint")
        state = ckpt.read_state(resume) if resume else None
        self._clear_other_runs(state, resume)
        self._run_id = (state or {}).get("run_id") or self._run_id or runlog.new_run_id()
        self._lock.note_run(self._run_id)
        self._resumed_from = resume
        self._runlog = runlog.RunLog(out, self._run_id)
        return resume

    def _clear_other_runs(self, state, resume):
        """A fresh run needs a folder without another run's checkpoints and metrics; a resumed run one without
        checkpoints of another run or later than its own (those of an abandoned continuation). With
        overwrite_output_dir they are deleted; otherwise refused (transformers' rule)."""
        cfg = self.config
        out = cfg.output_dir
        same = (lambda p: os.path.realpath(p) == os.path.realpath(resume)) if resume else (lambda p: False)
        others = []
        for step, path in ckpt.list_checkpoints(out):
            if same(path):
                continue
            if state is None or step > int(state["global_step"]) or \
                    _run_id_of(path, state.get("run_id")) != state.get("run_id"):
                others.append(path)
        if state is None:
            others += self._other_runs_files(out)
        if not others:
            return
        names = [os.path.basename(p) for p in others]
        later = [os.path.basename(p) for p in others if state is not None and
                 _run_id_of(p, None) == state.get("run_id")]
        if not cfg.overwrite_output_dir and later and len(later) == len(others):
            raise RunStateError(
                f"output_dir {out} holds later checkpoints of this same run ({_first_line(later)}) than {resume}: "
                "resuming from it would abandon them. Resume from the latest (resume_from_checkpoint='latest', CLI "
                "--resume), or pass overwrite_output_dir=True (CLI --overwrite-output-dir) to delete them and go on "
                f"from {os.path.basename(resume)}")
        if not cfg.overwrite_output_dir:
            what = ("a fresh run" if state is None else f"a run resumed from {resume}")
            raise RunStateError(
                f"output_dir {out} holds the output of another run ({_first_line(names)}); {what} would mix "
                "with it. Resume that run (resume_from_checkpoint='latest', CLI --resume), start over there "
                "(overwrite_output_dir=True, CLI --overwrite-output-dir: deletes them), or pass another output_dir")
        for path in others:
            ckpt.remove_dir(path) if os.path.isdir(path) else os.remove(path)
        warnings.warn(f"overwrite_output_dir: deleted {_first_line(names)} from {out}", stacklevel=7)

    def _end_run(self):
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _other_runs_files(self, out):
        """out's metrics files and run outputs (final/, tensorboard/) that are not this trainer's own: its
        evaluate() rows and save_model() output before train() are (run id, remembered paths)."""
        metrics = [p for _, p in runlog.metrics_files(out)
                   if self._run_id is None or runlog.metrics_run_id(p) != self._run_id]
        outputs = [os.path.join(out, n) for n in _RUN_OUTPUTS if os.path.exists(os.path.join(out, n))]
        return metrics + [p for p in outputs if os.path.realpath(p) not in (self._own_output_paths or ())]

    def _write_metrics_row(self, metrics):
        """One row of the current segment's metrics file. Outside train() (evaluate() before or after it) the row
        is written holding the folder's lock, so never into a folder another process is training in; and a trainer
        that has not yet written there opens its segment only in a folder without another run's output."""
        if self._lock is not None:
            self._runlog.write(metrics)
            return
        out = self.config.output_dir
        with runlog.OutputDirLock(out):
            if self._runlog is None:
                others = self._other_runs_files(out) + [p for _, p in ckpt.list_checkpoints(out)]
                if others and not self.config.overwrite_output_dir:  # with it, train() clears them (not ours)
                    raise RunStateError(
                        f"output_dir {out} holds the output of another run "
                        f"({_first_line([os.path.basename(p) for p in others])}): this trainer's metrics would mix "
                        "with its history. Pass another output_dir to evaluate into, report_to='none' to write "
                        "no metrics file (evaluate() still returns the metrics), or overwrite_output_dir=True when "
                        "this trainer's train() is to start over there")
                self._run_id = self._run_id or runlog.new_run_id()
                self._runlog = runlog.RunLog(out, self._run_id)
            self._runlog.write(metrics)

    @property
    def metrics_path(self):
        """The metrics file this run writes (the current segment's)."""
        return self._runlog.path if self._runlog is not None else os.path.join(self.config.output_dir,
                                                                               "metrics.jsonl")

    # ---- saving ----------------------------------------------------------------------------------------
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
        with _transformers_bars(not self.config.disable_tqdm):
            _strip_parallel(self.model).save_pretrained(tmp, safe_serialization=True, state_dict=model_sd)
        self.tokenizer.save_pretrained(tmp)
        ckpt.save_torch(optim_sd, os.path.join(tmp, "optimizer.pt"))
        ckpt.save_torch(self.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        ckpt.save_torch(ckpt.rng_state(), os.path.join(tmp, "rng_state.pt"))
        if getattr(self, "scaler", None) is not None:  # fp16: the loss scale it has learned (transformers' name)
            ckpt.save_torch(self.scaler.state_dict(), os.path.join(tmp, "scaler.pt"))

    def _checkpoint_bytes(self):
        """About how many bytes a checkpoint takes: weights plus optimizer state (for a full-disk message)."""
        tensors = list(_strip_parallel(self.model).state_dict().values())
        tensors += [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def data_fingerprint(self):
        """sha256 (first 20 hex digits) of the tokenized training examples: a resumed run must train on the
        same data, in the same order."""
        if getattr(self, "_data_fingerprint", None) is None:
            h = hashlib.sha256()
            for e in self.train_examples:
                h.update(json.dumps(e, sort_keys=True, default=str).encode())
            self._data_fingerprint = h.hexdigest()[:20]
        return self._data_fingerprint

    def save_checkpoint(self):
        """checkpoint-{step} under output_dir with model (safetensors), tokenizer, optimizer, scheduler, RNG
        states (loadable with weights_only=True), the fp16 gradient scaler's state, the resolved config, the data
        fingerprint, the run id and the logging window, written crash-safely. Returns its path (on the main
        process)."""
        if not hasattr(self, "optimizer"):
            raise RuntimeError("save_checkpoint() saves training state and needs train() to have started; "
                               "use save_model() to save the weights alone")
        path = None
        full = self._full_states()
        if self.is_main:
            state = {"global_step": self.global_step, "config": self.config.to_json_dict(),
                     "trainer": type(self).__name__, "world_size": self.world_size,
                     "run_id": self._run_id, "data_fingerprint": self.data_fingerprint(),
                     "train_rows": len(self.train_examples), "log_window": list(self._log_window or []),
                     "num_tokens": int(self._num_tokens or 0),
                     **self._checkpoint_extra()}
            path = ckpt.save_checkpoint(self.config.output_dir, self.global_step,
                                        lambda tmp: self._checkpoint_payload(tmp, full), state,
                                        size_hint=self._checkpoint_bytes())
            if self.config.save_total_limit:
                ckpt.prune_checkpoints(self.config.output_dir, self.config.save_total_limit)
        if self.distributed:
            dist.barrier()
        return path

    def _save_due(self, steps_per_epoch, total_steps):
        """Save as save_strategy says (transformers' rule): every save_steps steps ("steps"), at the end of each
        epoch ("epoch"), and in both cases at the last step, so a run always leaves its final state."""
        cfg, step = self.config, self.global_step
        strategy = getattr(cfg, "save_strategy", "steps")
        if strategy == "no":
            return False
        return bool(step == total_steps or (strategy == "steps" and cfg.save_steps and step % cfg.save_steps == 0)
                    or (strategy == "epoch" and step % steps_per_epoch == 0))

    def _checkpoint_extra(self):
        return {}

    # ---- resuming --------------------------------------------------------------------------------------
    def _check_resume_state(self, state, path):
        pass

    def _check_resumed_run(self, state, path):
        """Refuse to continue a different run: every option that changes the trajectory, the trainer, the number
        of processes and the training data must match the checkpoint's (unless allow_config_change)."""
        cfg = self.config
        saved = state.get("config") or {}
        now = cfg.to_json_dict()
        schedule_fixed = saved.get("lr_scheduler_type") == now.get("lr_scheduler_type") == "constant"
        diffs = []
        for name in sorted(set(saved) & set(now)):
            if name in FREE_TO_CHANGE or saved[name] == now[name]:
                continue
            if name in ("max_steps", "num_train_epochs") and schedule_fixed:
                continue  # a longer run with a constant learning rate follows the same trajectory
            diffs.append(f"{name}: saved {saved[name]!r}, now {now[name]!r}")
        if state.get("trainer", type(self).__name__) != type(self).__name__:
            diffs.append(f"trainer: saved {state['trainer']}, now {type(self).__name__}")
        if int(state.get("world_size", self.world_size)) != self.world_size:
            diffs.append(f"number of processes: saved {state['world_size']}, now {self.world_size} (the global "
                         "batch and the data order depend on it)")
        if state.get("data_fingerprint") not in (None, self.data_fingerprint()):
            diffs.append(f"training data: saved {state.get('train_rows', '?')} rows with fingerprint "
                         f"{state['data_fingerprint']}, now {len(self.train_examples)} rows with fingerprint "
                         f"{self.data_fingerprint()} (another file, other rows, order or tokenization)")
        if not diffs:
            return
        listing = "\n  ".join(diffs)
        if not getattr(cfg, "allow_config_change", False):
            raise ResumeMismatchError(
                f"cannot resume from {path}: this run differs from the one that wrote it in what decides the "
                f"training trajectory:\n  {listing}\nResume with the saved values, or pass "
                "allow_config_change=True (CLI --allow-config-change) to continue with the new ones")
        warnings.warn(f"resuming from {path} with a changed configuration (allow_config_change=True):\n  {listing}",
                      stacklevel=5)

    def _load_checkpoint(self, path):
        state = ckpt.read_state(path)
        self._check_resume_state(state, path)
        self._check_resumed_run(state, path)
        optim_sd = ckpt.load_torch(os.path.join(path, "optimizer.pt"))
        scheduler_sd = ckpt.load_torch(os.path.join(path, "scheduler.pt"))
        rng = ckpt.load_torch(os.path.join(path, "rng_state.pt"))
        if self._sharded():
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.model, ckpt.read_model_weights(path), options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, optim_sd, options=opts)
        else:
            ckpt.load_model_weights(_strip_parallel(self.model), path)
            self.optimizer.load_state_dict(optim_sd)
        self.scheduler.load_state_dict(scheduler_sd)
        self._apply_configured_schedule()
        ckpt.set_rng_state(rng)
        scaler_path = os.path.join(path, "scaler.pt")
        if getattr(self, "scaler", None) is not None and os.path.exists(scaler_path):
            # without it a resumed fp16 run starts again from a scale of 65536 and skips steps until it backs off
            self.scaler.load_state_dict(ckpt.load_torch(scaler_path))
        self.global_step = int(state["global_step"])
        self._log_window = list(state.get("log_window") or [])
        self._num_tokens = int(state.get("num_tokens") or 0)
        self._run_id = state.get("run_id") or self._run_id

    def _apply_configured_schedule(self):
        """The loaded optimizer and scheduler states carry the learning rate and weight decay of the run that wrote
        them; this run's config decides them. They differ only under allow_config_change, and then the new values
        apply from the first resumed step: the base learning rate times the schedule's factor at the resumed step (the
        schedule's shape, warmup and length are this config's already: the scheduler was built from it and its
        factors are not part of its saved state). Unchanged, this recomputes the very values that were loaded."""
        cfg, groups = self.config, self.optimizer.param_groups
        self.scheduler.base_lrs = [cfg.learning_rate] * len(groups)
        for group, factor in zip(groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = cfg.learning_rate
            group["weight_decay"] = cfg.weight_decay
            group["lr"] = cfg.learning_rate * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in groups]

    def save_model(self, output_dir=None):
        """save_pretrained of the model (safetensors) and tokenizer, written atomically into output_dir."""
        out = output_dir or os.path.join(self.config.output_dir, "final")
        full = self._full_states(with_optimizer=False)
        if self.is_main:
            def write(tmp):
                with _transformers_bars(not self.config.disable_tqdm):
                    _strip_parallel(self.model).save_pretrained(tmp, safe_serialization=True,
                                                                state_dict=None if full is None else full[0])
                self.tokenizer.save_pretrained(tmp)
            inside = os.path.realpath(out).startswith(os.path.realpath(self.config.output_dir) + os.sep)
            hold = runlog.OutputDirLock(self.config.output_dir) if inside and self._lock is None \
                else contextlib.nullcontext()
            with hold:
                ckpt.write_dir_atomically(out, write)
            self._own_output_paths = (self._own_output_paths or set()) | {os.path.realpath(out)}
        if self.distributed:
            dist.barrier()
        return out


@contextlib.contextmanager
def _transformers_bars(enabled):
    """transformers' own progress bars (save_pretrained's "Writing model shards") follow ``disable_tqdm`` too:
    switched off for the block when disabled, then restored."""
    from transformers.utils import logging as hf_logging
    off = not enabled and hf_logging.is_progress_bar_enabled()
    if off:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if off:
            hf_logging.enable_progress_bar()
