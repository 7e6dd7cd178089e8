"""`fastalign weights`: write a preference dataset with clone-robust pair weights in a `weight` column."""
import os

from fastalign.cli.inputs import nonnegative_int, positive_int


def _same_file(a, b):
    return os.path.realpath(a) == os.path.realpath(b) or (
        os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def cmd_weights(args):
    import warnings

    from fastalign.clone_robust_train import alternative_weights, pair_weights
    from fastalign.cli.common import load_model
    from fastalign.data import byte_tokenizer, load_rows, tokenize_pairs_with_positions, validate_rows
    from fastalign.data.loading import locations
    from fastalign.generation import check_output_path, write_jsonl
    if _same_file(args.out, args.data):
        raise ValueError(f"--out {args.out} is the --data file: writing would replace the input (and a second run "
                         "would multiply the weights again); write the weighted rows to a new file")
    check_output_path(args.out, True, "--out")  # a folder, or a folder that cannot be written: before any work
    rows = load_rows(args.data)
    checked = validate_rows(rows, "preference", name=args.data)  # one normalized row per row
    encoder = args.encoder
    if args.model:
        model, tok, _ = load_model("dpo", args.model)
        encoder = encoder or "model"
    else:
        model, tok = None, byte_tokenizer()
        encoder = encoder or "ngram"
        if encoder == "model":
            raise FileNotFoundError("--encoder model needs --model DIR (a local save_pretrained folder)")
    examples, positions = tokenize_pairs_with_positions(checked, tok, args.max_length, args.max_prompt_length,
                                                        name=args.data)
    from tqdm.auto import tqdm

    def progress(it, desc):
        return tqdm(it, desc=desc, leave=False)
    weights, seqs, chosen, rejected = alternative_weights(
        examples, encoder=encoder, model=model, tokenizer=tok, group_by=args.group_by, dim=args.dim,
        num_samples=args.num_samples, seed=args.seed, progress=progress)
    pw = pair_weights(weights, chosen, rejected).tolist()
    # line the weights up with the rows: a row that tokenization dropped has no pair weight
    weighted = {pos: (w, float(weights[c]), float(weights[rj]))
                for pos, w, c, rj in zip(positions, pw, chosen.tolist(), rejected.tolist())}
    written = []
    for i, (r, c) in enumerate(zip(rows, checked)):
        out = dict(r)
        out["weight"] = c.get("weight", 1.0)  # a dropped row keeps its own weight (1 without one)
        if i in weighted:
            w, out["chosen_weight"], out["rejected_weight"] = weighted[i]
            out["weight"] *= w
        written.append(out)
    write_jsonl(args.out, written)  # whole, then renamed: no half-written --out
    kept = len(weighted)
    if kept < len(rows):
        where = [w for i, w in enumerate(locations(rows)) if i not in weighted]
        warnings.warn(f"{len(rows) - kept} of {len(rows)} pair(s) were dropped in tokenization (max_length="
                      f"{args.max_length}, max_prompt_length={args.max_prompt_length}) and are written unchanged, "
                      "with their original weight and no chosen_weight/rejected_weight: training at these lengths "
                      "drops them too, so they took no part in the clone-robust weights of the other rows; raise "
                      f"--max-length/--max-prompt-length to weight them ({', '.join(where[:5])}"
                      f"{' ...' if len(where) > 5 else ''})", UserWarning)
    print(f"wrote {len(rows)} rows to {args.out}: {kept} with clone-robust weights ({len(seqs)} distinct answers, "
          f"encoder {encoder}, groups by {args.group_by}; pair weight = w(chosen) * w(rejected), mean 1 over "
          f"the weighted rows; min {min(pw):.3g}, max {max(pw):.3g})"
          + (f", {len(rows) - kept} dropped in tokenization and left unweighted" if kept < len(rows) else ""))
    return 0


def register(sub):
    p = sub.add_parser("weights", help="add clone-robust pair weights (a `weight` column) to preference data",
                       description="Each distinct answer gets its Voronoi weight among the answers of its prompt "
                       "(or of the whole dataset with --group-by none); each row's weight becomes "
                       "w(chosen) * w(rejected) (times any weight it had), scaled to mean 1. Pairs that "
                       "tokenization drops at --max-length/--max-prompt-length (training at those lengths drops "
                       "them too) take no part and are written unchanged, with their own weight (1 without one); a "
                       "warning names them.")
    p.add_argument("--data", required=True, help=".json/.jsonl preference data (prompt, chosen, rejected)")
    p.add_argument("--out", required=True, help="output .jsonl (a new file: not --data)")
    p.add_argument("--model", help="local save_pretrained folder: embed answers with its final hidden state")
    p.add_argument("--encoder", help="'model', 'ngram' (default without --model) or a sentence-transformers folder")
    p.add_argument("--group-by", dest="group_by", choices=("prompt", "none"), default="prompt",
                   help="answers compete within their prompt, or across the dataset (default prompt)")
    p.add_argument("--dim", type=nonnegative_int, default=8, help="principal components kept before the Voronoi search")
    p.add_argument("--num-samples", dest="num_samples", type=positive_int, default=100_000,
                   help="uniform samples of each group's box in the Voronoi estimate (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples: the same seed, the same weights (default 0)")
    p.add_argument("--max-length", dest="max_length", type=positive_int, default=512,
                   help="tokens of prompt + answer kept (default 512)")
    p.add_argument("--max-prompt-length", dest="max_prompt_length", type=positive_int, default=256,
                   help="tokens of the prompt kept (default 256)")
    p.set_defaults(func=cmd_weights)
