"""`make dynamics-demo`: are more distinguishable behaviours learned first (Im and Li, 2024)? On CPU, offline.

Two experiments with the embedded tiny Llama, each: preference distinguishability of every group measured on
the model before training, then DPO with held-out evaluation per group; printed side by side with the step at
which each group was learned, the rank correlation, and a PNG.
- personas: the embedded persona preferences (6 behaviours, the data of `make demo`);
- separation: `fastalign/data/separation.jsonl`, where the groups differ only in how many of an answer's 8
  words the rejected answer changes (1, 2, 4, 8): distinguishability set by construction.
"""
import argparse
import os
import shutil
import sys
import time

from fastalign import dynamics as dyn
from fastalign import dynamics_report as rep
from fastalign.data import DATA_DIR, DEFAULT_PREFERENCES, load_rows

SEPARATION = os.path.join(DATA_DIR, "separation.jsonl")


def report_run(trainer, train_rows, out_dir, name, before=None, threshold=0.8, n_bootstrap=1000):
    """After a DPO run: distinguishability on the run's initial model (its reference), learning speed per group
    from its held-out evaluations (and ``before``, an evaluate() at step 0), the table, rho and PNGs.
    The hook for `make demo`: ``report_run(trainer, train_rows, out_dir, "personas", before)``."""
    from fastalign.dynamics import distinguishability
    initial = trainer.ref_model
    if initial is None:
        print("no reference model kept (peft or precomputed reference log-probs): distinguishability skipped")
        return None
    cfg = trainer.config
    predicted = distinguishability(initial, trainer.tokenizer, train_rows, groups=cfg.group_column,
                                   max_length=cfg.max_length, max_prompt_length=cfg.resolved_max_prompt_length,
                                   n_bootstrap=n_bootstrap, progress=False)
    records = list(trainer.history)
    if before is not None:
        records.insert(0, {f"eval/{k}": v for k, v in before.items()} | {"step": 0})
    speed = dyn.learning_speed(records, threshold)
    cmp = dyn.compare(predicted, speed)
    print(f"\n[{name}] distinguishability (before training) next to the observed learning speed:\n")
    print(rep.report_table(predicted, speed, threshold))
    print(f"\n[{name}] Spearman rho(distinguishability, accuracy AUC) = {cmp['rho_auc']:.2f}; "
          f"rho(distinguishability, -learning step) = {cmp['rho_learning_step']:.2f}; rho(distinguishability, "
          f"mean margin) = {cmp['rho_margin']:.2f} over {len(cmp['groups'])} groups")
    pngs = [rep.plot_accuracy_curves(speed, os.path.join(out_dir, f"{name}_accuracy_per_group.png"), threshold,
                                     f"{name}: held-out reward accuracy per group"),
            rep.plot_speed_vs_distinguishability(predicted, speed, os.path.join(out_dir, f"{name}_speed_vs_"
                                                                                "distinguishability.png"), name)]
    for p in filter(None, pngs):
        print(f"plot: {p}")
    return {"predicted": predicted, "speed": speed, **cmp}


def run(name, train_rows, test_rows, out_dir, steps, eval_every, threshold, seed=0, learning_rate=None):
    from fastalign.cli.common import EMBEDDED_DEFAULTS
    from fastalign.config import DPOConfig
    from fastalign.data import default_model_and_tokenizer
    from fastalign.trainers import DPOTrainer
    run_dir = os.path.join(out_dir, name)
    shutil.rmtree(run_dir, ignore_errors=True)  # this demo's own folder: a rerun starts clean
    model, tok = default_model_and_tokenizer(seed=seed)
    config = DPOConfig(**{**EMBEDDED_DEFAULTS["dpo"], "max_steps": steps, "eval_steps": eval_every,
                          "logging_steps": eval_every, "output_dir": run_dir, "save_steps": 0, "seed": 42 + seed,
                          "overwrite_output_dir": True, "disable_tqdm": True,
                          **({"learning_rate": learning_rate} if learning_rate else {})})
    trainer = DPOTrainer(model, tokenizer=tok, train_dataset=train_rows, eval_dataset=test_rows, config=config)
    before = trainer.evaluate()
    t0 = time.time()
    trainer.train()
    print(f"\n[{name}] {len(train_rows)} train / {len(test_rows)} held-out pairs, {steps} DPO steps in "
          f"{time.time() - t0:.0f} s")
    return report_run(trainer, train_rows, out_dir, name, before, threshold)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="demo_out/dynamics")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--persona-steps", type=int, default=300)
    p.add_argument("--persona-eval-every", type=int, default=25)
    p.add_argument("--separation-steps", type=int, default=30)
    p.add_argument("--separation-eval-every", type=int, default=1)
    p.add_argument("--separation-learning-rate", type=float, default=3e-5,
                   help="below the embedded default (1e-3), at which every group is learned within 3 steps")
    p.add_argument("--only", choices=("personas", "separation"))
    args = p.parse_args(argv)
    results = {}
    if args.only in (None, "separation"):
        results["separation"] = run("separation", load_rows(SEPARATION, "train"), load_rows(SEPARATION, "test"),
                                    args.output_dir, args.separation_steps, args.separation_eval_every,
                                    args.threshold, learning_rate=args.separation_learning_rate)
    if args.only in (None, "personas"):
        results["personas"] = run("personas", load_rows(DEFAULT_PREFERENCES, "train"),
                                  load_rows(DEFAULT_PREFERENCES, "test"), args.output_dir, args.persona_steps,
                                  args.persona_eval_every, args.threshold)
    print("\nsummary (the paper's claim: more distinguishable behaviours are learned first, rho > 0):")
    for name, r in results.items():
        if r:
            print(f"  {name}: rho(distinguishability, accuracy AUC) = {r['rho_auc']:.2f}, "
                  f"rho(distinguishability, -learning step) = {r['rho_learning_step']:.2f}, "
                  f"rho(distinguishability, mean margin) = {r['rho_margin']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
