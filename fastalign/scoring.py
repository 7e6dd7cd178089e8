"""Scoring answers and Best-of-N (alignment from demonstrations).

- ``log_ratio_score``: log pi_a(y|x) - log pi_b(y|x) summed over answer tokens, from the fused forward-only
  log-prob path (no logits are materialized), with the trainers' tokenization and template.
- ``reward_scores``: a sequence-classification reward model's score (its logit at the last answer token).
- ``best_of_n``: N samples per prompt from a policy (fastalign.generation.sample), scored in large batches, the
  highest kept.
"""
from dataclasses import dataclass
from typing import Callable, List, Union

import torch

from fastalign.data import collate_sequences, tokenize_pair
from fastalign.generation import (_NO_LIMIT, _check_positive, _check_prompts, _model_device, _progress, chat_prompt,
                                  sample, write_jsonl)
from fastalign.integrations.hf import _unwrap, head_inputs, run_trunk, trunk_of

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
            raise ValueError(f"tokenizer must be one tokenizer or a pair (tokenizer_a, tokenizer_b), "
                             f"got {len(tokenizer)} tokenizers")
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
            hidden = run_trunk(trunk_of(inner), input_ids=b.input_ids,
                               attention_mask=b.attention_mask).last_hidden_state
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
