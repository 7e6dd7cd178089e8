"""Rows -> token ids and labels (IGNORE_INDEX on the prompt), with TRL's conventions.

- Plain-text rows: the prompt gets whatever special tokens the tokenizer itself puts before text (BOS for
  Llama-style tokenizers, nothing for GPT-2 or Qwen), as TRL's ``tokenizer(prompt)``; the answer gets
  ``eos_token`` unless it already ends with it.
- Conversational rows with a chat template: the template's text is tokenized as is (it writes its own BOS
  where it has one); the answer is what the template adds for the answer turn. When that already closes the
  turn (ends, before trailing whitespace, with a special token such as ``<|im_end|>`` or ``<|eot_id|>``)
  nothing is appended; otherwise ``eos_token`` is, so the model still learns to stop.
- Conversational rows without a chat template: rendered as ``role: content`` lines, then as plain text.
- Truncation (``truncate``): the prompt keeps its last ``max_prompt_length`` tokens, each answer its first
  ``max_completion_length``; then, over ``max_length``, ``truncation_mode="keep_start"`` keeps the start of
  the sequence (the answers lose their ends) and ``"keep_end"`` its end (the prompt loses its start, then the
  answers theirs). Chosen and rejected share one truncated prompt. As in TRL, a BOS at the start of a cut
  prompt is cut with it (``n_lead`` would keep it; the trainers do not use it, which keeps their data as before).
- Rows left with no answer token, and pairs whose answers are identical after truncation, carry no signal:
  they are dropped with a warning that says how many and why.
"""
import warnings

from fastalign.data.errors import DataError, Problems
from fastalign.data.loading import Rows, locations
from fastalign.data.validation import is_messages
from fastalign.errors import caller_stacklevel

IGNORE_INDEX = -100
TRUNCATION_MODES = ("keep_start", "keep_end")
SHOWN_LOCATIONS = 5


class TemplateError(ValueError):
    """The chat template rendered prompt + answer so that it does not start with the prompt alone."""


def render(tokenizer, prompt, answer):
    """(prompt text, answer text, templated): the chat template when the tokenizer has one and the row is a
    conversation (TRL's ``apply_chat_template``: the answer is what prompt + answer adds after the prompt)."""
    if not (is_messages(prompt) or is_messages(answer) or prompt == []):
        return str(prompt), str(answer), False
    prompt_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    answer_msgs = answer if is_messages(answer) else [{"role": "assistant", "content": str(answer)}]
    if getattr(tokenizer, "chat_template", None):
        p = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True) \
            if prompt_msgs else ""
        full = tokenizer.apply_chat_template(prompt_msgs + answer_msgs, tokenize=False)
        if not full.startswith(p):
            raise TemplateError("the chat template applied to prompt + answer does not start with the template "
                                f"applied to the prompt alone (prompt renders as {p[-60:]!r}, prompt + answer as "
                                f"{full[:len(p)][-60:]!r} at that point)")
        return p, full[len(p):], True
    p = "".join(f"{m['role']}: {m['content']}\n" for m in prompt_msgs) + "assistant:"
    return p, " " + "".join(m["content"] for m in answer_msgs), False


def leading_special_ids(tokenizer):
    """The ids the tokenizer puts before any text when asked for special tokens (BOS, or nothing)."""
    with_special = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i:i + len(plain)] == plain:
            return with_special[:i]
    return []


def _special_texts(tokenizer):
    texts = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            texts.add(str(tok))
    return {t for t in texts if t}


def closes_turn(answer_text, special_texts):
    """Whether a templated answer already ends its turn with a special token (before trailing whitespace)."""
    end = answer_text.rstrip()
    return any(end.endswith(t) for t in special_texts)


def _encode(tokenizer, text):
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _keep_last(ids, n, n_lead):
    """ids cut to n tokens: the first n_lead (a BOS to keep) and the last n - n_lead."""
    if len(ids) <= n:
        return ids
    n_lead = min(n_lead, n)
    return ids[:n_lead] + ids[len(ids) - (n - n_lead):]


def truncate(prompt_ids, answers, max_length, max_prompt_length=None, max_completion_length=None,
             truncation_mode="keep_start", n_lead=0):
    """(prompt_ids, [answer_ids...]) truncated; the answers share the prompt (see the module docstring)."""
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {truncation_mode!r}")
    if max_prompt_length is not None:
        prompt_ids = _keep_last(prompt_ids, max_prompt_length, n_lead)
    if max_completion_length is not None:
        answers = [a[:max_completion_length] for a in answers]
    if max_length is not None:
        longest = max(len(a) for a in answers)
        if len(prompt_ids) + longest > max_length:
            if truncation_mode == "keep_start":
                room = max(0, max_length - len(prompt_ids))
                answers = [a[:room] for a in answers]
            else:
                prompt_ids = _keep_last(prompt_ids, max(min(n_lead, len(prompt_ids)), max_length - longest), n_lead)
                room = max(0, max_length - len(prompt_ids))
                answers = [a[len(a) - room:] if len(a) > room else a for a in answers]
    return prompt_ids, answers


class _Tokenizer:
    """One dataset's tokenization: the tokenizer facts looked up once, problems and drops collected."""

    def __init__(self, tokenizer, max_length, max_prompt_length, max_completion_length, truncation_mode, name):
        self.tok = tokenizer
        self.lead = leading_special_ids(tokenizer)
        self.specials = _special_texts(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.limits = dict(max_length=max_length, max_prompt_length=max_prompt_length,
                           max_completion_length=max_completion_length, truncation_mode=truncation_mode)
        if truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {truncation_mode!r}")
        self.name = name
        self.problems = Problems(name)
        self.dropped = {}
        self.prompts_cut = 0  # rows whose prompt lost tokens to max_prompt_length (said once, in finish)

    def encode(self, prompt, answers, where):
        """(prompt_ids, [answer_ids]) before truncation, or None with a problem recorded."""
        p_text = None
        answer_ids = []
        for answer in answers:
            try:
                p, a, templated = render(self.tok, prompt, answer)
            except TemplateError as exc:
                self.problems.add(where, str(exc))
                return None
            p_text = p if p_text is None else p_text
            ids = _encode(self.tok, a)
            closed = templated and closes_turn(a, self.specials)
            if self.eos is not None and not closed and (not ids or ids[-1] != self.eos):
                ids.append(self.eos)
            answer_ids.append(ids)
        prompt_ids = ([] if templated else list(self.lead)) + _encode(self.tok, p_text)
        return prompt_ids, answer_ids

    def truncate(self, prompt_ids, answers):
        limit = self.limits["max_prompt_length"]
        if limit is not None and len(prompt_ids) > limit:
            self.prompts_cut += 1
        return truncate(prompt_ids, answers, **self.limits)

    def drop(self, reason, where):
        self.dropped.setdefault(reason, []).append(where)

    def finish(self, n_rows, what):
        self.problems.raise_if_any("row(s) that cannot be tokenized")
        n_dropped = sum(len(v) for v in self.dropped.values())
        lim = {k: v for k, v in self.limits.items() if v is not None}
        if self.prompts_cut:
            limit = self.limits["max_prompt_length"]
            warnings.warn(f"{self.name or 'data'}: cut the prompt of {self.prompts_cut} of {n_rows} {what} to its last "
                          f"{limit} tokens (max_prompt_length={limit}; by default half of max_length: raise either to "
                          "keep more)", UserWarning, stacklevel=caller_stacklevel())
        for reason, places in self.dropped.items():
            shown = ", ".join(places[:SHOWN_LOCATIONS]) + (" ..." if len(places) > SHOWN_LOCATIONS else "")
            warnings.warn(f"{self.name or 'data'}: dropped {len(places)} of {n_rows} {what}: {reason} "
                          f"({', '.join(f'{k}={v}' for k, v in lim.items())}); {shown}", UserWarning,
                          stacklevel=caller_stacklevel())
        if n_dropped == n_rows:
            raise DataError(f"{self.name or 'data'}: no usable {what} left: all {n_rows} were dropped ("
                            + "; ".join(f"{len(v)}: {r}" for r, v in self.dropped.items()) + ")")


def _labelled(prompt_ids, answer_ids):
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def tokenize_pair(tokenizer, prompt, answer, max_length, max_prompt_length, max_completion_length=None,
                  truncation_mode="keep_start"):
    """input_ids and labels (IGNORE_INDEX on the prompt) for one prompt/answer."""
    t = _Tokenizer(tokenizer, max_length, max_prompt_length, max_completion_length, truncation_mode, None)
    enc = t.encode(prompt, [answer], "row")
    t.problems.raise_if_any("row(s) that cannot be tokenized")
    p_ids, (a_ids,) = t.truncate(*enc)
    return _labelled(p_ids, a_ids)


def tokenize_preference_rows(rows, tokenizer, max_length, max_prompt_length, max_completion_length=None,
                             truncation_mode="keep_start", name=None):
    """Preference rows -> examples {index, row, chosen_ids, chosen_labels, rejected_ids, rejected_labels, weight,
    behaviour}; index is the example's position (rows dropped as unusable leave no gap)."""
    t = _Tokenizer(tokenizer, max_length, max_prompt_length, max_completion_length, truncation_mode, name)
    out = []
    for r, where in zip(rows, locations(rows)):
        enc = t.encode(r["prompt"], [r["chosen"], r["rejected"]], where)
        if enc is None:
            continue
        p_ids, (c_ids, r_ids) = t.truncate(*enc)
        if not c_ids or not r_ids:
            t.drop("the prompt fills max_length, leaving no answer token", where)
            continue
        if c_ids == r_ids:
            t.drop("chosen and rejected are identical after truncation (no preference signal)", where)
            continue
        c_ids, c_lab = _labelled(p_ids, c_ids)
        r_ids, r_lab = _labelled(p_ids, r_ids)
        example = {"index": len(out), "row": where, "chosen_ids": c_ids, "chosen_labels": c_lab,
                   "rejected_ids": r_ids, "rejected_labels": r_lab, "weight": float(r.get("weight", 1.0)),
                   "behaviour": r.get("behaviour")}
        if "margin" in r:  # only then: examples without one (and so checkpoints' data fingerprints) stay as they were
            example["margin"] = float(r["margin"])
        out.append(example)
    t.finish(len(rows), "pair(s)")
    return out


def _sft_prompt_and_answer(r):
    if "messages" in r:
        msgs = r["messages"]
        last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        return msgs[:last], [msgs[last]]
    return r["prompt"], r.get("completion", r.get("chosen"))


def with_distinct_locations(rows):
    """``rows`` as ``Rows`` whose locations tell every row apart (they are what row_positions reads): the same
    rows when they already do, else each location suffixed with its row index."""
    where = list(locations(rows))
    if len(set(where)) != len(where):
        where = [f"{w} (row {i})" for i, w in enumerate(where)]
    if isinstance(rows, Rows) and list(rows.where) == where:
        return rows
    return Rows(list(rows), where, getattr(rows, "source", None))


def row_positions(rows, examples):
    """For each example, the index in ``rows`` (with distinct locations) of the row it came from. Tokenization
    drops rows without signal, and an example's "index" counts examples, not rows: whatever lines results or
    columns up with the rows goes through this."""
    position = {w: i for i, w in enumerate(locations(rows))}
    return [position[e["row"]] for e in examples]


def tokenize_pairs_with_positions(rows, tokenizer, max_length, max_prompt_length, name=None):
    """(examples, positions): ``tokenize_preference_rows``' examples and, for each, the index in ``rows`` of the
    row it came from (row_positions)."""
    rows = with_distinct_locations(rows)
    examples = tokenize_preference_rows(rows, tokenizer, max_length, max_prompt_length, name=name)
    return examples, row_positions(rows, examples)


def tokenize_sft_rows(rows, tokenizer, max_length, max_prompt_length, max_completion_length=None,
                      truncation_mode="keep_start", name=None):
    """SFT rows (prompt + completion, or messages) -> examples {index, row, ids, labels, behaviour}."""
    t = _Tokenizer(tokenizer, max_length, max_prompt_length, max_completion_length, truncation_mode, name)
    out = []
    for r, where in zip(rows, locations(rows)):
        prompt, answer = _sft_prompt_and_answer(r)
        enc = t.encode(prompt, [answer], where)
        if enc is None:
            continue
        p_ids, (a_ids,) = t.truncate(*enc)
        if not a_ids:
            t.drop("the prompt fills max_length, leaving no answer token", where)
            continue
        ids, labels = _labelled(p_ids, a_ids)
        out.append({"index": len(out), "row": where, "ids": ids, "labels": labels, "behaviour": r.get("behaviour")})
    t.finish(len(rows), "row(s)")
    return out
