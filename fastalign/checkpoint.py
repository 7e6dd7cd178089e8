"""Checkpoints written atomically: everything goes into a temporary folder beside the target, is flushed to
disk, and only then renamed into place. A checkpoint directory exists only once it is complete, so a save
interrupted mid-way leaves the previous checkpoints untouched and loadable."""
import json
import os
import random
import re
import shutil
import uuid

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_dir_atomically(final, write_fn):
    """Create folder ``final`` atomically: write_fn(tmp) fills a temporary sibling, which is flushed to disk and
    renamed into place. An existing ``final`` is swapped out only once the new one is complete."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        write_fn(tmp)
        _fsync_tree(tmp)
        if os.path.exists(final):
            old = os.path.join(parent, f".old-{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(output_dir, step, write_fn, state):
    """Write checkpoint-{step} atomically. write_fn(tmp_dir) writes the payload; ``state`` (a JSON-able dict)
    goes last into trainer_state.json, the marker of a complete checkpoint. Returns the final path."""
    def write(tmp):
        write_fn(tmp)
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)
    return write_dir_atomically(os.path.join(output_dir, f"checkpoint-{step}"), write)


def list_checkpoints(output_dir):
    """Complete checkpoints (with their state file), oldest first, as (step, path)."""
    if not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(output_dir):
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(output_dir, keep):
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def read_state(path):
    file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not a complete fastalign checkpoint (no {STATE_FILE})")
    with open(file) as f:
        return json.load(f)


def read_model_weights(path):
    """The full state dict that save_pretrained wrote (one file or an index of shards)."""
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"checkpoint {path} lacks {name}")
        state.update(load_file(file))
    return state


def load_model_weights(model, path):
    """Load the weights that save_pretrained wrote into ``model`` in place (plain or peft-wrapped)."""
    from safetensors.torch import load_file
    adapter = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(adapter):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(adapter))
        return
    state = read_model_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained drops tied duplicates (lm_head tied to the embeddings): those share a loaded tensor
    named = model.state_dict(keep_vars=True)
    loaded = {named[k].data_ptr() for k in state if k in named}
    missing = [k for k in missing if named[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
