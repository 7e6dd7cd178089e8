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


def plot(history, evals, path):
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
    ax[0].plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="held-out")
    ax[0].set_title("DPO loss")
    ax[1].plot([h["step"] for h in train], [h["rewards/margins"] for h in train], label="train")
    ax[1].plot([e["step"] for e in evals], [e["rewards/margins"] for e in evals], "o-", label="held-out")
    ax[1].set_title("reward margin (chosen - rejected)")
    names = sorted(k.split("/", 1)[1] for k in evals[-1] if k.startswith("accuracy/"))
    for n in names:
        ax[2].plot([e["step"] for e in evals], [e[f"accuracy/{n}"] for e in evals], "o-", label=n)
    ax[2].axhline(0.5, color="grey", lw=0.8, ls="--")
    ax[2].set_title("held-out reward accuracy per behaviour")
    for a in ax:
        a.set_xlabel("step")
        a.legend(fontsize=8)
    fig.suptitle("fastalign DPO demo: tiny Llama on embedded persona preferences (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


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
    trainer = DPOTrainer(model, tokenizer=tok, train_dataset=train_rows, eval_dataset=test_rows, config=config)
    before = trainer.evaluate()
    before["step"] = 0
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    evals = [before] + [{k[5:]: v for k, v in h.items() if k.startswith("eval/")} | {"step": h["step"]}
                        for h in trainer.history if any(k.startswith("eval/") for k in h)]
    after = evals[-1]
    names = sorted(k.split("/", 1)[1] for k in after if k.startswith("accuracy/"))
    print(f"\ntrained {config.max_steps} steps in {seconds:.0f} s on CPU; checkpoint and metrics in {args.output_dir}/\n")
    print("| behaviour | held-out accuracy before | after | final margin | learned (acc >= 0.8) at step |")
    print("|---|---:|---:|---:|---:|")
    for n in names:
        first = next((e["step"] for e in evals[1:] if e[f"accuracy/{n}"] >= LEARNED), None)
        print(f"| {n} | {before[f'accuracy/{n}']:.2f} | {after[f'accuracy/{n}']:.2f} | {after[f'margin/{n}']:.2f} | "
              f"{first if first is not None else 'not yet'} |")
    print(f"| **all** | {before['rewards/accuracies']:.2f} | {after['rewards/accuracies']:.2f} | "
          f"{after['rewards/margins']:.2f} | |")
    print("\n(accuracy before training is 0: policy = reference, so every reward is 0 and no pair is ranked)")
    path = plot(trainer.history, evals, os.path.join(args.output_dir, "dpo_demo.png"))
    if path:
        print(f"plot: {path}")
    ok = after["rewards/accuracies"] >= 0.7
    print("held-out reward accuracy is well above chance (0.5)" if ok else
          "WARNING: held-out reward accuracy did not rise well above chance")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
