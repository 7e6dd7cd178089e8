"""Learning dynamics of preference training (Im and Li, 2024, "Understanding the Learning Dynamics of Alignment
with Human Feedback"): preference distinguishability per behaviour, per-group training metrics, and the
analysis of a run's per-group learning speed.

The paper shows that under DPO a behaviour is learned at a rate that grows with how far apart its preferred and
non-preferred answers lie in the model's final representation, so training on several behaviours at once
prioritizes the more distinguishable ones. ``distinguishability`` measures that distance on your data before
training; the trainer logs per-group metrics while training (``groups/<g>/<metric>``, held-out
``eval_groups/<g>/<metric>``); ``fastalign diagnose`` compares the prediction with what a run did. The per-group
metrics and the learning-speed analysis live in ``fastalign.group_metrics`` and are re-exported here.
"""
import math
import numbers
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch

# per-group training metrics and a run's learning speed per group (the module imports nothing from here)
from fastalign.group_metrics import (_OLD_NAMES, GROUP_METRICS, PAIRS, _patterns, _ranks,  # noqa: F401
                                     accuracy_auc, accuracy_curves, compare, finalize_group_metrics, group_sums,
                                     learning_speed, learning_step, pair_metrics, read_metrics, spearman)

# ---- distinguishability ---------------------------------------------------------------------------------


@dataclass
class DistinguishabilityResult:
    """value: ||mean(chosen) - mean(rejected)|| / pooled spread (see ``distinguishability_from_features``);
    ci_low/ci_high: bias-corrected bootstrap interval over pairs; n_pairs: pairs in the group; distance and spread:
    the numerator and the denominator of value (distance is the paper's ||mu+ - mu-||)."""
    value: float
    ci_low: float
    ci_high: float
    n_pairs: int
    distance: float = float("nan")
    spread: float = float("nan")

    def to_dict(self):
        return asdict(self)


def _ratio(distance, spread):
    """distance / spread, with 0/0 = 0 (identical answers) and d/0 = inf (separated points with no spread)."""
    distance, spread = np.asarray(distance, dtype=np.float64), np.asarray(spread, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = distance / spread
    v = np.where(distance <= 0, 0.0, np.where(spread <= 0, np.inf, v))
    return v


def bias_corrected_interval(estimate, resampled, confidence=0.95):
    """Bias-corrected percentile bootstrap interval (Efron 1981). A norm of a mean difference is biased upwards
    and most so near 0, where plain percentiles can miss the estimate entirely; with z0 = Phi^-1(fraction of
    resamples below the estimate), the interval takes the percentiles Phi(2 z0 -+ z_(1+confidence)/2). Order
    statistics, not interpolation: a resample of one repeated pair has value inf."""
    from statistics import NormalDist
    resampled = np.asarray(resampled, dtype=np.float64)
    k = len(resampled)
    below = (np.sum(resampled < estimate) + 0.5 * np.sum(resampled == estimate)) / k
    nd = NormalDist()
    z0 = nd.inv_cdf(min(max(below, 0.5 / k), 1 - 0.5 / k))
    z = nd.inv_cdf(0.5 + confidence / 2)
    q_lo, q_hi = nd.cdf(2 * z0 - z), nd.cdf(2 * z0 + z)
    return (float(np.percentile(resampled, 100 * q_lo, method="lower")),
            float(np.percentile(resampled, 100 * q_hi, method="higher")))


def distinguishability_from_features(chosen, rejected, *, n_bootstrap=1000, confidence=0.95, seed=0):
    """Preference distinguishability of one group from pooled answer features.

    chosen, rejected: [n, H] features of the preferred and non-preferred answer of each pair (row i of both is
    pair i). With means c_bar, r_bar over the n pairs:

        distance = || c_bar - r_bar ||_2
        spread   = sqrt( (sum_i ||c_i - c_bar||^2 + sum_i ||r_i - r_bar||^2) / (2 (n - 1)) )
        value    = distance / spread

    ``distance`` is Im and Li's (2024) preference distinguishability ||mu+_b - mu-_b||, the distance between the
    means of a behaviour's preferred and non-preferred embedding distributions; their bounds hold for spreads
    that are small against it. Dividing by the pooled spread (the root mean squared distance of an answer to
    its class mean: the trace of the pooled covariance) makes the value scale-free, comparable across layers
    and models, and a multivariate Cohen's d: 0 for identical preferred and rejected answers, growing with
    their separation. The confidence interval resamples pairs (with replacement, keeping each pair together)
    ``n_bootstrap`` times with numpy's seeded generator: a bias-corrected percentile interval
    (``bias_corrected_interval``).
    """
    c = np.asarray(chosen, dtype=np.float64)
    r = np.asarray(rejected, dtype=np.float64)
    if c.ndim != 2 or c.shape != r.shape:
        raise ValueError(f"chosen and rejected must be [n, H] arrays of one shape, got {c.shape} and {r.shape}")
    n = c.shape[0]
    if n < 2:
        raise ValueError(f"distinguishability needs at least 2 pairs (a spread needs two points), got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    center = np.concatenate([c, r]).mean(0)  # centring keeps the sums of squares below free of cancellation
    c, r = c - center, r - center
    # every estimate (the full sample and each resample) is a weighting of the pairs: counts [R, n]
    rng = np.random.default_rng(seed)
    counts = np.ones((1, n))
    if n_bootstrap:
        counts = np.concatenate([counts, rng.multinomial(n, np.full(n, 1.0 / n), size=int(n_bootstrap))])
    c_mean, r_mean = counts @ c / n, counts @ r / n
    c_ss = counts @ (c * c).sum(1) - n * (c_mean * c_mean).sum(1)
    r_ss = counts @ (r * r).sum(1) - n * (r_mean * r_mean).sum(1)
    distance = np.linalg.norm(c_mean - r_mean, axis=1)
    spread = np.sqrt(np.maximum(c_ss + r_ss, 0.0) / (2 * (n - 1)))
    values = _ratio(distance, spread)
    lo, hi = bias_corrected_interval(values[0], values[1:], confidence) if n_bootstrap else (math.nan, math.nan)
    if n_bootstrap and math.isinf(hi) and math.isfinite(values[0]):
        # a resample of copies of one pair has no spread, so its ratio is infinite: with 2 pairs half the
        # resamples are such, with 3 a ninth, with 4 1.6%: with 2 or 3 pairs a 95% interval has no upper end
        degenerate = int(np.isinf(values[1:]).sum())
        warnings.warn(f"distinguishability: {degenerate} of {int(n_bootstrap)} bootstrap resamples of these {n} "
                      "pairs drew copies of a single pair (zero spread, an infinite ratio), so the interval's upper "
                      f"end is infinite: {n} pairs cannot bound it (4 or more pairs usually do)",
                      stacklevel=_caller_stacklevel())
    return DistinguishabilityResult(value=float(values[0]), ci_low=float(lo), ci_high=float(hi), n_pairs=n,
                                    distance=float(distance[0]), spread=float(spread[0]))


def _caller_stacklevel():
    """The ``stacklevel`` that points a warning raised by our caller at the first frame outside fastalign (the
    user's call, whether of distinguishability_from_features or of distinguishability)."""
    import os
    import sys
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _group_rows(rows, groups, min_pairs):
    """{group: [row indices]} for the group column ``groups`` (None: one group 'all')."""
    from fastalign.data import DataError
    if groups is None:
        by = {"all": list(range(len(rows)))}
    else:
        if not any(groups in r for r in rows):
            cols = sorted({k for r in rows for k in r})
            raise DataError(f"group column {groups!r} is in no row; the rows have columns: {', '.join(cols)} "
                            "(pass groups=<column> or groups=None for one group over all rows)")
        by, missing = {}, []
        for i, r in enumerate(rows):
            g = r.get(groups)
            if g is None or g == "":
                missing.append(i)
            else:
                by.setdefault(str(g), []).append(i)
        if missing:
            warnings.warn(f"{len(missing)} row(s) have no {groups!r} value (first: row {missing[0]}); "
                          "they belong to no group and are left out", stacklevel=3)
    small = {g: idx for g, idx in by.items() if len(idx) < min_pairs}
    if small:
        desc = "; ".join(f"{g!r}: {len(idx)} pair(s) (row {', '.join(map(str, idx[:3]))})" for g, idx in small.items())
        raise DataError(f"distinguishability needs at least {min_pairs} pairs per group; too few in {desc}")
    return by


def pool_answer_states(hidden, labels, pooling):
    """hidden [S, T, H], labels [S, T] (the answer tokens are the labelled ones; -100 elsewhere) -> [S, H]:
    the mean of the hidden states over each sequence's answer tokens ("mean"), or its last answer token ("last")."""
    mask = labels != -100
    if pooling == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    pos = torch.arange(labels.shape[1], device=labels.device)
    last = torch.where(mask, pos, -1).amax(1).clamp_min(0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@torch.no_grad()
def answer_features(model, tokenizer, rows, *, layer=-1, pooling="mean", batch_size=16, max_length=512,
                    max_prompt_length=256, progress=True, return_positions=False):
    """Pooled hidden states of each row's chosen and rejected answer (after its prompt): two float64 numpy
    arrays [n, H]. One no-grad pass over batches of pairs (chosen and rejected in one forward), through the
    model's trunk only (no logits); layer -1 is the final hidden state (what the lm_head reads).
    Rows that tokenization drops (no answer token left, or identical answers after truncation: a warning says
    which) have no features, so n can be below len(rows); with ``return_positions`` a third value lists, for
    each of the n pairs, the index of its row in ``rows``."""
    from tqdm.auto import tqdm

    from fastalign.data import collate_preference, tokenize_pairs_with_positions
    from fastalign.integrations.hf import run_trunk, trunk_and_head
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples, positions = tokenize_pairs_with_positions(rows, tokenizer, max_length, max_prompt_length)
    trunk, _ = trunk_and_head(model)
    device = next(model.parameters()).device
    n_states = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n_states is not None and not -(n_states + 1) <= layer <= n_states:
        raise ValueError(f"layer {layer} is out of range: the model has {n_states + 1} hidden states "
                         f"(0 = embeddings ... {n_states} = final; negative counts from the end)")
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        for i in tqdm(range(0, len(examples), batch_size), desc="distinguishability", disable=not progress,
                      leave=False, dynamic_ncols=True):
            batch = collate_preference(examples[i:i + batch_size], tokenizer.pad_token_id).to(device)
            out = run_trunk(trunk, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            output_hidden_states=layer != -1)
            hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
            pooled = pool_answer_states(hidden.float(), batch.labels, pooling).double().cpu().numpy()
            b = batch.n_sequences // 2
            chosen.append(pooled[:b])
            rejected.append(pooled[b:])
    finally:
        model.train(was_training)
    chosen, rejected = np.concatenate(chosen), np.concatenate(rejected)
    return (chosen, rejected, positions) if return_positions else (chosen, rejected)


def distinguishability(model, tokenizer, data, *, groups="behaviour", layer=-1, pooling="mean", batch_size=16,
                       max_length=512, max_prompt_length=256, n_bootstrap=1000, confidence=0.95, seed=0,
                       min_pairs=2, progress=True):
    """Preference distinguishability per group: {group: DistinguishabilityResult}, most distinguishable first
    (the order in which DPO is predicted to learn the groups).

    data: a .json/.jsonl path, a list of preference rows or a datasets.Dataset, in any format the trainers take
    (text or chat messages). groups: the column naming each row's group (None: one group "all"). layer: which
    hidden state (-1 the final one). pooling: "mean" over the answer's tokens or the answer's "last" token.
    The formula is in ``distinguishability_from_features``. Pairs that tokenization drops at these lengths
    (a warning names them) are left out of their group. Raises DataError for an unknown group column or a
    group with fewer than ``min_pairs`` (>= 2) pairs, before or after tokenization.
    """
    from fastalign.data import DataError, load_rows, validate_rows
    from fastalign.data.loading import Rows, locations
    if min_pairs < 2:
        raise ValueError(f"min_pairs must be >= 2 (a spread needs two pairs), got {min_pairs}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, numbers.Integral) or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}")
    rows = load_rows(data)
    checked = validate_rows(rows, "preference")  # one normalized row per row (it raises rather than skip)
    by = _group_rows(rows, groups, min_pairs)
    keep = sorted(i for idx in by.values() for i in idx)
    where = locations(rows)
    chosen, rejected, positions = answer_features(
        model, tokenizer, Rows([checked[i] for i in keep], [where[i] for i in keep]), layer=layer, pooling=pooling,
        batch_size=batch_size, max_length=max_length, max_prompt_length=max_prompt_length, progress=progress,
        return_positions=True)
    feature_of = {keep[p]: k for k, p in enumerate(positions)}  # row -> its features; dropped rows have none
    short = {g: [i for i in idx if i in feature_of] for g, idx in by.items()}
    short = {g: kept for g, kept in short.items() if len(kept) < min_pairs}
    if short:
        desc = "; ".join(f"{g!r}: {len(kept)} of {len(by[g])} pair(s) left" for g, kept in short.items())
        raise DataError(f"distinguishability needs at least {min_pairs} pairs per group, and tokenization dropped "
                        f"pairs (see the warning above; max_length={max_length}, max_prompt_length="
                        f"{max_prompt_length}): too few in {desc}")
    results = {}
    for g, idx in by.items():
        sel = [feature_of[i] for i in idx if i in feature_of]
        results[g] = distinguishability_from_features(chosen[sel], rejected[sel], n_bootstrap=n_bootstrap,
                                                      confidence=confidence, seed=seed)
    return dict(sorted(results.items(), key=lambda kv: (-kv[1].value, kv[0])))
