"""`fastalign diagnose`: which groups (behaviours) of a preference data set DPO will learn first, and, with a
run, which it did (Im and Li, 2024)."""
import json
import os
import tempfile

from fastalign.cli.common import EMBEDDED_DEFAULTS, load_model
from fastalign.cli.inputs import (accuracy_threshold, add_overwrite_flag, nonnegative_int, positive_float,
                                  positive_int, report_folder)


DEFAULT_OUTPUT_DIR = "diagnose_out"
REPORT_FILES = ("diagnose.json", "accuracy_per_group.png", "speed_vs_distinguishability.png")


def _output_dir(args):
    return args.output_dir or (os.path.join(args.run, "diagnose") if args.run else DEFAULT_OUTPUT_DIR)


def _check_flip(args, rows, eval_rows):
    """--flip-group's inputs, checked before any analysis: (aligned model folder, flipped train rows, flipped
    held-out rows)."""
    from fastalign import dynamics_report as rep
    if args.flip_eval_every > args.flip_steps:
        raise ValueError(f"--flip-eval-every {args.flip_eval_every} is more than --flip-steps {args.flip_steps}: the "
                         "flip runs would never be evaluated; evaluate at most every --flip-steps steps")
    aligned_path = args.aligned or (os.path.join(args.run, "final") if args.run else None)
    if aligned_path is None or not os.path.isdir(aligned_path):
        raise FileNotFoundError(f"--flip-group needs the aligned model: pass --aligned DIR or a --run whose final/ "
                                f"model exists (looked for {aligned_path!r})")
    train = rep.flip_rows(rows, args.flip_group, args.group_column)
    held = rep.flip_rows(eval_rows, args.flip_group, args.group_column) if eval_rows else train
    return aligned_path, train, held


def _flip(args, flip, base_model, tok, embedded, out_dir):
    from fastalign import dynamics_report as rep
    from fastalign.config import DPOConfig
    aligned_path, train, held = flip
    aligned, _, _ = load_model("dpo", aligned_path)
    base = EMBEDDED_DEFAULTS["dpo"] if embedded else {}
    opts = dict(base, max_steps=args.flip_steps, eval_steps=args.flip_eval_every, logging_steps=args.flip_eval_every,
                save_steps=0, learning_rate=args.flip_learning_rate or base.get("learning_rate", 1e-6),
                per_device_train_batch_size=min(base.get("per_device_train_batch_size", 8), len(train)),
                disable_tqdm=False, group_column=args.group_column, report_to="jsonl")
    result = {}
    for name, model in (("base", base_model), ("aligned", aligned)):
        run_dir = tempfile.mkdtemp(prefix=f"flip-{args.flip_group}-{name}-", dir=out_dir)
        step, curve = rep.steps_to_flip(model, tok, train, held, DPOConfig(**dict(opts, output_dir=run_dir)),
                                        args.threshold)
        result[name] = {"steps_to_flip": step, "curve": curve, "output_dir": run_dir}
    print(f"\nmisalignment: DPO on the flipped pairs of {args.flip_group!r} ({len(train)} pairs, reference = the "
          f"starting model), steps until reward accuracy on the flipped pairs >= {args.threshold}:")
    print("| start from | steps to flip | accuracy at the end |\n|---|---:|---:|")
    for name, r in result.items():
        print(f"| {name} model | {r['steps_to_flip'] if r['steps_to_flip'] is not None else 'not within'} "
              f"{'' if r['steps_to_flip'] is not None else args.flip_steps} | {r['curve'][-1][1]:.2f} |")
    return result


def cmd_diagnose(args):
    from fastalign.data import DEFAULT_PREFERENCES, load_rows
    if args.data is None:
        rows, eval_rows = load_rows(DEFAULT_PREFERENCES, "train"), load_rows(DEFAULT_PREFERENCES, "test")
    else:
        rows = load_rows(args.data)
        eval_rows = load_rows(args.eval_data) if args.eval_data else None
    flip = _check_flip(args, rows, eval_rows) if args.flip_group else None
    with report_folder(_output_dir(args), REPORT_FILES, overwrite=args.overwrite_output_dir) as out_dir:
        return _diagnose(args, rows, flip, out_dir)


def _diagnose(args, rows, flip, out_dir):
    import fastalign as fa
    from fastalign import dynamics as dyn
    from fastalign import dynamics_report as rep
    speed = source = None
    if args.run:  # the run's metrics are read (and refused) before the long distinguishability pass
        records = dyn.read_metrics(args.run)
        speed = dyn.learning_speed(records, args.threshold, source="eval")
        source = "held-out"
        if not speed:
            speed, source = dyn.learning_speed(records, args.threshold, source="train"), "training"
        if not speed:
            raise ValueError(f"{args.run}/metrics.jsonl has no per-group reward accuracy (eval_groups/<g>/rewards/"
                             "accuracies or groups/<g>/...): train with a group column and eval_steps > 0")
    model, tok, embedded = load_model("dpo", args.model)
    predicted = fa.distinguishability(model, tok, rows, groups=args.group_column, layer=args.layer,
                                      pooling=args.pooling, batch_size=args.batch_size, max_length=args.max_length,
                                      max_prompt_length=args.max_prompt_length, n_bootstrap=args.n_bootstrap,
                                      seed=args.seed)
    report = {"distinguishability": {g: r.to_dict() for g, r in predicted.items()},
              "predicted_order": list(predicted), "pooling": args.pooling, "layer": args.layer}
    if speed:
        cmp = dyn.compare(predicted, speed)
        report.update(observed=speed, source=source, threshold=args.threshold,
                      **{k: cmp[k] for k in ("rho_auc", "rho_learning_step", "rho_margin")})
    print(f"\npreference distinguishability ({args.pooling} {'answer-token' if args.pooling == 'mean' else 'last'}"
          f" hidden state, layer {args.layer}), most distinguishable first = predicted to be learned first:\n")
    print(rep.report_table(predicted, speed, args.threshold))
    if speed:
        print(f"\nobserved from {source} reward accuracy in {args.run}: Spearman rho(distinguishability, accuracy "
              f"AUC) = {report['rho_auc']:.2f}; rho(distinguishability, -learning step) = "
              f"{report['rho_learning_step']:.2f}; rho(distinguishability, mean margin) = {report['rho_margin']:.2f}"
              "  (+1: learned exactly in the predicted order)")
        pngs = [rep.plot_accuracy_curves(speed, os.path.join(out_dir, "accuracy_per_group.png"), args.threshold,
                                         f"{source} reward accuracy per group ({args.run})"),
                rep.plot_speed_vs_distinguishability(predicted, speed, os.path.join(out_dir,
                                                                                    "speed_vs_distinguishability.png"))]
        for p in filter(None, pngs):
            print(f"plot: {p}")
    if flip:
        report["flip"] = _flip(args, flip, model, tok, embedded, out_dir)
    with open(os.path.join(out_dir, "diagnose.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\nreport: {os.path.join(out_dir, 'diagnose.json')}")
    return 0


def register(sub):
    p = sub.add_parser("diagnose", help="predict which behaviours preference data teaches first "
                       "(distinguishability); compare with a run",
                       description="Before training: each group's preference distinguishability (Im and Li, 2024), "
                       "the predicted learning order. With --run: observed learning speed per group from the run's "
                       "metrics.jsonl, the rank correlation with the prediction, and PNGs. With --flip-group: how "
                       "fast the base and the aligned model learn the group's reversed preference.")
    p.add_argument("--model", help="the model training starts from (save_pretrained folder; default: embedded tiny)")
    p.add_argument("--data", help="preference .json/.jsonl (default: the embedded persona data's train split)")
    p.add_argument("--eval-data", dest="eval_data", help="held-out pairs for --flip-group (default: --data's)")
    p.add_argument("--run", help="a training run's output_dir (reads its metrics.jsonl; final/ is the aligned model)")
    p.add_argument("--group-column", dest="group_column", default="behaviour",
                   help="the data column naming each pair's group (default behaviour)")
    p.add_argument("--layer", type=int, default=-1, help="hidden state to measure (-1: final)")
    p.add_argument("--pooling", choices=("mean", "last"), default="mean", help="mean over answer tokens or last token")
    p.add_argument("--threshold", type=accuracy_threshold, default=0.8,
                   help="reward accuracy in (0, 1] at which a group counts as learned (default 0.8)")
    p.add_argument("--n-bootstrap", dest="n_bootstrap", type=nonnegative_int, default=1000,
                   help="bootstrap resamples of the pairs for each confidence interval (default 1000)")
    p.add_argument("--batch-size", dest="batch_size", type=positive_int, default=16,
                   help="pairs embedded at once (default 16)")
    p.add_argument("--max-length", dest="max_length", type=positive_int, default=512,
                   help="tokens of prompt + answer kept, as the trainers truncate (default 512)")
    p.add_argument("--max-prompt-length", dest="max_prompt_length", type=positive_int, default=256,
                   help="tokens of the prompt kept (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")
    p.add_argument("--output-dir", dest="output_dir", help="where PNGs and diagnose.json go (default: "
                   f"<run>/diagnose with --run, else ./{DEFAULT_OUTPUT_DIR}/); held by one run at a time, and a "
                   "folder holding an earlier report is refused unless --overwrite-output-dir")
    add_overwrite_flag(p, REPORT_FILES)
    p.add_argument("--flip-group", dest="flip_group", help="train on this group's swapped pairs from the base and "
                   "the aligned model; report the steps each takes to reach the flipped preference")
    p.add_argument("--aligned", help="the aligned model for --flip-group (default: <run>/final)")
    p.add_argument("--flip-steps", dest="flip_steps", type=positive_int, default=60,
                   help="DPO steps of each --flip-group run at most (default 60)")
    p.add_argument("--flip-eval-every", dest="flip_eval_every", type=positive_int, default=5,
                   help="steps between held-out evaluations of the flipped pairs (default 5)")
    p.add_argument("--flip-learning-rate", dest="flip_learning_rate", type=positive_float, default=None,
                   help="learning rate of the --flip-group runs (default: the embedded model's, else 1e-6)")
    p.set_defaults(func=cmd_diagnose)
