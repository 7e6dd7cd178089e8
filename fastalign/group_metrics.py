"""Per-group metrics of preference training and a run's per-group learning speed (Im and Li, 2024).

While training, ``DPOTrainer`` logs each group's (behaviour's) per-pair means, ``groups/<g>/<metric>`` for the
metrics in ``GROUP_METRICS`` (held-out: ``eval_groups/<g>/<metric>``), built with ``group_sums`` per batch and
``finalize_group_metrics`` at logging time. After training, ``read_metrics`` reads a run's ``metrics.jsonl``,
``accuracy_curves`` and ``learning_speed`` turn it into per-group curves, learning steps and areas under the
curve, and ``compare`` ranks them against the predicted distinguishability (``fastalign.dynamics``) with
Spearman's rho. ``fastalign.dynamics`` re-exports every name here.
"""
import math

import numpy as np
import torch


# ---- per-group training metrics ---------------------------------------------------------------------------
# A trainer's per-batch metrics carry, for each group g, f"groups/{g}/{metric}" = (sum over g's pairs) / B and
# f"groups/{g}/_pairs" = (g's pairs) / B. Any uniform averaging (micro-batches, steps, processes) or
# batch-size-weighted averaging (evaluation) keeps their ratio the exact per-pair mean over everything
# averaged; ``finalize_group_metrics`` turns them into means when the metrics are logged.

GROUP_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected")
PAIRS = "_pairs"


def pair_metrics(out):
    """Per-pair values [B] of every metric in GROUP_METRICS from a preference loss output (no forward)."""
    return {"loss": out.losses, "rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
            "rewards/margins": out.reward_margins, "rewards/accuracies": out.reward_accuracies,
            "logps/chosen": out.chosen_logps, "logps/rejected": out.rejected_logps}


def group_sums(out, groups, names=(), prefix="groups"):
    """Per-group sums / B and pair shares of the batch's per-pair outputs (one device-to-host copy).

    groups: the group of each pair [B] (None: no group); names: groups to emit even when absent from the batch
    (zeros), so that every batch, step and process has the same keys."""
    per_pair = pair_metrics(out)
    values = torch.stack([per_pair[m].detach().float().reshape(-1) for m in GROUP_METRICS]).cpu().tolist()
    b = len(groups)
    result = {}
    for g in sorted(set(names) | {str(x) for x in groups if x is not None}):
        pick = [i for i, x in enumerate(groups) if x is not None and str(x) == g]
        for m, row in zip(GROUP_METRICS, values):
            result[f"{prefix}/{g}/{m}"] = sum(row[i] for i in pick) / b
        result[f"{prefix}/{g}/{PAIRS}"] = len(pick) / b
    return result


def finalize_group_metrics(metrics, n_total=None):
    """Group sums -> per-pair means; a group with no pair in what was averaged is dropped. With n_total (the
    number of pairs averaged over, e.g. in an evaluation) each group also gets ``n_pairs``."""
    bases = [k[:-len(PAIRS) - 1] for k in metrics if k.endswith("/" + PAIRS)]
    if not bases:
        return metrics
    out = {k: v for k, v in metrics.items() if not k.endswith("/" + PAIRS)}
    for base in bases:
        share = metrics[f"{base}/{PAIRS}"]
        for m in GROUP_METRICS:
            key = f"{base}/{m}"
            if key in out:
                if share > 0:
                    out[key] = out[key] / share
                else:
                    del out[key]
        if share > 0 and n_total is not None:
            out[f"{base}/n_pairs"] = int(round(share * n_total))
    return out


# ---- a run's learning speed per group ---------------------------------------------------------------------

def read_metrics(run_dir):
    """The logged records of a run: ``<run_dir>/metrics.jsonl`` (or a path to such a file) as a list of dicts."""
    import json
    import os
    path = os.path.join(run_dir, "metrics.jsonl") if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir!r}: pass the output_dir of a training run")
    records = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i + 1}: not valid JSON ({exc})") from None
    return records


# held-out per-group metrics, newest naming first: eval_groups/<g>/<metric> (TRL's eval_ prefix),
# eval/groups/<g>/<metric> (before the rename), and the older eval/accuracy/<g>, eval/margin/<g>
_OLD_NAMES = {"rewards/accuracies": "accuracy", "rewards/margins": "margin"}


def _patterns(source, metric):
    if source == "train":
        return (("groups/", "/" + metric),)
    pats = [("eval_groups/", "/" + metric), ("eval/groups/", "/" + metric)]
    if metric in _OLD_NAMES:
        pats += [(f"eval_{_OLD_NAMES[metric]}/", ""), (f"eval/{_OLD_NAMES[metric]}/", "")]
    return tuple(pats)


def accuracy_curves(records, source="eval", metric="rewards/accuracies"):
    """{group: (steps [k], values [k])} of one per-group metric (default the reward accuracy) from a run's
    records; source "eval" (held-out) or "train"."""
    patterns = _patterns(source, metric)
    curves = {}
    for rec in records:
        step = rec.get("step")
        if step is None:
            continue
        for key, v in rec.items():
            for head, tail in patterns:
                if key.startswith(head) and key.endswith(tail) and len(key) > len(head) + len(tail):
                    g = key[len(head):len(key) - len(tail)]
                    if "/" in g and not tail:  # eval/accuracy/<g> has no '/' after the group
                        continue
                    curves.setdefault(g, {})[step] = float(v)
                    break
    return {g: (np.array(sorted(c)), np.array([c[s] for s in sorted(c)])) for g, c in sorted(curves.items())}


def learning_step(steps, accuracies, threshold=0.8):
    """The first step at which the accuracy reaches ``threshold``; None if it never does."""
    for s, a in zip(steps, accuracies):
        if a >= threshold:
            return int(s)
    return None


def accuracy_auc(steps, accuracies):
    """Area under the accuracy curve over the logged steps, divided by their span: the mean accuracy over
    training (1 = learned from the first step, 0.5 = chance throughout). Higher = learned sooner. The same for
    any curve (the reward margin's: the mean margin over training)."""
    steps, accuracies = np.asarray(steps, dtype=np.float64), np.asarray(accuracies, dtype=np.float64)
    if len(steps) == 0:
        return float("nan")
    if len(steps) == 1 or steps[-1] == steps[0]:
        return float(accuracies.mean())
    area = float(np.sum((accuracies[1:] + accuracies[:-1]) / 2 * np.diff(steps)))
    return area / float(steps[-1] - steps[0])


def _ranks(x):
    """Average ranks (1 = smallest; ties share their mean rank), as Spearman's rho needs."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x, y):
    """Spearman rank correlation of x and y (Pearson's r of their average ranks); nan if either is constant
    or there are fewer than 2 points. +inf sorts last, so a never-learned step can be passed as inf."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-d of one length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def learning_speed(records, threshold=0.8, source="eval"):
    """{group: {"learning_step", "auc", "final_accuracy", "steps", "accuracies", "margin_auc"}} from a run's
    records; margin_auc (the mean reward margin over training) is nan where the run logged no margins."""
    out = {}
    margins = accuracy_curves(records, source, "rewards/margins")
    for g, (steps, acc) in accuracy_curves(records, source).items():
        out[g] = {"learning_step": learning_step(steps, acc, threshold), "auc": accuracy_auc(steps, acc),
                  "final_accuracy": float(acc[-1]), "steps": steps.tolist(), "accuracies": acc.tolist(),
                  "margin_auc": accuracy_auc(*margins[g]) if g in margins else float("nan")}
    return out


def compare(predicted, observed):
    """Rank agreement of distinguishability (``predicted``: {group: result or value}) with observed speed
    (``observed``: learning_speed's output) on the groups both have: Spearman's rho of distinguishability vs
    the accuracy AUC, vs the learning step negated (never learned counts as slowest), and vs the mean reward
    margin over training (the rate at which the group's preference grows, which the paper's bounds are about)."""
    names = [g for g in predicted if g in observed]
    d = [getattr(predicted[g], "value", predicted[g]) for g in names]
    auc = [observed[g]["auc"] for g in names]
    step = [observed[g]["learning_step"] if observed[g]["learning_step"] is not None else math.inf for g in names]
    margin = [observed[g].get("margin_auc", math.nan) for g in names]
    rho_margin = spearman(d, margin) if not any(math.isnan(m) for m in margin) else math.nan
    return {"groups": names, "rho_auc": spearman(d, auc), "rho_learning_step": spearman(d, [-s for s in step]),
            "rho_margin": rho_margin}
