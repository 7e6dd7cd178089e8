"""`fastalign weights`: write a preference dataset with clone-robust pair weights in a `weight` column."""
import json
import os


def cmd_weights(args):
    from fastalign.clone_robust_train import alternative_weights, pair_weights
    from fastalign.cli.common import load_model
    from fastalign.data import load_rows, tokenize_preference_rows, validate_rows, byte_tokenizer
    rows = load_rows(args.data)
    validate_rows(rows, "preference")
    encoder = args.encoder
    if args.model:
        model, tok, _ = load_model("dpo", args.model)
        encoder = encoder or "model"
    else:
        model, tok = None, byte_tokenizer()
        encoder = encoder or "ngram"
        if encoder == "model":
            raise FileNotFoundError("--encoder model needs --model DIR (a local save_pretrained folder)")
    examples = tokenize_preference_rows(rows, tok, args.max_length, args.max_prompt_length)
    from tqdm.auto import tqdm

    def progress(it, desc):
        return tqdm(it, desc=desc, leave=False)
    weights, seqs, chosen, rejected = alternative_weights(
        examples, encoder=encoder, model=model, tokenizer=tok, group_by=args.group_by, dim=args.dim,
        num_samples=args.num_samples, seed=args.seed, progress=progress)
    pw = pair_weights(weights, chosen, rejected).tolist()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        for r, w, c, rj in zip(rows, pw, chosen.tolist(), rejected.tolist()):
            out = dict(r)
            out["weight"] = float(r.get("weight", 1.0)) * w
            out["chosen_weight"], out["rejected_weight"] = float(weights[c]), float(weights[rj])
            f.write(json.dumps(out) + "\n")
    print(f"wrote {len(rows)} rows with clone-robust weights to {args.out} ({len(seqs)} distinct answers, "
          f"encoder {encoder}, groups by {args.group_by}; pair weight = w(chosen) * w(rejected), mean 1; "
          f"min {min(pw):.3g}, max {max(pw):.3g})")
    return 0


def register(sub):
    p = sub.add_parser("weights", help="add clone-robust pair weights (a `weight` column) to preference data",
                       description="Each distinct answer gets its Voronoi weight among the answers of its prompt "
                       "(or of the whole dataset with --group-by none); each row's weight becomes "
                       "w(chosen) * w(rejected) (times any weight it had), scaled to mean 1.")
    p.add_argument("--data", required=True, help=".json/.jsonl preference data (prompt, chosen, rejected)")
    p.add_argument("--out", required=True, help="output .jsonl")
    p.add_argument("--model", help="local save_pretrained folder: embed answers with its final hidden state")
    p.add_argument("--encoder", help="'model', 'ngram' (default without --model) or a sentence-transformers folder")
    p.add_argument("--group-by", dest="group_by", choices=("prompt", "none"), default="prompt",
                   help="answers compete within their prompt, or across the dataset (default prompt)")
    p.add_argument("--dim", type=int, default=8, help="principal components kept before the Voronoi search")
    p.add_argument("--num-samples", dest="num_samples", type=int, default=100_000,
                   help="uniform samples of each group's box in the Voronoi estimate (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples: the same seed, the same weights (default 0)")
    p.add_argument("--max-length", dest="max_length", type=int, default=512,
                   help="tokens of prompt + answer kept (default 512)")
    p.add_argument("--max-prompt-length", dest="max_prompt_length", type=int, default=256,
                   help="tokens of the prompt kept (default 256)")
    p.set_defaults(func=cmd_weights)
