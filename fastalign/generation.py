"""Sampling from Hugging Face causal LMs (alignment from demonstrations); scoring and Best-of-N are in
fastalign/scoring.py (also reachable from here: ``fastalign.generation.best_of_n``).

``sample``: answers from Hugging Face ``generate``, batched with left padding. Every completion is a function of
(model, prompt, sample index, seed, settings) alone: each row draws its own noise from a generator seeded by
those, so batch size and the other prompts in the batch never change a result.
"""
import hashlib
import json
import os
import torch

from fastalign._lazy import lazy_attributes
from fastalign.data import is_messages as _is_messages
from fastalign.data import leading_special_ids as _leading_special_ids
from fastalign.data import render as _render
from fastalign.integrations.hf import _unwrap

_NO_LIMIT = 1 << 30


def _check_prompts(prompts, name="prompts"):
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise TypeError(f"{name} must be a list of prompts (text or chat messages), got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{name} is empty: nothing to do")
    for i, p in enumerate(prompts):
        if not (isinstance(p, str) or _is_messages(p)):
            raise TypeError(f"{name}[{i}] must be text or a list of {{role, content}} messages, got {type(p).__name__}")
    return prompts


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def chat_prompt(tokenizer, prompt):
    """A text prompt becomes one user message when the tokenizer has a chat template (so generation and
    scoring render it through the template); otherwise it is used as it is."""
    if isinstance(prompt, str) and getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": prompt}]
    return prompt


def prompt_ids(tokenizer, prompt, max_prompt_length=_NO_LIMIT):
    """Token ids of a prompt exactly as ``fastalign.data.tokenize_pair`` writes them (unless templated, what the
    tokenizer itself puts before text: BOS for Llama's, nothing for GPT-2's even though it has a bos_token; the last
    max_prompt_length tokens)."""
    p_text, _, templated = _render(tokenizer, chat_prompt(tokenizer, prompt), " ")
    lead = [] if templated else _leading_special_ids(tokenizer)
    ids = lead + tokenizer(p_text, add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_length:]


def _row_seed(seed, prompt, sample_index):
    key = json.dumps([seed, sample_index, prompt], sort_keys=True).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


class RowSeededSampler:
    """A logits processor that turns greedy decoding into sampling with per-row randomness: temperature, then
    nucleus (top-p) filtering, then Gumbel noise from each row's own generator; argmax of logits + Gumbel noise is
    an exact sample from softmax(logits). Each row draws V uniforms per step from its own generator, so a row's
    sample does not depend on the batch it is in."""

    def __init__(self, seeds, temperature, top_p):
        self.seeds, self.generators = seeds, None
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            from transformers import TopPLogitsWarper
            scores = TopPLogitsWarper(self.top_p)(input_ids, scores)
        if self.generators is None:  # on the scores' device: no host work or copies per step on a GPU
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        v, dev = scores.shape[-1], scores.device
        u = torch.stack([torch.rand(v, generator=g, dtype=torch.float64, device=dev) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp_(1e-300, 1.0 - 1e-16)))
        return scores + gumbel.float()


def model_fingerprint(model):
    """A cheap fingerprint of a model: its class, config and, per tensor, name, shape, dtype and a float64 sum
    of a strided subsample of its values (changes whenever training changed the weights)."""
    inner = _unwrap(model)
    h = hashlib.sha256(type(inner).__name__.encode())
    cfg = getattr(inner, "config", None)
    if cfg is not None:
        h.update(cfg.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, t in inner.state_dict().items():
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(f"{name}{tuple(t.shape)}{t.dtype}{float(flat[::step].double().sum()):.17g}".encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer):
    vocab = sorted(tokenizer.get_vocab().items())
    extra = [getattr(tokenizer, "chat_template", None), tokenizer.bos_token, tokenizer.eos_token]
    return hashlib.sha256(json.dumps([vocab, extra], default=str).encode()).hexdigest()


def _model_device(model):
    return next(iter(_unwrap(model).parameters())).device


def _progress(iterable, total, desc, show):
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, disable=not show, dynamic_ncols=True, leave=False)


def check_output_path(path, overwrite=True, flag="output"):
    """Fail before any work on an output file that cannot be written: a directory, a parent that is a file or
    not writable, or (overwrite=False) a file that exists already."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path!r} is a directory; expected the path of a .jsonl file to write")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{flag} {path!r} exists; choose a new file or pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the nearest existing folder: the missing ones are created
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"{flag} {path!r}: {parent!r} is a file, so the folder for it cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path!r}: the folder {parent!r} is not writable")
    return path


def write_jsonl(path, rows):
    """Write rows as JSONL atomically (a temporary sibling renamed into place; removed if the write fails)."""
    check_output_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def sample(model, tokenizer, prompts, *, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=0,
           batch_size=16, max_prompt_length=None, source=None, output=None, cache_dir=None, show_progress=True):
    """Sample ``n`` completions per prompt with Hugging Face ``generate``.

    prompts: text or chat messages (a text prompt goes through the tokenizer's chat template when it has one).
    temperature 0 is greedy decoding. The row generators live on the model's device, so a GPU and the CPU
    give different (each reproducible) samples for one seed. Returns a list of len(prompts) * n dicts, prompt-major:
    {"prompt", "completion", "source", "sample_index", "seed"}; also written to ``output`` (JSONL) when given.
    cache_dir: samples are stored there under a fingerprint of model weights, tokenizer, prompts and settings,
    and a later call with the same fingerprint reads them back instead of generating.
    """
    prompts = _check_prompts(prompts)
    if output is not None:
        check_output_path(output)  # before generating, not after
    _check_positive("n", n)
    _check_positive("max_new_tokens", max_new_tokens)
    _check_positive("batch_size", batch_size)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    inner = _unwrap(model)
    source = source or getattr(getattr(inner, "config", None), "_name_or_path", None) or type(inner).__name__
    settings = dict(n=n, max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                    seed=seed, max_prompt_length=max_prompt_length)
    cache_path = None
    if cache_dir is not None:
        key = json.dumps([model_fingerprint(model), tokenizer_fingerprint(tokenizer), prompts, settings, source])
        cache_path = os.path.join(cache_dir, f"samples-{hashlib.sha256(key.encode()).hexdigest()[:20]}.jsonl")
        if os.path.exists(cache_path):
            rows = read_jsonl(cache_path)
            if output is not None:
                write_jsonl(output, rows)
            return rows

    from transformers import GenerationConfig, LogitsProcessorList
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = {i for i in (tokenizer.eos_token_id, pad) if i is not None}
    device = _model_device(model)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
    encoded = [prompt_ids(tokenizer, p, max_prompt_length or _NO_LIMIT) for p in prompts]
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    was_training = inner.training
    inner.eval()
    completions = {}
    batches = range(0, len(jobs), batch_size)
    try:
        for start in _progress(batches, len(batches), "sample", show_progress):
            chunk = jobs[start:start + batch_size]
            ids = [encoded[i] for i, _ in chunk]
            width = max(len(s) for s in ids)
            input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in ids], device=device)
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids], device=device)
            procs = LogitsProcessorList()
            if temperature > 0:
                procs.append(RowSeededSampler([_row_seed(seed, prompts[i], j) for i, j in chunk], temperature, top_p))
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen_cfg,
                                 logits_processor=procs)
            for (i, j), row in zip(chunk, out[:, width:].tolist()):
                cut = next((k for k, t in enumerate(row) if t in stop), len(row))
                completions[i, j] = tokenizer.decode(row[:cut], skip_special_tokens=True)
    finally:
        inner.train(was_training)
    rows = [{"prompt": prompts[i], "completion": completions[i, j], "source": source, "sample_index": j,
             "seed": seed} for i, j in jobs]
    if cache_path is not None:
        write_jsonl(cache_path, rows)
    if output is not None:
        write_jsonl(output, rows)
    return rows


_SCORING = ("log_ratio_score", "log_ratio_scorer", "sequence_scores", "reward_scores", "best_of_n", "BestOfNResult",
            "score_answers", "last_token_hidden")


__getattr__ = lazy_attributes(__name__, dict.fromkeys(_SCORING, "fastalign.scoring"))
