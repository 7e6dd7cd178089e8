"""Clone-robustness on synthetic data with known structure (``make clone-demo``).

Alternatives lie in three clusters of the plane. Two annotator types, half the population each, score an
answer by its x or by its y coordinate, so the population's preference probabilities are not those of any
single Bradley-Terry model and the MLE's answer depends on which alternatives are in the data. Then cluster A
is copied many times with tiny noise (approximate clones). Rewards are fitted on all pairs with the
standard regularized MLE and with the weighted MLE (clone-robust Voronoi weights), before and after the
duplication; we report how much the reward differences among the other (B and C) alternatives move.
"""
import argparse
import itertools
import os

import torch

from fastalign.clone_robust import clone_robust_weights
from fastalign.losses import weighted_mle_loss

CENTRES = {"A": (0.0, 0.0), "B": (1.0, 0.2), "C": (0.2, 1.0)}


def alternatives(per_cluster=3, copies=0, noise=1e-3, seed=0):
    """points [M, 2] and cluster labels; the first 3 * per_cluster are the originals, then `copies` clones of A."""
    g = torch.Generator().manual_seed(seed)
    pts, labels = [], []
    for name, c in CENTRES.items():
        pts.append(torch.tensor(c, dtype=torch.float64) + 0.05 * torch.randn(per_cluster, 2, generator=g,
                                                                              dtype=torch.float64))
        labels += [name] * per_cluster
    a = pts[0]
    for i in range(copies):
        pts.append(a[i % per_cluster] + noise * torch.randn(1, 2, generator=g, dtype=torch.float64))
        labels.append("A")
    return torch.cat(pts), labels


def preference_probs(points, scale=4.0):
    """All ordered-once pairs [P, 2] and the population's fraction preferring the first: a 50/50 mixture of
    annotators whose reward is scale * x and scale * y."""
    pairs = torch.tensor(list(itertools.combinations(range(points.shape[0]), 2)), dtype=torch.int64)
    diff = points[pairs[:, 0]] - points[pairs[:, 1]]
    prob = 0.5 * torch.sigmoid(scale * diff[:, 0]) + 0.5 * torch.sigmoid(scale * diff[:, 1])
    return pairs, prob


def fit_rewards(points, weights=None, lam=1e-2, steps=200):
    pairs, prob = preference_probs(points)
    if weights is not None:
        weights = weights.to(torch.float64) * points.shape[0]  # scale so that lam means the same as unweighted
    r = torch.zeros(points.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([r], lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = weighted_mle_loss(r, pairs, weights=weights, prob=prob, lam=lam)
        loss.backward()
        return loss
    opt.step(closure)
    return r.detach()


def movement(before, after, others):
    """Mean absolute change of the reward differences r(x) - r(y) over pairs of the other alternatives
    (indices ``others``: the clusters that were not duplicated). Differences, because rewards are defined up
    to a constant."""
    d0 = before[others, None] - before[None, others]
    d1 = after[others, None] - after[None, others]
    return float((d1 - d0).abs().sum() / (len(others) * (len(others) - 1)))


def run(copies=30, per_cluster=3, num_samples=200_000, backend="auto"):
    base, _ = alternatives(per_cluster, 0)
    cloned, labels = alternatives(per_cluster, copies)
    n = base.shape[0]
    w_base = clone_robust_weights(base, num_samples=num_samples, backend=backend)
    w_cloned = clone_robust_weights(cloned, num_samples=num_samples, backend=backend)
    others = [i for i in range(n) if labels[i] != "A"]
    result = {"copies": copies, "n_original": n}
    for name, wb, wc in (("standard", None, None), ("weighted", w_base, w_cloned)):
        before, after = fit_rewards(base, wb), fit_rewards(cloned, wc)
        a_idx = [i for i, lab in enumerate(labels) if lab == "A"]
        wa = torch.ones(len(a_idx), dtype=torch.float64) if wc is None else wc[a_idx].double()
        a_mean = float((after[a_idx] * wa).sum() / wa.sum() - after[others].mean())
        result[name] = {"before": before, "after": after[:n], "movement": movement(before, after, others),
                        "a_cluster_after": a_mean,
                        "a_cluster_before": float(before[:n][[i for i in range(n) if i not in others]].mean()
                                                  - before[others].mean())}
    result["ratio"] = result["standard"]["movement"] / max(result["weighted"]["movement"], 1e-12)
    result["labels"], result["weights_after"] = labels, w_cloned
    return result


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = result["n_original"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, name in zip(axes, ("standard", "weighted")):
        r = result[name]
        others = [i for i in range(n) if result["labels"][i] != "A"]
        b, a = r["before"] - r["before"][others].mean(), r["after"] - r["after"][others].mean()
        x = torch.arange(n)
        ax.bar(x - 0.2, b, 0.4, label="before duplication")
        ax.bar(x + 0.2, a, 0.4, label=f"after {result['copies']} clones of cluster A")
        ax.set_xticks(x.tolist(), [f"{result['labels'][i]}{i}" for i in range(n)])
        ax.set_title(f"{name} MLE: reward differences move {r['movement']:.3f}")
    axes[0].set_ylabel("learned reward - mean reward of B and C")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"clone-robustness: weighted MLE moves {result['ratio']:.1f}x less")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from fastalign.cli.inputs import positive_int
    p.add_argument("--copies", type=positive_int, default=30, help="copies of cluster A added (>= 1; default 30)")
    p.add_argument("--num-samples", type=positive_int, default=200_000,
                   help="uniform samples of the Voronoi estimate (default 200000)")
    p.add_argument("--out", default="runs/clone_demo.png", help="the PNG (default runs/clone_demo.png)")
    args = p.parse_args(argv)
    res = run(copies=args.copies, num_samples=args.num_samples)
    n = res["n_original"]
    print(f"{n} original alternatives in clusters A, B, C; cluster A then copied {res['copies']} times (noise 1e-3)")
    print(f"{'alternative':>12} {'std before':>11} {'std after':>10} {'wtd before':>11} {'wtd after':>10}")
    for i in range(n):
        s, w = res["standard"], res["weighted"]
        print(f"{res['labels'][i] + str(i):>12} {float(s['before'][i]):11.3f} {float(s['after'][i]):10.3f} "
              f"{float(w['before'][i]):11.3f} {float(w['after'][i]):10.3f}")
    print("an original A point inside its cloud of clones keeps almost none of its cell (the clones share it), so "
          "its own reward is barely constrained in the weighted MLE; the A cluster as a whole (weighted mean "
          "reward, relative to the mean of B and C):")
    for name in ("standard", "weighted"):
        r = res[name]
        print(f"  {name:>8} MLE: A cluster {r['a_cluster_before']:.3f} before, {r['a_cluster_after']:.3f} after")
    print(f"mean |change| of reward differences among the B and C alternatives: standard MLE "
          f"{res['standard']['movement']:.4f}, weighted MLE {res['weighted']['movement']:.4f} "
          f"(ratio {res['ratio']:.1f}x)")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    plot(res, args.out)
    print("wrote", args.out)
    return res


if __name__ == "__main__":
    main()
