"""How clone-robust weights behave as the embedding dimension grows (chooses the trainers' default dim).

Alternatives: every distinct answer sequence of the embedded persona data (train + test), embedded by the
trainers' default encoder (the embedded tiny model's final hidden state, mean over answer tokens), all in one
group, projected onto their top d principal components. For each d: normalized entropy H(w) / log M (1 =
uniform), the share of alternatives starved to under 1/(10 M), the weight held by the top 5% of alternatives,
and the Spearman rank correlation with the d = 2 weights. JSON + PNG in bench/results/.

    python bench/clone_robust_dims.py [--samples 100000]
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import RESULTS, environment  # noqa: E402
from fastalign.clone_robust import clone_robust_weights  # noqa: E402
from fastalign.clone_robust_train import alternatives_of, model_embeddings  # noqa: E402
from fastalign.data import (DEFAULT_PREFERENCES, default_model_and_tokenizer, load_rows,  # noqa: E402
                            tokenize_preference_rows)


def spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--dims", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    args = p.parse_args(argv)
    model, tok = default_model_and_tokenizer(seed=0)
    rows = load_rows(DEFAULT_PREFERENCES, "train") + load_rows(DEFAULT_PREFERENCES, "test")
    seqs, _, _, _ = alternatives_of(tokenize_preference_rows(rows, tok, 96, 64))
    emb = model_embeddings(model, seqs, tok.pad_token_id).double()
    m = emb.shape[0]
    results, ref = [], None
    for d in args.dims:
        w = clone_robust_weights(emb, num_samples=args.samples, dim=d).double()
        if d == 2:
            ref = w
        nz = w[w > 0]
        top = w.sort(descending=True).values[: max(1, m // 20)].sum()
        results.append(dict(d=d, entropy=float(-(nz * nz.log()).sum() / math.log(m)),
                            starved=float((w < 1 / (10 * m)).double().mean()), top5pct=float(top), weights=w))
        print(f"d={d:>3}: normalized entropy {results[-1]['entropy']:.3f}, starved {results[-1]['starved']:.3f}, "
              f"top 5% hold {results[-1]['top5pct']:.3f}", flush=True)
    for r in results:
        r["spearman_vs_d2"] = spearman(r.pop("weights"), ref) if ref is not None else None
    print("| d | H(w)/log M | starved (< 1/10M) | top 5% weight | Spearman vs d=2 |\n|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['d']} | {r['entropy']:.3f} | {r['starved']:.3f} | {r['top5pct']:.3f} | "
              f"{r['spearman_vs_d2'] if r['spearman_vs_d2'] is None else round(r['spearman_vs_d2'], 3)} |")
    env = environment()
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"clone_robust_dims-{env['date'][:10]}")
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "alternatives": m, "samples": args.samples, "results": results}, f, indent=2)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ds = [r["d"] for r in results]
    for key, label in (("entropy", "H(w) / log M"), ("starved", "share starved (w < 1/10M)"),
                       ("top5pct", "weight of top 5%"), ("spearman_vs_d2", "Spearman vs d=2")):
        ax.plot(ds, [r[key] for r in results], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("PCA dimension d")
    ax.set_title(f"clone-robust weights vs d ({m} persona answers, S={args.samples})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=100)
    print("wrote", stem + ".json", stem + ".png")


if __name__ == "__main__":
    main()
