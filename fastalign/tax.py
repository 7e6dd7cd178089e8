"""The alignment tax, measured: for each averaging ratio, how aligned the averaged model is and how much of
the pre-alignment model's general ability it keeps (Lin et al. 2023's trade-off curve).

Alignment (on held-out preference pairs, against the pre model as the reference):
  implicit reward r(y) = beta * (log pi_avg(y|x) - log pi_pre(y|x)); reward accuracy = mean 1[r(chosen) > r(rejected)]
  with ties counted as 1/2 (at weight_on_pre = 1 every reward is 0: all pairs tie, accuracy 0.5); reward margin =
  mean(r(chosen) - r(rejected)). Or, with a reward model, its mean score of the averaged model's greedy answers.
Retained ability (on general held-out text): mean token NLL and perplexity through the fused forward-only op,
and next-token accuracy (argmax of the logits, computed in row chunks so at most [chunk, V] logits exist).
"""
import json
import math
import numbers
import os

import torch

from fastalign.averaging import _pad_id, average_models, check_weight_on_pre, fit_hma_ratios, hma, prompt_and_answer
from fastalign.averaging import hma_groups as hma_layer_groups

_CHUNK_ROWS = 256  # rows of logits at a time for next-token accuracy


def _load(data, name):
    from fastalign.data import DataError, load_rows
    try:
        return load_rows(data)
    except (DataError, FileNotFoundError) as exc:
        raise type(exc)(f"{name}: {exc}") from None


def check_tax_data(align_data, general_data):
    """(preference rows, general-text rows), each checked with every problem named by file:line (or row) and
    field: the align data as training data is (``validate_rows``: prompt, chosen and rejected non-empty text or
    messages, chosen != rejected), the general data as rows with a non-empty string ``text``. Raises DataError."""
    from fastalign.data import DataError, validate_rows
    from fastalign.data.errors import Problems, type_name
    from fastalign.data.loading import locations
    align_rows = validate_rows(_load(align_data, "align data"), "preference", name="align data")
    general_rows = _load(general_data, "general data")
    problems = Problems("general data")
    for row, where in zip(general_rows, locations(general_rows)):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(row, dict):
            problems.add(where, f"expected a dict (one row), got {type_name(row)}")
        elif "text" not in row:
            keys = ", ".join(repr(k) for k in row) or "none"
            problems.add(where, f"missing (general-text rows are {{\"text\": \"...\"}}; the row has {keys})", "text")
        elif not isinstance(text, str):
            problems.add(where, f"expected a string, got {type_name(text)}", "text")
        elif not text.strip():
            problems.add(where, "empty: expected some text", "text")
    problems.raise_if_any("malformed row(s)")
    for name, rows in (("align data", align_rows), ("general data", general_rows)):
        if not rows:
            raise DataError(f"{name}: no rows")
    return align_rows, general_rows


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def _sequence_logps(model, examples, pad_id, batch_size):
    """Summed answer log-probs of (ids, labels) examples, fused forward-only path. -> float64 [n]"""
    from fastalign.data import collate_sequences
    from fastalign.integrations.hf import head_inputs
    from fastalign.ops import sequence_logprobs
    out = []
    device = next(model.parameters()).device
    for chunk in _batches(examples, batch_size):
        b = collate_sequences([e[0] for e in chunk], [e[1] for e in chunk], pad_id)
        inp = head_inputs(model, b.input_ids.to(device), b.attention_mask.to(device), labels=b.labels.to(device))
        logps, _ = sequence_logprobs(inp.hidden, inp.weight, inp.labels, inp.bias, **inp.loss_kwargs())
        out.append(logps.double().cpu())
    return torch.cat(out)


def _pair_examples(rows, tokenizer, max_length, max_prompt_length):
    from fastalign.data import tokenize_pair
    chosen = [tokenize_pair(tokenizer, r["prompt"], r["chosen"], max_length, max_prompt_length) for r in rows]
    rejected = [tokenize_pair(tokenizer, r["prompt"], r["rejected"], max_length, max_prompt_length) for r in rows]
    return chosen + rejected


def _text_examples(rows, tokenizer, max_length):
    from fastalign.data import tokenize_pair
    out = []
    for i, r in enumerate(rows):
        prompt, answer = prompt_and_answer(r, f"general data row {i}")
        out.append(tokenize_pair(tokenizer, prompt, answer, max_length, max(1, max_length // 2)))
    return out


@torch.no_grad()
def ability(model, tokenizer, general_rows, *, batch_size=16, max_length=256):
    """{"nll", "perplexity", "token_accuracy", "n_tokens"} of the model on general text."""
    from fastalign.data import collate_sequences
    from fastalign.integrations.hf import head_inputs
    from fastalign.ops import linear_logprobs
    examples = _text_examples(general_rows, tokenizer, max_length)
    device = next(model.parameters()).device
    total_nll, correct, n = 0.0, 0, 0
    for chunk in _batches(examples, batch_size):
        b = collate_sequences([e[0] for e in chunk], [e[1] for e in chunk], _pad_id(tokenizer))
        inp = head_inputs(model, b.input_ids.to(device), b.attention_mask.to(device), labels=b.labels.to(device))
        h = inp.hidden.reshape(-1, inp.hidden.shape[-1])
        y = inp.labels.reshape(-1)
        keep = y != -100
        h, y = h[keep], y[keep]
        total_nll -= float(linear_logprobs(h, inp.weight, y, inp.bias, **inp.loss_kwargs()).double().sum())
        for r0 in range(0, h.shape[0], _CHUNK_ROWS):  # argmax needs logits: a bounded chunk at a time
            logits = h[r0:r0 + _CHUNK_ROWS] @ inp.weight.T
            if inp.bias is not None:
                logits = logits + inp.bias
            correct += int((logits.argmax(-1) == y[r0:r0 + _CHUNK_ROWS]).sum())
        n += int(y.numel())
    nll = total_nll / max(n, 1)
    return {"nll": nll, "perplexity": math.exp(min(nll, 50.0)), "token_accuracy": correct / max(n, 1), "n_tokens": n}


def alignment(model, pre_logps, tokenizer, pair_examples, *, beta=0.1, batch_size=16):
    """{"reward_accuracy", "reward_margin"} of the model against the pre model's log-probs (see module doc)."""
    logps = _sequence_logps(model, pair_examples, _pad_id(tokenizer), batch_size)
    r = beta * (logps - pre_logps)
    b = r.shape[0] // 2
    diff = r[:b] - r[b:]
    acc = float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    return {"reward_accuracy": acc, "reward_margin": float(diff.mean())}


@torch.no_grad()
def reward_model_score(model, reward_model, tokenizer, prompts, *, max_new_tokens=32, batch_size=16):
    """Mean score of ``reward_model`` (a sequence-classification model, one label) on the model's greedy answers."""
    device = next(model.parameters()).device
    scores = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for chunk in _batches(prompts, batch_size):
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=_pad_id(tokenizer))
            texts = tokenizer.batch_decode(gen, skip_special_tokens=True)
            enc2 = tokenizer(texts, return_tensors="pt", padding=True).to(device)
            scores.append(reward_model(**enc2).logits[:, 0].double().cpu())
    finally:
        tokenizer.padding_side = side
    return float(torch.cat(scores).mean())


def alignment_tax(pre, post, tokenizer, align_data, general_data, *, grid=None, beta=0.1, hma_groups=None,
                  fit_data=None, fit_steps=30, fit_lr=0.05, reward_model=None, batch_size=16, max_length=256,
                  max_prompt_length=128, progress=True):
    """The trade-off curve: one row per (method, weight_on_pre) with alignment and retained ability.

    pre, post: the models before and after alignment (one architecture). align_data: held-out preference rows.
    general_data: held-out general text rows ({"text": ...}). grid: weights on pre (default 0, 0.1, ..., 1).
    hma_groups=K adds HMA rows at every interior grid point with ratios fitted on ``fit_data`` (default: the
    chosen answers of align_data; pass separate data to keep the evaluation held out).
    Returns {"rows": [...], "pre": {...}, "post": {...}} (the endpoints' metrics).
    """
    grid = [i / 10 for i in range(11)] if grid is None else [check_weight_on_pre(g, "grid value") for g in grid]
    if not grid:
        raise ValueError("grid is empty: pass weights on pre, e.g. [0, 0.5, 1]")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 < beta < math.inf:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    align_rows, general_rows = check_tax_data(align_data, general_data)
    fit_rows = None
    if hma_groups is not None:  # a bad K (or more groups than blocks) or unusable fit data: before any evaluation
        from fastalign.hma_fit import _encode_rows
        hma_layer_groups(post, hma_groups)
        # tokenized once here, not again at each grid point's fit
        fit_rows = [{"input_ids": ids, "labels": labels} for ids, labels in _encode_rows(
            fit_data if fit_data is not None else align_rows, tokenizer, max_length, max_prompt_length)]
    pairs = _pair_examples(align_rows, tokenizer, max_length, max_prompt_length)
    pre.eval()
    post.eval()
    pre_logps = _sequence_logps(pre, pairs, _pad_id(tokenizer), batch_size)
    prompts = [r["prompt"] for r in align_rows if isinstance(r["prompt"], str)]

    def measure(model):
        m = alignment(model, pre_logps, tokenizer, pairs, beta=beta, batch_size=batch_size)
        m.update(ability(model, tokenizer, general_rows, batch_size=batch_size, max_length=max_length))
        if reward_model is not None:
            m["reward_model_score"] = reward_model_score(model, reward_model, tokenizer, prompts, batch_size=batch_size)
        return m

    from tqdm.auto import tqdm
    rows = []
    for a in tqdm(grid, desc="alignment tax", disable=not progress, dynamic_ncols=True):
        model = average_models(pre, post, weight_on_pre=a).eval()
        rows.append({"method": "average", "weight_on_pre": a, **measure(model)})
        if hma_groups and 0.0 < a < 1.0:
            ratios = fit_hma_ratios(pre, post, fit_rows, weight_on_pre=a,
                                    groups=hma_groups, steps=fit_steps, lr=fit_lr, tokenizer=tokenizer,
                                    max_length=max_length, max_prompt_length=max_prompt_length, progress=False)
            model = hma(pre, post, weight_on_pre=a, groups=hma_groups, ratios=ratios).eval()
            rows.append({"method": "hma", "weight_on_pre": a, "ratios": ratios, **measure(model)})
    ends = {r["weight_on_pre"]: r for r in rows if r["method"] == "average"}
    return {"rows": rows, "pre": ends.get(1.0), "post": ends.get(0.0), "beta": beta}


def dominance(result, y="reward_accuracy", x="nll"):
    """For each HMA point: its alignment minus plain averaging's alignment at the same forgetting level (linear
    interpolation along the averaging curve). Positive = HMA above the curve. -> [(weight_on_pre, gap)]"""
    avg = sorted((r[x], r[y]) for r in result["rows"] if r["method"] == "average")
    out = []
    for r in result["rows"]:
        if r["method"] != "hma":
            continue
        xs = [p[0] for p in avg]
        if not xs[0] <= r[x] <= xs[-1]:
            continue
        for (x0, y0), (x1, y1) in zip(avg, avg[1:]):
            if x0 <= r[x] <= x1:
                y_avg = y0 if x1 == x0 else y0 + (y1 - y0) * (r[x] - x0) / (x1 - x0)
                out.append((r["weight_on_pre"], r[y] - y_avg))
                break
    return out


def plot_tax(result, path, y="reward_accuracy", x="nll"):
    """PNG of the trade-off: alignment (y) against forgetting (x = general NLL), one point per ratio."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for method, style in (("average", "o-"), ("hma", "s")):
        pts = [r for r in result["rows"] if r["method"] == method]
        if not pts:
            continue
        ax.plot([r[x] for r in pts], [r[y] for r in pts], style, label="plain averaging" if method == "average"
                else f"HMA (K={len(pts[0]['ratios'])}, fitted ratios)")
        for r in pts:
            if method == "average":
                ax.annotate(f"{r['weight_on_pre']:.1f}", (r[x], r[y]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xlabel("general-text NLL (forgetting: higher is worse)")
    ax.set_ylabel({"reward_accuracy": "held-out reward accuracy vs pre (alignment)",
                   "reward_margin": "held-out reward margin vs pre",
                   "reward_model_score": "reward model's mean score of greedy answers (alignment)"}.get(y, y))
    ax.set_title("alignment tax: labels = weight on the pre-alignment model")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(result, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
    return path


def markdown_table(result):
    """One row per averaged model; a reward-model column when the result has one (tax --reward-model)."""
    scored = any("reward_model_score" in r for r in result["rows"])
    lines = ["| method | weight on pre | reward accuracy | reward margin | " + ("reward model score | " if scored else "")
             + "general NLL | perplexity | token accuracy |",
             "|---|---:|---:|---:|" + ("---:|" if scored else "") + "---:|---:|---:|"]
    for r in result["rows"]:
        score = f"{r.get('reward_model_score', float('nan')):.3f} | " if scored else ""
        lines.append(f"| {r['method']}{' ' + ','.join(f'{x:.2f}' for x in r['ratios']) if 'ratios' in r else ''} | "
                     f"{r['weight_on_pre']:.2f} | {r['reward_accuracy']:.3f} | {r['reward_margin']:.3f} | {score}"
                     f"{r['nll']:.4f} | {r['perplexity']:.3f} | {r['token_accuracy']:.3f} |")
    return "\n".join(lines)
