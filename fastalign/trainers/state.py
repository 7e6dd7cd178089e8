"""Checkpoints of a training run: save (atomically, gathering FSDP shards first), resume, save the model."""
import os

import torch
import torch.distributed as dist

from fastalign import checkpoint as ckpt
from fastalign.trainers.models import strip_parallel as _strip_parallel


class CheckpointMixin:
    """Saving and loading a run's state; mixed into the trainer base class (needs model, optimizer, scheduler,
    tokenizer, config, global_step and the distributed attributes)."""

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
