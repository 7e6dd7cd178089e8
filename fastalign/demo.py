"""`make demo`: DPO on the embedded persona preferences with the embedded tiny Llama, on CPU.

Trains with the fused DPO loss, evaluates held-out pairs as it goes, prints a summary table (per behaviour:
reward accuracy before/after, final margin, the first step at which it was learned) and writes a PNG of
loss, reward margins and per-behaviour accuracy. Nothing is downloaded.
"""
import argparse
import os
import sys
import time

import torch

import fastalign as fa
from fastalign.cli.common import EMBEDDED_DEFAULTS
from fastalign.config import DPOConfig
from fastalign.data import DEFAULT_PREFERENCES, default_model_and_tokenizer, load_rows
from fastalign.trainer import DPOTrainer

LEARNED = 0.8  # held-out reward accuracy at which a behaviour counts as learned


def plot(history, evals, names, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    train = [h for h in history if "loss" in h]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    ax[0].plot([h["step"] for h in train], [h["loss"] for h in train], label="train")
    ax[0].plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="held-out")
    ax[0].set_title("DPO loss")
    ax[1].plot([h["step"] for h in train], [h["rewards/margins"] for h in train], label="train")
    ax[1].plot([e["step"] for e in evals], [e["eval_rewards/margins"] for e in evals], "o-", label="held-out")
    ax[1].set_title("reward margin (chosen - rejected)")
    for n in names:
        ax[2].plot([e["step"] for e in evals], [_group_accuracy(e, n) for e in evals], "o-", label=n)
    ax[2].axhline(0.5, color="grey", lw=0.8, ls="--")
    ax[2].set_title("held-out reward accuracy per behaviour (a tie counts 0)")
    for a in ax:
        a.set_xlabel("step")
        a.legend(fontsize=8)
    fig.suptitle("fastalign DPO demo: tiny Llama on embedded persona preferences (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _group_accuracy(row, name):
    """A behaviour's held-out accuracy in an evaluation row: eval_groups/<name>/accuracy (per-group metrics) or
    eval_accuracy/<name>; older rows without the prefix are read too."""
    for key in (f"eval_groups/{name}/accuracy", f"eval_accuracy/{name}", f"accuracy/{name}"):
        if key in row:
            return row[key]
    return None


def _behaviours(row):
    names = set()
    for k in row:
        parts = k.split("/")
        if k.startswith("eval_groups/") and len(parts) == 3 and parts[2] == "accuracy":
            names.add(parts[1])
        elif k.startswith(("eval_accuracy/", "accuracy/")):
            names.add(parts[1])
    return sorted(names)


@torch.no_grad()
def pair_margins(trainer, examples):
    """Per held-out pair: (behaviour, reward margin). Used for the before/after table so that ties (margin 0,
    as every pair is before training, when the policy equals the reference) can be reported as ties."""
    was = trainer.model.training
    trainer.model.eval()
    result = []
    for i in range(0, len(examples), trainer.config.per_device_eval_batch_size):
        chunk = examples[i:i + trainer.config.per_device_eval_batch_size]
        batch = trainer._collate(chunk)
        out = trainer.step_module(batch, trainer._extra(batch))
        result += [(e.get("behaviour") or "all", m) for e, m in zip(chunk, out.reward_margins.tolist())]
    trainer.model.train(was)
    return result


TIE = 1e-6  # |reward margin| at or below this is a tie


def accuracy_with_ties(margins):
    """(accuracy counting a tie as 0.5, fraction of ties, mean margin) of [(behaviour, margin)]."""
    wins = sum(1.0 for _, m in margins if m > TIE)
    ties = sum(1 for _, m in margins if abs(m) <= TIE)
    n = max(len(margins), 1)
    return (wins + 0.5 * ties) / n, ties / n, sum(m for _, m in margins) / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=EMBEDDED_DEFAULTS["dpo"]["max_steps"])
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--output-dir", default="demo_out")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = default_model_and_tokenizer()
    train_rows, test_rows = load_rows(DEFAULT_PREFERENCES, "train"), load_rows(DEFAULT_PREFERENCES, "test")
    opts = {**EMBEDDED_DEFAULTS["dpo"], "max_steps": args.steps, "eval_steps": args.eval_every,
            "output_dir": args.output_dir, "save_steps": args.steps,
            "overwrite_output_dir": True}  # the demo starts over each time it is run
    config = DPOConfig(**opts)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"fastalign {fa.__version__} DPO demo | backends: {', '.join(fa.available_backends())} | "
          f"tiny Llama {n_params / 1e6:.2f}M params | {len(train_rows)} train / {len(test_rows)} held-out pairs")
    trainer = DPOTrainer(model, args=config, processing_class=tok, train_dataset=train_rows, eval_dataset=test_rows)
    before_pairs = pair_margins(trainer, trainer.eval_examples)
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    after_pairs = pair_margins(trainer, trainer.eval_examples)
    evals = [h for h in trainer.history if "eval_loss" in h]
    names = _behaviours(evals[-1]) if evals else sorted({b for b, _ in after_pairs})
    print(f"\ntrained {config.max_steps} steps in {seconds:.0f} s on CPU; checkpoint and metrics in "
          f"{args.output_dir}/\n")
    print("Held-out reward accuracy counts a tie (|margin| <= 1e-6) as 0.5; `ties` is the fraction of tied pairs.\n")
    print("| behaviour | accuracy before (ties) | after (ties) | final margin | learned (acc >= 0.8) at step |")
    print("|---|---:|---:|---:|---:|")
    rows = [(n, [x for x in before_pairs if x[0] == n], [x for x in after_pairs if x[0] == n]) for n in names]
    for n, bp, ap in rows + [("**all**", before_pairs, after_pairs)]:
        acc_b, ties_b, _ = accuracy_with_ties(bp)
        acc_a, ties_a, margin = accuracy_with_ties(ap)
        first = next((e["step"] for e in evals if (_group_accuracy(e, n) or 0) >= LEARNED), None) \
            if n != "**all**" else None
        learned = "" if n == "**all**" else first if first is not None else "not yet"
        print(f"| {n} | {acc_b:.2f} ({ties_b:.0%}) | {acc_a:.2f} ({ties_a:.0%}) | {margin:.2f} | {learned} |")
    acc_b, ties_b, _ = accuracy_with_ties(before_pairs)
    acc_a, ties_a, _ = accuracy_with_ties(after_pairs)
    print("\n(before training the policy is the reference: every reward is 0, so every pair is a tie)")
    path = plot(trainer.history, evals, names, os.path.join(args.output_dir, "dpo_demo.png"))
    if path:
        print(f"plot: {path}")
    print(f"\nfigures (pasteable): steps={config.max_steps} seconds={seconds:.0f} "
          f"held_out_accuracy_before={acc_b:.2f} ties_before={ties_b:.2f} held_out_accuracy_after={acc_a:.2f} "
          f"ties_after={ties_a:.2f} pairs={len(after_pairs)}")
    ok = acc_a >= 0.7
    print("held-out reward accuracy is well above chance (0.5)" if ok else
          "WARNING: held-out reward accuracy did not rise well above chance")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
