"""What ``fastalign diagnose`` and the dynamics demo report: the predicted order of a preference data set's
groups, a run's observed learning speed against it, the PNGs, and the misalignment (flipped preference)
experiment of Im and Li (2024)."""
import math
import os

from fastalign import dynamics as dyn


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    return plt


def plot_accuracy_curves(speed, path, threshold=0.8, title="held-out reward accuracy per group"):
    """speed: dynamics.learning_speed output. One line per group over steps; the threshold dashed."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for g, s in speed.items():
        ax.plot(s["steps"], s["accuracies"], "o-", ms=3, label=g)
    ax.axhline(threshold, color="grey", lw=0.8, ls="--")
    ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("reward accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_speed_vs_distinguishability(predicted, speed, path, title=""):
    """Against distinguishability (with its bootstrap CI): the accuracy AUC; the learning step (never learned
    drawn at the top, hollow); the mean reward margin over training."""
    plt = _plt()
    if plt is None:
        return None
    cmp = dyn.compare(predicted, speed)
    names = cmp["groups"]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    last = max([s for g in names for s in speed[g]["steps"]] or [1])
    for g in names:
        r, s = predicted[g], speed[g]
        # no bar for an interval with an infinite end (a group of 2-3 pairs, see distinguishability_from_features)
        err = [[r.value - r.ci_low], [r.ci_high - r.value]] if math.isfinite(r.ci_low) and math.isfinite(
            r.ci_high) else None
        ax[0].errorbar(r.value, s["auc"], xerr=err, fmt="o", capsize=3)
        ax[0].annotate(g, (r.value, s["auc"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        step = s["learning_step"]
        ax[1].errorbar(r.value, step if step is not None else last, xerr=err, fmt="o", capsize=3,
                       **({} if step is not None else {"mfc": "none"}))
        ax[1].annotate(g if step is not None else f"{g} (not learned)", (r.value, step if step is not None else last),
                       fontsize=8, xytext=(4, 4), textcoords="offset points")
        if math.isfinite(s.get("margin_auc", math.nan)):
            ax[2].errorbar(r.value, s["margin_auc"], xerr=err, fmt="o", capsize=3)
            ax[2].annotate(g, (r.value, s["margin_auc"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax[0].set_ylabel("area under the accuracy curve (higher = sooner)")
    ax[0].set_title(f"Spearman rho = {cmp['rho_auc']:.2f}")
    ax[1].set_ylabel("learning step (accuracy first >= threshold)")
    ax[1].set_title(f"Spearman rho (distinguishability vs -step) = {cmp['rho_learning_step']:.2f}")
    ax[2].set_ylabel("mean held-out reward margin over training")
    ax[2].set_title(f"Spearman rho = {cmp['rho_margin']:.2f}")
    for a in ax:
        a.set_xlabel("preference distinguishability (before training)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(x, digits=2):
    return "-" if x is None else ("nan" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}")


def report_table(predicted, speed=None, threshold=0.8):
    """Markdown: per group (most distinguishable first) its distinguishability, CI, pairs, predicted rank, and
    with a run the observed learning step, AUC, final accuracy and observed rank (by AUC)."""
    head = "| group | distinguishability | 95% CI | pairs | predicted rank |"
    rule = "|---|---:|---:|---:|---:|"
    observed = {}
    if speed:
        head += f" learned (acc >= {threshold}) at step | accuracy AUC | mean margin | final accuracy | observed rank |"
        rule += "---:|---:|---:|---:|---:|"
        names = [g for g in predicted if g in speed]
        observed = dict(zip(names, dyn._ranks([-speed[g]["auc"] for g in names])))  # ties share a mean rank
    lines = [head, rule]
    for rank, (g, r) in enumerate(predicted.items(), 1):
        line = f"| {g} | {r.value:.3f} | [{_fmt(r.ci_low, 3)}, {_fmt(r.ci_high, 3)}] | {r.n_pairs} | {rank} |"
        if speed:
            s = speed.get(g)
            line += (f" {s['learning_step'] if s['learning_step'] is not None else 'not yet'} | {s['auc']:.3f} | "
                     f"{_fmt(s.get('margin_auc'), 3)} | {s['final_accuracy']:.2f} | {observed[g]:g} |" if s
                     else " - | - | - | - | - |")
        lines.append(line)
    return "\n".join(lines)


def flip_rows(rows, group, column="behaviour"):
    """The rows of one group with chosen and rejected swapped (the misalignment data)."""
    picked = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in rows if str(r.get(column)) == str(group)]
    if not picked:
        from fastalign.data import DataError
        names = sorted({str(r.get(column)) for r in rows if r.get(column) is not None})
        raise DataError(f"--flip-group {group!r}: no row has {column} = {group!r}; groups: {', '.join(names)}")
    return picked


def steps_to_flip(model, tokenizer, train_rows, eval_rows, config, threshold=0.8):
    """Train DPO on flipped rows from ``model`` (its own reference) and return (first step at which the
    held-out reward accuracy on the flipped pairs reaches threshold or None, [(step, accuracy)])."""
    from fastalign.trainers import DPOTrainer
    t = DPOTrainer(model, tokenizer=tokenizer, train_dataset=train_rows, eval_dataset=eval_rows, config=config)
    t.train()
    curve = [(h["step"], h[k]) for h in t.history for k in ("eval_rewards/accuracies", "eval/rewards/accuracies")
             if k in h]
    return dyn.learning_step([s for s, _ in curve], [a for _, a in curve], threshold), curve
