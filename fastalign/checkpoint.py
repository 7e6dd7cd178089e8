"""Checkpoints written crash-safely and loaded safely.

Saving: everything goes into a temporary folder beside the target, is flushed to disk (files and folders
fsynced), and only then renamed into place. Replacing an existing folder sets the old one aside as
``.old-<name>-*`` first and removes it only once the new one is in place and the rename is flushed;
``recover_output_dir`` (run at the start of every run, under the output-folder lock) puts a set-aside folder
back if a kill came between the two renames and deletes leftover temporary folders. A checkpoint is complete
once its ``trainer_state.json`` exists, so an interrupted save never costs the previous checkpoint.

Loading: the optimizer, scheduler and RNG states are tensors and plain containers (RNG states of Python and
numpy are converted to lists and tensors) and load with ``torch.load(weights_only=True)``; anything else is
refused (``UnsafeCheckpointError``) instead of being unpickled, which could run code. Weights are safetensors,
the trainer state JSON."""
import errno
import json
import math
import os
import pickle
import random
import re
import shutil
import uuid

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
_LEFTOVER = re.compile(r"^\.(tmp|old|del)-(.+)-[0-9a-f]{8}$")

# Called as SAVE_STEP_HOOK(step, path) between the steps of a save and of a prune (tests inject a kill here):
# "payload-written", "fsynced", "old-set-aside", "new-in-place", "old-removed", "prune-set-aside", "pruned".
SAVE_STEP_HOOK = None


class RunStateError(RuntimeError):
    """A run cannot start, resume or save safely; the message says why and what to do."""


class NoSpaceLeftError(RunStateError):
    """The disk filled up during a save; the previous checkpoint is kept."""


class UnsafeCheckpointError(RunStateError):
    """A checkpoint file holds something other than tensors and plain containers (refused, never unpickled)."""


class DamagedCheckpointError(RunStateError):
    """A checkpoint file cannot be read: empty, truncated or not what its name says (a disk fault, a copy cut short)."""


def _damaged(file, exc):
    """The DamagedCheckpointError for ``file``, naming the checkpoint folder to skip."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # the unpickler's garbage message starts with advice about weights_only: its "Unsupported ..." line says more
    detail = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")[:200]
    folder = os.path.dirname(os.path.abspath(file))
    return DamagedCheckpointError(
        f"{file} is damaged or truncated ({type(exc).__name__}{': ' + detail if detail else ''}); the checkpoint "
        f"{folder} cannot be loaded. Resume from an earlier checkpoint (pass its folder), or move this one away and "
        "resume from the latest that remains")


def _reached(step, path):
    if SAVE_STEP_HOOK is not None:
        SAVE_STEP_HOOK(step, path)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _tree_bytes(path):
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, files in os.walk(path) for n in files)


# ---- states as tensors and plain containers (torch.load(weights_only=True)) -----------------------------------
def rng_state():
    """RNG states of python, numpy, torch (and CUDA) as tensors, lists and numbers only."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_torch(obj, path):
    """torch.save of tensors and plain containers. A full disk (which torch reports as a RuntimeError such as
    'basic_ios::clear') becomes OSError(ENOSPC) naming the file."""
    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        if _disk_free(os.path.dirname(path)) < (1 << 20):
            raise OSError(errno.ENOSPC, "No space left on device", path) from exc
        raise


def load_torch(path):
    """torch.load with weights_only=True: tensors and plain containers only; anything else is refused."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- sorted below: refused content, or a file that cannot be read
        # refused content names the GLOBAL (a class or function) it would have to import; anything else is a file
        # that cannot be read: empty (EOFError), a truncated archive (RuntimeError), garbage ("Unsupported operand")
        if not (isinstance(exc, pickle.UnpicklingError) and "global" in str(exc).lower()):
            raise _damaged(path, exc) from None
        raise UnsafeCheckpointError(
            f"{path} holds objects other than tensors and plain containers ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); refusing to load it, since unpickling it could run code. "
            "fastalign writes these files with plain data only; a file like this was written by other code "
            "(or by fastalign before checkpoints became safe to load): do not resume from it unless you wrote "
            "it yourself") from None


def _disk_free(path):
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _is_no_space(exc):
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


# ---- writing folders crash-safely ---------------------------------------------------------------------------
def write_dir_atomically(final, write_fn, size_hint=0):
    """Create folder ``final`` atomically: write_fn(tmp) fills a temporary sibling, which is flushed to disk and
    renamed into place. An existing ``final`` is set aside first and removed only once the new one is in place
    (``recover_output_dir`` puts it back after a kill between the renames). A full disk raises NoSpaceLeftError
    (``size_hint``: bytes the payload needs, for the message) and leaves ``final`` as it was."""
    parent = os.path.dirname(os.path.abspath(final))
    name = os.path.basename(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{name}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        write_fn(tmp)
        _reached("payload-written", tmp)
        _fsync_tree(tmp)
        _reached("fsynced", tmp)
    except BaseException as exc:
        written = _tree_bytes(tmp) if os.path.isdir(tmp) else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_no_space(exc) or (isinstance(exc, Exception) and _disk_free(parent) < (1 << 20) + written):
            where = getattr(exc, "filename", None) or tmp
            where = os.path.join(final, os.path.relpath(where, tmp)) if where.startswith(tmp) else where
            mb = 1 << 20
            raise NoSpaceLeftError(
                f"no space left on device while writing {os.path.normpath(where)} (about "
                f"{math.ceil(max(size_hint, written) / mb)} MB needed, {_disk_free(parent) / mb:.0f} MB free); nothing "
                f"was replaced" + (f": {final} is kept as it was" if os.path.exists(final) else "") +
                ". Free some space (or lower save_total_limit) and resume from the latest checkpoint") from exc
        raise
    old = None
    if os.path.exists(final):
        old = os.path.join(parent, f".old-{name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        _fsync_dir(parent)
        _reached("old-set-aside", old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    _reached("new-in-place", final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        _reached("old-removed", old)
    return final


def recover_output_dir(output_dir):
    """Undo what an interrupted save or prune left in ``output_dir``: a folder set aside by a replacement whose
    new version never arrived is put back; temporary and half-deleted folders are removed. Returns one line per
    action. Call it only while holding the folder's lock (another run's save in progress looks the same)."""
    if not os.path.isdir(output_dir):
        return []
    actions = []
    for name in sorted(os.listdir(output_dir)):
        m = _LEFTOVER.match(name)
        if not m or not os.path.isdir(os.path.join(output_dir, name)):
            continue
        kind, target = m.groups()
        path, target_path = os.path.join(output_dir, name), os.path.join(output_dir, target)
        if kind == "old" and not os.path.exists(target_path):
            os.rename(path, target_path)
            actions.append(f"restored {target} (a save that was replacing it was interrupted)")
        else:
            shutil.rmtree(path, ignore_errors=True)
            actions.append(f"removed {name} (left by an interrupted save)")
    if actions:
        _fsync_dir(output_dir)
    return actions


def save_checkpoint(output_dir, step, write_fn, state, size_hint=0):
    """Write checkpoint-{step} atomically. write_fn(tmp_dir) writes the payload; ``state`` (a JSON-able dict)
    goes last into trainer_state.json, the marker of a complete checkpoint. Returns the final path."""
    def write(tmp):
        write_fn(tmp)
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)
    return write_dir_atomically(os.path.join(output_dir, f"checkpoint-{step}"), write, size_hint)


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


def remove_dir(path):
    """Delete a folder so that a kill half-way never leaves a half-deleted folder under its own name."""
    parent, name = os.path.split(os.path.abspath(path))
    dead = os.path.join(parent, f".del-{name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, dead)
    _reached("prune-set-aside", dead)
    shutil.rmtree(dead, ignore_errors=True)


def prune_checkpoints(output_dir, keep):
    """Keep the ``keep`` newest complete checkpoints (called after a save, so the newest is the one just
    written and a checkpoint is only ever deleted once a newer one exists)."""
    for _, path in list_checkpoints(output_dir)[:-keep]:
        remove_dir(path)
    _reached("pruned", output_dir)


def read_state(path):
    file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not a complete fastalign checkpoint (no {STATE_FILE})")
    try:
        with open(file) as f:
            state = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _damaged(file, exc) from None
    if not isinstance(state, dict) or "global_step" not in state:
        raise _damaged(file, ValueError(f"expected a JSON object with global_step, got {type(state).__name__}"))
    return state


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
        try:
            state.update(load_file(file))
        except Exception as exc:  # noqa: BLE001 -- safetensors' header and size errors: the file cannot be read
            raise _damaged(file, exc) from None
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
