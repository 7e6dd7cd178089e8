"""`fastalign merge` (streaming average / HMA of two checkpoints) and `fastalign tax` (the alignment-tax curve)."""
import argparse
import os

from fastalign.cli.inputs import (add_overwrite_flag, nonnegative_int, positive_float, positive_int,
                                   unit_interval)


def parse_grid(text):
    """"0,0.25,0.5" or an arithmetic progression written "0,0.1,...,1" (start, second value, ..., end: the end
    must lie on the progression and is included) -> list of weights on pre, each in [0, 1]."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    usage = f"expected numbers separated by commas, e.g. 0,0.5,1 or 0,0.1,...,1; got {text!r}"
    try:
        if "..." in parts:
            if parts.index("...") != 2 or len(parts) != 4:
                raise ValueError
            a, b, end = float(parts[0]), float(parts[1]), float(parts[3])
            step = b - a
            if not step > 0 or not end >= b:
                raise argparse.ArgumentTypeError(f"{usage} (a progression needs start < second value <= end)")
            n = round((end - a) / step)
            if abs(a + n * step - end) > 1e-9 * max(1.0, abs(end)):
                raise argparse.ArgumentTypeError(
                    f"{text!r}: the end {parts[3]} is not on the progression {parts[0]}, {parts[1]}, ... (step "
                    f"{step:g} reaches {a + int((end - a) / step) * step:g}, then "
                    f"{a + (int((end - a) / step) + 1) * step:g}); choose a step that divides end - start, or "
                    "list the values")
            values = [round(a + j * step, 10) for j in range(n + 1)]
        else:
            values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(usage) from None
    if not values:
        raise argparse.ArgumentTypeError(usage)
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"grid values are weights on the pre-alignment model, each in [0, 1]; "
                                         f"got {', '.join(f'{v:g}' for v in bad)} in {text!r}")
    return values


def _ratios(text):
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.2,0.3,0.4, got {text!r}") from None


def _load_causal_lm(path, role):
    from fastalign.model_folders import load_model_folder
    return load_model_folder(path, f"--{role}", "causal-lm")


def _tokenizer(path):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def cmd_merge(args):
    from fastalign.merge import check_merge_output, streaming_merge
    ratios, groups = args.ratios, args.hma
    # everything that can be refused is refused before the (minutes long) ratio fit
    check_merge_output(args.pre, args.post, args.out, overwrite=args.overwrite)
    if ratios and groups and len(ratios) != groups:
        raise ValueError(f"--hma {groups} needs {groups} ratios, got {len(ratios)}: {ratios}")
    if args.fit_data:
        if not groups:
            raise ValueError("--fit-data fits HMA ratios: also pass --hma K (the number of layer groups)")
        if ratios:
            raise ValueError("pass either --ratios or --fit-data, not both")
        from fastalign.averaging import fit_hma_ratios
        pre, post = _load_causal_lm(args.pre, "pre"), _load_causal_lm(args.post, "post")
        ratios = fit_hma_ratios(pre, post, args.fit_data, weight_on_pre=args.weight_on_pre, groups=groups,
                                steps=args.fit_steps, lr=args.fit_lr, tokenizer=_tokenizer(args.post))
        del pre, post
        print("fitted HMA ratios (weight on pre, bottom group first): " + ", ".join(f"{r:.4f}" for r in ratios))
    out = streaming_merge(args.pre, args.post, args.out, weight_on_pre=args.weight_on_pre, groups=groups,
                          ratios=ratios, overwrite=args.overwrite)
    print(f"merged model written to {out}")
    return 0


TAX_OUTPUTS = ("tax.json", "tax.png")


def cmd_tax(args):
    from fastalign.cli.inputs import report_folder
    from fastalign.model_folders import load_model_folder, require_local_folder
    from fastalign.tax import alignment_tax, check_tax_data, markdown_table, plot_tax, write_json
    for option, path in (("--pre", args.pre), ("--post", args.post), ("--reward-model", args.reward_model)):
        if path is not None:
            require_local_folder(path, option)
    align_rows, general_rows = check_tax_data(args.align_data, args.general_data)
    with report_folder(args.output_dir, TAX_OUTPUTS, overwrite=args.overwrite_output_dir):
        pre, post = _load_causal_lm(args.pre, "pre"), _load_causal_lm(args.post, "post")
        tok = _tokenizer(args.post)
        rm = load_model_folder(args.reward_model, "--reward-model", "reward-model", tokenizer=tok) \
            if args.reward_model else None
        result = alignment_tax(pre, post, tok, align_rows, general_rows, grid=args.grid, beta=args.beta,
                               hma_groups=args.hma, fit_data=args.fit_data, fit_steps=args.fit_steps,
                               fit_lr=args.fit_lr, reward_model=rm, batch_size=args.batch_size)
        js = write_json(result, os.path.join(args.output_dir, "tax.json"))
        png = plot_tax(result, os.path.join(args.output_dir, "tax.png"),
                       y="reward_model_score" if rm is not None else "reward_accuracy")
    print(markdown_table(result))
    print(f"\nJSON: {js}" + (f"; plot: {png}" if png else " (install matplotlib for the plot)"))
    return 0


def register(sub):
    pm = sub.add_parser("merge", help="average two checkpoints tensor by tensor (plain or HMA), streaming",
                        description="theta = a * pre + (1 - a) * post with a = --weight-on-pre (the weight of the "
                        "PRE-alignment model), read and written one tensor at a time (peak memory near one tensor). "
                        "With --hma K, the layers form K groups with their own ratios (mean = --weight-on-pre).")
    pm.add_argument("--pre", required=True, help="checkpoint before alignment (save_pretrained folder)")
    pm.add_argument("--post", required=True, help="checkpoint after alignment (config and tokenizer are copied "
                    "from here)")
    pm.add_argument("--weight-on-pre", dest="weight_on_pre", type=unit_interval, required=True,
                    help="a in [0, 1]: 0 keeps the aligned model, 1 the pre-alignment model")
    pm.add_argument("--hma", type=positive_int, default=None, metavar="K", help="Heterogeneous Model Averaging "
                    "with K layer groups, at most the model's number of decoder blocks (default: plain averaging)")
    pm.add_argument("--ratios", type=_ratios, default=None, help="K comma-separated HMA ratios (weights on pre, "
                    "bottom group first; mean must equal --weight-on-pre)")
    pm.add_argument("--fit-data", dest="fit_data", default=None, help="fit the HMA ratios on this alignment data "
                    "(.jsonl: preference rows' chosen answers, or prompt/completion samples)")
    pm.add_argument("--fit-steps", dest="fit_steps", type=nonnegative_int, default=30,
                    help="steps of the ratio fit (default 30)")
    pm.add_argument("--fit-lr", dest="fit_lr", type=positive_float, default=0.05, help="learning rate of the ratio fit "
                    "(default 0.05)")
    pm.add_argument("--out", required=True, help="new output folder (written atomically)")
    pm.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    pm.set_defaults(func=cmd_merge)

    pt = sub.add_parser("tax", help="measure the alignment tax: alignment vs forgetting for a grid of averaging "
                        "ratios (JSON + PNG)",
                        description="For each weight on the pre-alignment model: held-out reward accuracy and margin "
                        "against the pre model (or a reward model's mean score) and general-text NLL, perplexity and "
                        "token accuracy; plain averaging, and fitted HMA with --hma K.")
    pt.add_argument("--pre", required=True, help="model before alignment (save_pretrained folder)")
    pt.add_argument("--post", required=True, help="model after alignment")
    pt.add_argument("--align-data", dest="align_data", required=True, help="held-out preference data (.jsonl)")
    pt.add_argument("--general-data", dest="general_data", required=True, help="held-out general text "
                    "(.jsonl rows with a 'text' field)")
    pt.add_argument("--grid", type=parse_grid, default=None, help="weights on pre in [0, 1], e.g. 0,0.5,1 or "
                    "0,0.1,...,1 (a progression: its end must lie on it and is included; default 0,0.1,...,1)")
    pt.add_argument("--hma", type=positive_int, default=None, metavar="K", help="also fit and evaluate HMA with K "
                    "groups (at most the model's number of decoder blocks)")
    pt.add_argument("--fit-data", dest="fit_data", default=None, help="data for the HMA fit (default: the chosen "
                    "answers of --align-data)")
    pt.add_argument("--fit-steps", dest="fit_steps", type=nonnegative_int, default=30,
                    help="steps of each HMA fit (default 30)")
    pt.add_argument("--fit-lr", dest="fit_lr", type=positive_float, default=0.05,
                    help="HMA fit learning rate (default 0.05)")
    pt.add_argument("--beta", type=positive_float, default=0.1, help="beta of the implicit reward, > 0 (default 0.1)")
    pt.add_argument("--reward-model", dest="reward_model", default=None, help="also score alignment with this reward "
                    "model (sequence classification, one label): its mean score of greedy answers is a column of the "
                    "table, the plot's y axis and reward_model_score in tax.json (the implicit-reward columns stay)")
    pt.add_argument("--batch-size", dest="batch_size", type=positive_int, default=16,
                    help="evaluation batch size (default 16)")
    pt.add_argument("--output-dir", dest="output_dir", default="runs/tax", help="where tax.json and tax.png go "
                    "(default runs/tax); held by one run at a time, and a folder holding an earlier tax.json is "
                    "refused unless --overwrite-output-dir")
    add_overwrite_flag(pt, TAX_OUTPUTS)
    pt.set_defaults(func=cmd_tax)
