"""Streaming merge of two checkpoints (plain averaging or HMA) that never holds a whole model in memory.

The checkpoints are folders written by ``save_pretrained`` (safetensors, one file or an index of shards). Each
output tensor is read from the two inputs, averaged and written before the next one is read: safetensors
headers give every name, dtype and shape up front, so the output header (and so every byte offset) is known
before any data is read, and tensors are read with plain file reads (no mmap, so pages of the inputs do not
pile up in the process's memory). Peak memory is about one tensor (in fp32) plus the tensors' two inputs.
The output mirrors ``post``'s layout (same shard files, same index) and is written atomically.
"""
import json
import os
import shutil
import struct

import torch

from fastalign.averaging import AveragingError, _check_groups, _ratio_lookup, check_ratios, check_weight_on_pre, mix
from fastalign.checkpoint import write_dir_atomically

# a trainer checkpoint's files beside the model's: left out of a merged folder (trainers/state.py writes them)
TRAINING_STATE_FILES = frozenset(("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pt", "scaler.pt",
                                  ".fastalign.lock"))

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt",
                    "special_tokens_map.json")


class _Header:
    """One safetensors file's header: {name: (dtype string, shape, begin, end)} in file order, and metadata."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise AveragingError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(n))
            except ValueError as exc:
                raise AveragingError(f"{path}: unreadable safetensors header ({exc})") from None
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None)
        self.tensors = dict(sorted(((k, (v["dtype"], tuple(v["shape"]), *v["data_offsets"])) for k, v in header.items()),
                                   key=lambda kv: kv[1][2]))
        for k, (dt, _, _, _) in self.tensors.items():
            if dt not in _DTYPES:
                raise AveragingError(f"{path}: tensor {k!r} has dtype {dt}, which the streaming merge does not handle")

    def read(self, name, f):
        dt, shape, begin, end = self.tensors[name]
        f.seek(self.data_start + begin)
        buf = bytearray(f.read(end - begin))
        if len(buf) != end - begin:
            raise AveragingError(f"{self.path}: tensor {name!r} is truncated")
        if not buf:
            return torch.empty(shape, dtype=_DTYPES[dt])
        return torch.frombuffer(buf, dtype=_DTYPES[dt]).reshape(shape)


class _Checkpoint:
    """A save_pretrained folder: its weight files and where each tensor lives."""

    def __init__(self, path, role):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--{role} {path!r} is not a directory (a folder written by save_pretrained)")
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise AveragingError(f"--{role} {path} holds LoRA adapters, not full weights: merge them into the base "
                                 "model first (peft: model.merge_and_unload().save_pretrained(...)) and merge those")
        self.path, self.role = path, role
        index = os.path.join(path, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                self.index = json.load(f)
            files = sorted(set(self.index["weight_map"].values()))
        elif os.path.isfile(os.path.join(path, SINGLE)):
            self.index, files = None, [SINGLE]
        else:
            raise AveragingError(f"--{role} {path} has no {SINGLE} or {INDEX} (only safetensors checkpoints are merged; "
                                 "re-save with save_pretrained(..., safe_serialization=True))")
        self.files = {name: _Header(os.path.join(path, name)) for name in files}
        self.where = {t: name for name, h in self.files.items() for t in h.tensors}
        config = os.path.join(path, "config.json")
        self.config = json.load(open(config)) if os.path.isfile(config) else None

    def spec(self, name):
        dt, shape, _, _ = self.files[self.where[name]].tensors[name]
        return dt, shape


def check_checkpoints(pre, post):
    """Refuse mismatched architectures, tensors, shapes, dtypes or tokenizers, naming the first mismatch."""
    if pre.config is not None and post.config is not None:
        for key in ("model_type", "architectures"):
            if pre.config.get(key) != post.config.get(key):
                raise AveragingError(f"architectures differ: config.json {key} is {pre.config.get(key)!r} in "
                                     f"{pre.path} but {post.config.get(key)!r} in {post.path}")
    for name in post.where:
        if name not in pre.where:
            raise AveragingError(f"tensor {name!r} of {post.path} is missing from {pre.path}")
    for name in pre.where:
        if name not in post.where:
            raise AveragingError(f"tensor {name!r} of {pre.path} is missing from {post.path}")
    for name in post.where:
        (dpre, spre), (dpost, spost) = pre.spec(name), post.spec(name)
        if spre != spost:
            raise AveragingError(f"tensor {name!r} has shape {list(spre)} in {pre.path} but {list(spost)} in {post.path}")
        if dpre != dpost:
            raise AveragingError(f"tensor {name!r} is {dpre} in {pre.path} but {dpost} in {post.path}; cast both "
                                 "checkpoints to one dtype first")
    for fname in _TOKENIZER_FILES:
        a, b = os.path.join(pre.path, fname), os.path.join(post.path, fname)
        if os.path.isfile(a) != os.path.isfile(b):
            raise AveragingError(f"tokenizers differ: {fname} exists in only one of {pre.path} and {post.path}")
        if os.path.isfile(a) and open(a, "rb").read() != open(b, "rb").read():
            raise AveragingError(f"tokenizers differ: {fname} of {pre.path} and {post.path} are not the same file")


def _write_header(f, entries, metadata):
    """entries: [(name, dtype string, shape, nbytes)] in data order. Returns the byte count of the data."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, dt, shape, nbytes in entries:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    return offset


def _ratio_function(post, groups, ratios):
    """key -> weight on pre for HMA, from the model's parameter order (a meta-device model built from the
    config, so no memory), or from the names alone when the architecture cannot be built."""
    names = list(post.where)
    try:
        import transformers
        config = transformers.AutoConfig.from_pretrained(post.path, local_files_only=True)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        return _ratio_lookup(model, groups, ratios)
    except Exception:  # an architecture transformers cannot build: place non-block tensors by name
        return _ratio_lookup(names, groups, ratios, ordered=False)


def check_merge_output(pre_dir, post_dir, out_dir, *, overwrite=False):
    """Refuse an output folder that is one of the inputs, that is a file, or (without ``overwrite``) that exists
    and is not empty. Cheap: callers run it before any long work (``fastalign merge --fit-data``)."""
    for option, d in (("--pre", pre_dir), ("--post", post_dir)):
        if os.path.realpath(d) == os.path.realpath(out_dir):
            raise ValueError(f"--out {out_dir} is the {option} folder; write the merge to a new folder")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"--out {out_dir} is a file; expected a new folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"--out {out_dir} exists and is not empty; choose a new folder or pass --overwrite")


def streaming_merge(pre_dir, post_dir, out_dir, *, weight_on_pre, groups=None, ratios=None, overwrite=False,
                    progress=True):
    """Average two save_pretrained checkpoints tensor by tensor into ``out_dir`` (see the module docstring).

    weight_on_pre: a in theta = a * pre + (1 - a) * post. groups/ratios: HMA with K groups and K ratios (mean =
    weight_on_pre); groups alone means every a_k = weight_on_pre. Config, tokenizer and every other non-weight
    file are copied from ``post_dir``. Returns out_dir.
    """
    a = check_weight_on_pre(weight_on_pre)
    pre, post = _Checkpoint(pre_dir, "pre"), _Checkpoint(post_dir, "post")
    check_checkpoints(pre, post)
    if ratios is not None and groups is None:
        groups = len(ratios)
    if groups is not None:
        k = _check_groups(groups)
        ratios = [a] * k if ratios is None else check_ratios(ratios, k, a)
        ratio_of = _ratio_function(post, k, ratios)
    else:
        ratio_of = lambda _name: a  # noqa: E731
    check_merge_output(pre_dir, post_dir, out_dir, overwrite=overwrite)
    from tqdm.auto import tqdm
    total = len(post.where)
    bar = tqdm(total=total, desc="merge", unit="tensor", disable=not progress, dynamic_ncols=True)

    def write(tmp):
        for fname in os.listdir(post.path):  # config, tokenizer, generation config, the index ...
            src = os.path.join(post.path, fname)
            # not a training checkpoint's state: the merged model was never trained with that optimizer
            if os.path.isfile(src) and fname not in post.files and fname not in TRAINING_STATE_FILES:
                shutil.copy2(src, os.path.join(tmp, fname))
        handles = {}
        try:
            for fname, header in post.files.items():
                entries = [(n, dt, shape, end - begin) for n, (dt, shape, begin, end) in header.tensors.items()]
                with open(os.path.join(tmp, fname), "wb") as out:
                    _write_header(out, entries, header.metadata)
                    for name, _, _, _ in entries:
                        src_pre = pre.files[pre.where[name]]
                        for h in (src_pre, header):
                            if h.path not in handles:
                                handles[h.path] = open(h.path, "rb")
                        t = mix(src_pre.read(name, handles[src_pre.path]), header.read(name, handles[header.path]),
                                ratio_of(name))
                        out.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                        del t
                        bar.update(1)
        finally:
            for h in handles.values():
                h.close()
    if os.path.exists(out_dir) and overwrite and not os.listdir(out_dir):
        os.rmdir(out_dir)
    write_dir_atomically(out_dir, write)
    bar.close()
    return out_dir
