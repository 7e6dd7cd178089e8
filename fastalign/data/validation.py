"""Checking rows before any work, and bringing them to one shape.

Preference rows (DPO family, reward models): ``prompt`` + ``chosen`` + ``rejected`` (explicit prompt), or
``chosen`` + ``rejected`` alone (implicit prompt: the part both share is the prompt, as TRL's
``extract_prompt``); each a string or a list of ``{role, content}`` messages; optional ``weight`` (a finite
number >= 0) and ``behaviour`` (a group label). SFT rows: ``messages`` (the last assistant turn is learned),
or ``prompt`` + ``completion`` (or ``chosen``).
"""
import math
import numbers

from fastalign.data.errors import Problems, type_name
from fastalign.data.loading import Rows, locations

ANSWER_EXPECTED = "expected a string or a list of messages"
PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


def is_messages(x):
    """A non-empty list of {role, content} dicts (a conversation)."""
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def is_nonempty(x):
    """True for a string with non-space text, or a message list with some non-empty content."""
    if isinstance(x, str):
        return bool(x.strip())
    if is_messages(x):
        return any(isinstance(m["content"], str) and m["content"].strip() for m in x)
    return False


def _describe(value):
    if isinstance(value, list):
        kinds = sorted({type_name(v) for v in value})
        return "an empty list" if not value else f"a list of {' and '.join(kinds)}"
    return type_name(value)


def _check_messages(value, field, where, problems, answer):
    """value is a list: every item a {role, content} dict with string content; assistant turns non-empty;
    an answer needs an assistant turn."""
    ok = True
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            problems.add(where, f"message {j}: expected a {{role, content}} object, got {type_name(m)}", field)
            ok = False
            continue
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            problems.add(where, f"message {j}: missing {' and '.join(repr(k) for k in missing)}", field)
            ok = False
            continue
        role, content = m["role"], m["content"]
        if not isinstance(role, str):
            problems.add(where, f"message {j}: 'role' expected a string, got {type_name(role)}", field)
            ok = False
        if not isinstance(content, str):
            problems.add(where, f"message {j} ({role}): 'content' expected a string, got {type_name(content)}",
                         field)
            ok = False
        elif role == "assistant" and not content.strip():
            problems.add(where, f"message {j} (assistant) is empty", field)
            ok = False
    if ok and answer and not any(m["role"] == "assistant" for m in value):
        problems.add(where, "has no assistant message", field)
        ok = False
    return ok


def _check_text_or_messages(row, field, where, problems, answer):
    """True when row[field] is usable: a string (non-blank for an answer) or a valid list of messages."""
    value = row[field]
    if isinstance(value, str):
        if answer and not value.strip():
            problems.add(where, "empty answer", field)
            return False
        return True
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return _check_messages(value, field, where, problems, answer)
    problems.add(where, f"{ANSWER_EXPECTED}, got {_describe(value)}", field)
    return False


def _check_weight(row, where, problems):
    if "weight" not in row:
        return True
    w = row["weight"]
    if isinstance(w, bool) or not isinstance(w, numbers.Real):
        found = f"str {w!r}" if isinstance(w, str) else _describe(w)
        problems.add(where, f"expected a finite number >= 0, got {found}", "weight")
        return False
    if not math.isfinite(w) or w < 0:
        problems.add(where, f"expected a finite number >= 0, got {w!r}", "weight")
        return False
    return True


def _check_margin(row, where, problems):
    """TRL's reward-data ``margin``: how much more the chosen answer should score (any finite number)."""
    if "margin" not in row:
        return True
    m = row["margin"]
    if isinstance(m, numbers.Real) and not isinstance(m, bool) and math.isfinite(m):
        return True
    number = isinstance(m, numbers.Real) and not isinstance(m, bool)
    found = repr(m) if number else f"str {m!r}" if isinstance(m, str) else _describe(m)
    problems.add(where, f"expected a finite number, got {found}", "margin")
    return False


def extract_prompt(chosen, rejected):
    """(prompt, chosen, rejected) with the prompt the part both answers share (TRL's ``extract_prompt``):
    whole leading messages for conversations, the common leading text for strings (a space just before the
    first difference stays with the answers)."""
    n = min(len(chosen), len(rejected))
    i = 0
    while i < n and chosen[i] == rejected[i]:
        i += 1
    if isinstance(chosen, str) and 0 < i < n and chosen[i - 1] == " ":
        i -= 1
    return chosen[:i], chosen[i:], rejected[i:]


def _missing(row, needed):
    keys = ", ".join(repr(k) for k in row) or "none"
    return f"missing ({needed}; the row has {keys})"


def _preference_row(row, where, problems):
    for k in ("chosen", "rejected"):
        if k not in row:
            problems.add(where, _missing(row, "a preference row needs 'chosen' and 'rejected', with 'prompt' "
                                              "unless both include it"), k)
            return None
    ok = _check_text_or_messages(row, "chosen", where, problems, answer="prompt" in row)
    ok = _check_text_or_messages(row, "rejected", where, problems, answer="prompt" in row) and ok
    if "prompt" in row:
        ok = _check_text_or_messages(row, "prompt", where, problems, answer=False) and ok
    ok = _check_weight(row, where, problems) and ok
    ok = _check_margin(row, where, problems) and ok
    if not ok:
        return None
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if isinstance(chosen, str) != isinstance(rejected, str):
        problems.add(where, f"is {'a string' if isinstance(rejected, str) else 'a list of messages'} but 'chosen' "
                            f"is {'a string' if isinstance(chosen, str) else 'a list of messages'}; use one form "
                            "for both", "rejected")
        return None
    if "prompt" not in row:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            if not answer or (isinstance(answer, str) and not answer.strip()):
                problems.add(where, "nothing is left after removing the prompt it shares with the other answer",
                             name)
                ok = False
            elif not isinstance(answer, str) and not any(m["role"] == "assistant" for m in answer):
                problems.add(where, "has no assistant message after the shared prompt", name)
                ok = False
    if ok and chosen == rejected:
        problems.add(where, "identical to 'chosen' (no preference signal)", "rejected")
        ok = False
    if not ok:
        return None
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for k in ("weight", "behaviour", "margin"):
        if k in row:
            out[k] = row[k] if k == "behaviour" else float(row[k])
    return out


def _sft_row(row, where, problems):
    if "messages" in row:
        msgs = row["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs)):
            problems.add(where, f"expected a list of {{role, content}} messages, got {_describe(msgs)}", "messages")
            return None
        if not _check_messages(msgs, "messages", where, problems, answer=True):
            return None
        last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        prompt, completion = msgs[:last], [msgs[last]]
    else:
        answer_key = "completion" if "completion" in row else "chosen" if "chosen" in row else None
        if "prompt" not in row or answer_key is None:
            problems.add(where, _missing(row, "an SFT row needs 'messages', or 'prompt' and 'completion' "
                                              "(or 'chosen')"), "prompt" if "prompt" not in row else "completion")
            return None
        ok = _check_text_or_messages(row, "prompt", where, problems, answer=False)
        ok = _check_text_or_messages(row, answer_key, where, problems, answer=True) and ok
        if not ok:
            return None
        prompt, completion = row["prompt"], row[answer_key]
    out = {"prompt": prompt, "completion": completion}
    if "behaviour" in row:
        out["behaviour"] = row["behaviour"]
    return out


def validate_rows(rows, kind, *, max_report=10, name=None):
    """Check every row before training and bring it to one shape; raise DataError listing every problem
    (file:line or row, field, found vs expected; up to ``max_report`` shown).

    kind: "preference" -> rows {prompt, chosen, rejected[, weight][, behaviour]} (an implicit prompt is
    extracted); "sft" -> rows {prompt, completion[, behaviour]}. Returns ``Rows`` keeping each row's origin.
    """
    if kind not in ("preference", "sft"):
        raise ValueError(f"unknown data kind {kind!r}; expected 'preference' or 'sft'")
    problems = Problems(name, max_report)
    check = _preference_row if kind == "preference" else _sft_row
    out, where_out = [], []
    for row, where in zip(rows, locations(rows)):
        if not isinstance(row, dict):
            problems.add(where, f"expected a dict (one row), got {type_name(row)}")
            continue
        norm = check(row, where, problems)
        if norm is not None:
            out.append(norm)
            where_out.append(where)
    problems.raise_if_any("malformed row(s)")
    return Rows(out, where_out, getattr(rows, "source", None))
