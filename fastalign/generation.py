"""Sampling, scoring and Best-of-N for Hugging Face causal LMs (alignment from demonstrations).

- ``sample``: answers from Hugging Face ``generate``, batched with left padding. Every completion is a function of
  (model, prompt, sample index, seed, settings) alone: each row draws its own noise from a generator seeded by
  those, so batch size and the other prompts in the batch never change a result.
- ``log_ratio_score``: log pi_a(y|x) - log pi_b(y|x) summed over answer tokens, from the fused forward-only
  log-prob path (no logits are materialized), with the trainers' tokenization and template.
- ``reward_scores``: a sequence-classification reward model's score (its logit at the last answer token).
- ``best_of_n``: N samples per prompt from a policy, scored in large batches, the highest kept.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, List, Union

import torch

from fastalign.data import _is_messages, _render, collate_sequences, tokenize_pair
from fastalign.integrations.hf import _unwrap, head_inputs, trunk_of

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
    """Token ids of a prompt exactly as ``fastalign.data.tokenize_pair`` writes them (BOS unless templated;
    the last max_prompt_length tokens)."""
    p_text, _, templated = _render(tokenizer, chat_prompt(tokenizer, prompt), " ")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not templated else []
    ids = bos + tokenizer(p_text, add_special_tokens=False)["input_ids"]
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


def write_jsonl(path, rows):
    """Write rows as JSONL atomically (a temporary sibling renamed into place)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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


# ---- scoring ----------------------------------------------------------------------------------------

def _pairs(tokenizer, prompts, answers, max_length, max_prompt_length):
    prompts = _check_prompts(prompts)
    if isinstance(answers, str) or not hasattr(answers, "__len__"):
        raise TypeError(f"answers must be a list of strings, got {type(answers).__name__}")
    answers = list(answers)
    if len(answers) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts and {len(answers)} answers: one answer per prompt expected")
    for i, a in enumerate(answers):
        if not isinstance(a, str):
            raise TypeError(f"answers[{i}] must be a string, got {type(a).__name__}")
    return [tokenize_pair(tokenizer, chat_prompt(tokenizer, p), a, max_length or _NO_LIMIT,
                          max_prompt_length or _NO_LIMIT) for p, a in zip(prompts, answers)]


def _length_batches(pairs, batch_size):
    """Index batches, longest first, so that each batch pads little."""
    order = sorted(range(len(pairs)), key=lambda k: -len(pairs[k][0]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _vocab_size(model):
    inner = _unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(inner).__name__} has no lm_head: log_ratio_score needs two causal LMs")
    return head.weight.shape[0]


def _check_same_tokenizer(tokenizer):
    """One tokenizer, or a pair that must be the same vocabulary (the score compares the same token ids)."""
    if isinstance(tokenizer, (tuple, list)):
        if len(tokenizer) != 2:
            raise ValueError(f"tokenizer must be one tokenizer or a pair (tokenizer_a, tokenizer_b), got {len(tokenizer)}")
        a, b = tokenizer
        va, vb = a.get_vocab(), b.get_vocab()
        if va != vb:
            diff = sorted(set(va.items()) ^ set(vb.items()), key=str)[:3]
            raise ValueError(f"log_ratio_score: the two models' tokenizers differ (vocabularies of {len(va)} and "
                             f"{len(vb)} tokens; e.g. {diff}): the log-ratio needs both models to score the same "
                             "token ids")
        if getattr(a, "chat_template", None) != getattr(b, "chat_template", None):
            raise ValueError("log_ratio_score: the two tokenizers have different chat templates")
        return a
    return tokenizer


@torch.no_grad()
def sequence_scores(model, tokenizer, prompts, answers, *, batch_size=32, max_length=None, max_prompt_length=None,
                    backend="auto", show_progress=False):
    """log pi(answer | prompt) summed over answer tokens (EOS included, as the trainers count it), float32
    [len(answers)], from the fused forward-only path."""
    pairs = _pairs(tokenizer, prompts, answers, max_length, max_prompt_length)
    return _sequence_scores(model, tokenizer, pairs, batch_size, backend, show_progress)


@torch.no_grad()
def _sequence_scores(model, tokenizer, pairs, batch_size, backend, show_progress, desc="log-probs"):
    from fastalign.ops import sequence_logprobs
    _check_positive("batch_size", batch_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _model_device(model)
    out = torch.empty(len(pairs), dtype=torch.float32)
    inner = _unwrap(model)
    was_training = inner.training
    inner.eval()
    try:
        batches = _length_batches(pairs, batch_size)
        for idx in _progress(batches, len(batches), desc, show_progress):
            b = collate_sequences([pairs[k][0] for k in idx], [pairs[k][1] for k in idx], pad).to(device)
            h = head_inputs(model, b.input_ids, b.attention_mask, labels=b.labels)
            logps, _ = sequence_logprobs(h.hidden, h.weight, h.labels, h.bias, backend=backend, **h.loss_kwargs())
            out[idx] = logps.float().cpu()
    finally:
        inner.train(was_training)
    return out


def log_ratio_score(model_a, model_b, tokenizer, prompts, answers, *, batch_size=32, max_length=None,
                    max_prompt_length=None, backend="auto", show_progress=False):
    """log pi_a(y|x) - log pi_b(y|x) summed over answer tokens: float32 [len(answers)].

    The training-free AfD score (model_a = the SFT model, model_b = the initial model): it grows along the
    direction in which SFT moved the model. Same tokenization and template as the trainers; both models must
    share the vocabulary (``tokenizer`` may be a pair, which is checked to be the same vocabulary).
    """
    tokenizer = _check_same_tokenizer(tokenizer)
    va, vb = _vocab_size(model_a), _vocab_size(model_b)
    if va != vb:
        raise ValueError(f"log_ratio_score: model_a has a vocabulary of {va} tokens and model_b of {vb}: the "
                         "log-ratio needs two models with the same tokenizer and vocabulary")
    if len(tokenizer) > va:
        raise ValueError(f"log_ratio_score: the tokenizer has {len(tokenizer)} tokens but the models' vocabulary "
                         f"has {va}: is this the models' tokenizer?")
    pairs = _pairs(tokenizer, prompts, answers, max_length, max_prompt_length)
    a = _sequence_scores(model_a, tokenizer, pairs, batch_size, backend, show_progress, "log-probs (a)")
    b = _sequence_scores(model_b, tokenizer, pairs, batch_size, backend, show_progress, "log-probs (b)")
    return (a.double() - b.double()).float()


def log_ratio_scorer(model_a, model_b, tokenizer, **kwargs):
    """A Best-of-N scorer: ``scorer(prompts, answers)`` = ``log_ratio_score(model_a, model_b, ...)``."""
    def scorer(prompts, answers):
        return log_ratio_score(model_a, model_b, tokenizer, prompts, answers, **kwargs)
    return scorer


def last_token_hidden(hidden, attention_mask):
    """hidden [B, T, H] of right-padded rows -> hidden of each row's last real token [B, H]."""
    last = attention_mask.sum(-1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@torch.no_grad()
def reward_scores(reward_model, tokenizer, prompts, answers, *, batch_size=64, max_length=None, max_prompt_length=None,
                  show_progress=False):
    """A sequence-classification reward model's score of each (prompt, answer): float32 [len(answers)] (its
    ``score`` head at the last answer token, as RewardTrainer and AfDRewardTrainer train it)."""
    inner = _unwrap(reward_model)
    if not isinstance(getattr(inner, "score", None), torch.nn.Module):
        raise TypeError(f"reward model {type(inner).__name__} has no `score` head: pass a sequence-classification "
                        "model (num_labels=1) or a callable scorer(prompts, answers)")
    _check_positive("batch_size", batch_size)
    pairs = _pairs(tokenizer, prompts, answers, max_length, max_prompt_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _model_device(inner)
    out = torch.empty(len(pairs), dtype=torch.float32)
    was_training = inner.training
    inner.eval()
    try:
        batches = _length_batches(pairs, batch_size)
        for idx in _progress(batches, len(batches), "reward", show_progress):
            b = collate_sequences([pairs[k][0] for k in idx], [pairs[k][1] for k in idx], pad).to(device)
            hidden = trunk_of(inner)(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                     use_cache=False).last_hidden_state
            out[idx] = inner.score(last_token_hidden(hidden, b.attention_mask)).squeeze(-1).float().cpu()
    finally:
        inner.train(was_training)
    return out


# ---- Best-of-N --------------------------------------------------------------------------------------

@dataclass
class BestOfNResult:
    """chosen[i] = candidates[i][chosen_index[i]], the first highest-scoring of the N candidates.
    scores float32 [P, N]; chosen_scores float32 [P]."""
    prompts: List
    chosen: List[str]
    chosen_index: torch.Tensor
    candidates: List[List[str]]
    scores: torch.Tensor

    def __iter__(self):  # chosen, scores = best_of_n(...)
        return iter((self.chosen, self.scores))

    def __getitem__(self, key):  # result["chosen"], result["scores"], ...
        return getattr(self, key)

    @property
    def chosen_scores(self):
        return self.scores.gather(1, self.chosen_index[:, None])[:, 0]

    def to_rows(self):
        return [{"prompt": p, "completion": c, "score": float(s), "index": int(k), "candidates": cands,
                 "scores": sc} for p, c, s, k, cands, sc in zip(self.prompts, self.chosen, self.chosen_scores,
                                                                self.chosen_index, self.candidates,
                                                                self.scores.tolist())]


def score_answers(scorer, tokenizer, prompts, answers, *, batch_size=64):
    """Scores from a reward model (nn.Module with a `score` head) or a callable(prompts, answers)."""
    if isinstance(scorer, torch.nn.Module):
        return reward_scores(scorer, tokenizer, prompts, answers, batch_size=batch_size)
    if callable(scorer):
        s = torch.as_tensor(scorer(list(prompts), list(answers))).float().reshape(-1)
        if s.shape[0] != len(answers):
            raise ValueError(f"the scorer returned {s.shape[0]} scores for {len(answers)} answers")
        return s.cpu()
    raise TypeError(f"reward_model must be a sequence-classification model or a callable(prompts, answers), "
                    f"got {type(scorer).__name__}")


def best_of_n(policy, reward_model: Union[torch.nn.Module, Callable], tokenizer, prompts, *, n, max_new_tokens=64,
              temperature=1.0, top_p=1.0, seed=0, batch_size=16, score_batch_size=64, candidates=None,
              cache_dir=None, output=None, show_progress=True):
    """Best-of-N: sample ``n`` answers per prompt from ``policy`` and keep the one ``reward_model`` scores highest.

    reward_model: a sequence-classification model (e.g. from AfDRewardTrainer) or a callable(prompts, answers)
    -> scores, such as ``log_ratio_scorer(sft_model, init_model, tokenizer)``. All P*N candidates are scored in
    batches of ``score_batch_size``. ``candidates`` (P lists of at least n strings) reuses earlier samples (the
    first n of each are used); ``policy`` may then be None. Returns a BestOfNResult; ``output`` writes its rows
    as JSONL.
    """
    prompts = _check_prompts(prompts)
    _check_positive("n", n)
    if candidates is None:
        if policy is None:
            raise ValueError("best_of_n needs a policy to sample from, or candidates")
        rows = sample(policy, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_p=top_p, seed=seed, batch_size=batch_size, cache_dir=cache_dir, show_progress=show_progress)
        candidates = [[rows[i * n + j]["completion"] for j in range(n)] for i in range(len(prompts))]
    else:
        if len(candidates) != len(prompts):
            raise ValueError(f"got {len(candidates)} candidate lists for {len(prompts)} prompts")
        short = [i for i, c in enumerate(candidates) if len(c) < n]
        if short:
            raise ValueError(f"candidates[{short[0]}] has {len(candidates[short[0]])} answers, fewer than n={n}")
        candidates = [list(c[:n]) for c in candidates]
    flat_prompts = [p for p in prompts for _ in range(n)]
    flat_answers = [a for c in candidates for a in c]
    scores = score_answers(reward_model, tokenizer, flat_prompts, flat_answers,
                           batch_size=score_batch_size).view(len(prompts), n)
    index = scores.argmax(-1)
    result = BestOfNResult(prompts=prompts, chosen=[c[k] for c, k in zip(candidates, index.tolist())],
                           chosen_index=index, candidates=candidates, scores=scores)
    if output is not None:
        write_jsonl(output, result.to_rows())
    return result
