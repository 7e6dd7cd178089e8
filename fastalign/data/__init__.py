"""Embedded defaults (data, tokenizer, tiny model config) and the data path: load, validate, tokenize, collate.

Everything here works offline: nothing is downloaded.
"""
import json
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PREFERENCES = os.path.join(DATA_DIR, "personas.jsonl")
TINY_LLAMA_CONFIG = os.path.join(DATA_DIR, "tiny_llama.json")
IGNORE_INDEX = -100


# ---- embedded defaults ------------------------------------------------------------------------------

def byte_tokenizer():
    """An offline byte-level tokenizer (256 byte tokens + <s>, </s>, <pad>) as a Hugging Face fast tokenizer,
    so it saves with save_pretrained and loads back with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return fast


def tiny_llama_config(vocab_size, **overrides):
    """The embedded tiny Llama-style config (a few hundred thousand parameters)."""
    from transformers import LlamaConfig
    with open(TINY_LLAMA_CONFIG) as f:
        cfg = json.load(f)
    cfg.update(vocab_size=vocab_size, **overrides)
    return LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})


def default_model_and_tokenizer(kind="causal-lm", seed=0):
    """Tiny Llama (fresh weights from the embedded config) and the byte tokenizer."""
    import transformers
    tok = byte_tokenizer()
    cfg = tiny_llama_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if kind == "causal-lm":
        return transformers.LlamaForCausalLM(cfg), tok
    if kind == "reward":
        cfg.num_labels = 1
        return transformers.LlamaForSequenceClassification(cfg), tok
    raise ValueError(f"unknown model kind {kind!r}; expected 'causal-lm' or 'reward'")


# ---- loading and validation -------------------------------------------------------------------------

def load_rows(data, split=None):
    """Rows as a list of dicts from a .json/.jsonl path, a list of dicts, or a Hugging Face Dataset.

    split: keep only rows whose "split" column equals it (the embedded data has train/test).
    """
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if not os.path.exists(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        with open(path) as f:
            if path.endswith(".jsonl"):
                rows = []
                for i, line in enumerate(f):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({exc})") from None
            elif path.endswith(".json"):
                rows = json.load(f)
                if isinstance(rows, dict) and "data" in rows:
                    rows = rows["data"]
            else:
                raise ValueError(f"data file {path!r}: expected a .json or .jsonl file")
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        rows = [data[i] for i in range(len(data))]
    else:
        raise TypeError(f"data must be a path, a list of dicts or a datasets.Dataset, got {type(data).__name__}")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("data must be a list of objects (one dict per row)")
    if split is not None:
        rows = [r for r in rows if r.get("split", split) == split]
    if not rows:
        raise ValueError(f"no rows in the data{f' for split {split!r}' if split else ''}")
    return rows


def _is_messages(x):
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _nonempty(x):
    if isinstance(x, str):
        return bool(x.strip())
    if _is_messages(x):
        return any(str(m["content"]).strip() for m in x)
    return False


class DataError(ValueError):
    """Malformed rows, found up front, each with its index."""


def validate_rows(rows, kind, *, max_report=10):
    """Check every row before training; raise DataError listing the bad rows by index.

    kind: "preference" (prompt, chosen, rejected; optional weight >= 0) or "sft" (prompt + completion,
    or messages, or prompt + chosen).
    """
    problems = []
    for i, r in enumerate(rows):
        if kind == "preference":
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in r]
            if missing:
                problems.append(f"row {i}: missing field(s) {', '.join(missing)}")
                continue
            for k in ("chosen", "rejected"):
                if not _nonempty(r[k]):
                    problems.append(f"row {i}: empty {k} answer")
            if not (isinstance(r["prompt"], str) or _is_messages(r["prompt"])):
                problems.append(f"row {i}: prompt must be text or a list of {{role, content}} messages")
            if r["chosen"] == r["rejected"]:
                problems.append(f"row {i}: chosen and rejected are identical")
            if "weight" in r:
                w = r["weight"]
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf"):
                    problems.append(f"row {i}: weight must be a finite number >= 0, got {w!r}")
        elif kind == "sft":
            if "messages" in r:
                if not _is_messages(r["messages"]) or not any(m["role"] == "assistant" for m in r["messages"]):
                    problems.append(f"row {i}: messages must be {{role, content}} dicts with an assistant turn")
            else:
                answer_key = "completion" if "completion" in r else "chosen" if "chosen" in r else None
                if "prompt" not in r or answer_key is None:
                    problems.append(f"row {i}: needs prompt and completion (or chosen), or messages")
                elif not _nonempty(r[answer_key]):
                    problems.append(f"row {i}: empty {answer_key}")
        else:
            raise ValueError(f"unknown data kind {kind!r}")
    if problems:
        more = f"\n  ... and {len(problems) - max_report} more" if len(problems) > max_report else ""
        raise DataError(f"{len(problems)} malformed row(s):\n  " + "\n  ".join(problems[:max_report]) + more)


# ---- tokenization -----------------------------------------------------------------------------------

def _render(tokenizer, prompt, answer):
    """(prompt text, answer text) with the chat template when the tokenizer has one and the row is chat."""
    if _is_messages(prompt) or _is_messages(answer):
        prompt_msgs = prompt if _is_messages(prompt) else [{"role": "user", "content": str(prompt)}]
        answer_msgs = answer if _is_messages(answer) else [{"role": "assistant", "content": str(answer)}]
        if getattr(tokenizer, "chat_template", None):
            p = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(prompt_msgs + answer_msgs, tokenize=False)
            if full.startswith(p):
                return p, full[len(p):], True
            return p, "".join(m["content"] for m in answer_msgs), True
        p = "".join(f"{m['role']}: {m['content']}\n" for m in prompt_msgs) + "assistant:"
        return p, " " + "".join(m["content"] for m in answer_msgs), False
    return str(prompt), str(answer), False


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_pair(tokenizer, prompt, answer, max_length, max_prompt_length):
    """input_ids and labels (-100 on the prompt) for one prompt/answer, truncated so the answer survives:
    the prompt keeps its last max_prompt_length tokens, then the answer is cut at max_length."""
    p_text, a_text, templated = _render(tokenizer, prompt, answer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not templated else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    p_ids = bos + _encode(tokenizer, p_text)
    a_ids = _encode(tokenizer, a_text) + eos
    if len(p_ids) > max_prompt_length:
        p_ids = p_ids[-max_prompt_length:]
    a_ids = a_ids[: max(1, max_length - len(p_ids))]
    return p_ids + a_ids, [IGNORE_INDEX] * len(p_ids) + a_ids


def tokenize_preference_rows(rows, tokenizer, max_length, max_prompt_length):
    out = []
    for i, r in enumerate(rows):
        c_ids, c_lab = tokenize_pair(tokenizer, r["prompt"], r["chosen"], max_length, max_prompt_length)
        r_ids, r_lab = tokenize_pair(tokenizer, r["prompt"], r["rejected"], max_length, max_prompt_length)
        out.append({"index": i, "chosen_ids": c_ids, "chosen_labels": c_lab, "rejected_ids": r_ids,
                    "rejected_labels": r_lab, "weight": float(r.get("weight", 1.0)),
                    "behaviour": r.get("behaviour")})
    return out


def tokenize_sft_rows(rows, tokenizer, max_length, max_prompt_length):
    out = []
    for i, r in enumerate(rows):
        if "messages" in r:
            msgs = r["messages"]
            last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
            prompt, answer = msgs[:last], [msgs[last]]
        else:
            prompt, answer = r["prompt"], r.get("completion", r.get("chosen"))
        ids, labels = tokenize_pair(tokenizer, prompt, answer, max_length, max_prompt_length)
        out.append({"index": i, "ids": ids, "labels": labels, "behaviour": r.get("behaviour")})
    return out


# ---- collation --------------------------------------------------------------------------------------

@dataclass
class Batch:
    """input_ids/labels/attention_mask [rows, T]. Padded: rows are sequences. Packed (padding_free): rows hold
    several sequences; position_ids restart per sequence, sequence_index [rows, T] names each token's
    sequence (-1 on padding), and attention_mask is an additive block-diagonal causal mask [rows, 1, T, T]
    unless flash-attn's varlen path is used (then None)."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    position_ids: Optional[torch.Tensor] = None
    sequence_index: Optional[torch.Tensor] = None
    n_sequences: int = 0
    weights: Optional[torch.Tensor] = None  # per-pair weights; None when every pair weighs 1
    behaviours: Optional[List] = None
    indices: Optional[List[int]] = None

    def to(self, device):
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Batch(**{k: move(v) for k, v in self.__dict__.items()})


def _pad(seqs, value):
    t = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (t - len(s)) for s in seqs], dtype=torch.long)


def collate_sequences(ids, labels, pad_id, padding_free=False, use_4d_mask=True, mask_dtype=torch.float32):
    """Sequences -> Batch. padding_free packs every sequence into one row."""
    if not padding_free:
        input_ids = _pad(ids, pad_id)
        lab = _pad(labels, IGNORE_INDEX)
        mask = _pad([[1] * len(s) for s in ids], 0)
        return Batch(input_ids=input_ids, labels=lab, attention_mask=mask, n_sequences=len(ids))
    flat_ids, flat_labels, pos, seq_idx = [], [], [], []
    for k, (s, lab) in enumerate(zip(ids, labels)):
        flat_ids += s
        flat_labels += lab
        pos += list(range(len(s)))
        seq_idx += [k] * len(s)
    input_ids = torch.tensor([flat_ids])
    seq = torch.tensor([seq_idx])
    mask = None
    if use_4d_mask:
        n = len(flat_ids)
        same = seq[0][:, None] == seq[0][None, :]
        causal = torch.ones(n, n, dtype=torch.bool).tril_()
        mask = torch.zeros(n, n, dtype=mask_dtype).masked_fill_(~(same & causal), torch.finfo(mask_dtype).min)
        mask = mask[None, None]
    return Batch(input_ids=input_ids, labels=torch.tensor([flat_labels]), attention_mask=mask,
                 position_ids=torch.tensor([pos]), sequence_index=seq, n_sequences=len(ids))


def collate_preference(examples, pad_id, padding_free=False, use_4d_mask=True, mask_dtype=torch.float32):
    """Pairs -> one Batch with chosen sequences 0..B-1 and rejected B..2B-1 (one forward for both)."""
    ids = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    labels = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
    b = collate_sequences(ids, labels, pad_id, padding_free, use_4d_mask, mask_dtype)
    # all-ones weights are the plain mean: leave them out here, where it costs no device synchronisation
    if any(e["weight"] != 1.0 for e in examples):
        b.weights = torch.tensor([e["weight"] for e in examples], dtype=torch.float32)
    b.behaviours = [e.get("behaviour") for e in examples]
    b.indices = [e["index"] for e in examples]
    return b


def collate_sft(examples, pad_id, padding_free=False, use_4d_mask=True, mask_dtype=torch.float32):
    b = collate_sequences([e["ids"] for e in examples], [e["labels"] for e in examples], pad_id, padding_free,
                          use_4d_mask, mask_dtype)
    b.behaviours = [e.get("behaviour") for e in examples]
    b.indices = [e["index"] for e in examples]
    return b
