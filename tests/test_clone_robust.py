"""clone_robust_weights (worked examples, groups, duplicates, flat dimensions, bad input, seeds) and
weighted_mle_loss against a float64 rewrite (values and gradients)."""
import math

import pytest
import torch

import fastalign as fa
from tests.backends import cpu_backends

FAST = cpu_backends()
COMPILED = [b for b in FAST if b != "triton"]  # the interpreter is slow: big sample counts on torch/cpp only


def _close(w, want, tol):
    assert w.dtype == torch.float32
    assert torch.allclose(w.double(), torch.tensor(want, dtype=torch.float64), atol=tol), (w, want)


@pytest.mark.parametrize("backend", COMPILED)
def test_worked_examples(backend):
    w = fa.clone_robust_weights(torch.tensor([[0.0], [0.2], [1.0]]), num_samples=100_000, backend=backend)
    _close(w, [0.1, 0.5, 0.4], 0.01)
    w = fa.clone_robust_weights(torch.tensor([[0.0], [0.2], [0.2001], [1.0]]), num_samples=100_000, backend=backend)
    _close(w[[0, 3]], [0.1, 0.4], 0.01)
    assert abs(float(w[1] + w[2]) - 0.5) < 0.01
    square = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.5, 0.5]])
    w = fa.clone_robust_weights(square, num_samples=100_000, backend=backend)
    _close(w, [0.125] * 4 + [0.5], 0.01)


@pytest.mark.parametrize("backend", FAST)
def test_backends_give_the_same_weights(backend):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 5, generator=g)
    groups = torch.tensor([0, 1, 2] * 8)
    w = fa.clone_robust_weights(x, num_samples=256, groups=groups, backend=backend)
    ref = fa.clone_robust_weights(x, num_samples=256, groups=groups, backend="torch")
    assert torch.equal(w, ref)


def test_groups_each_sum_to_one_and_are_independent():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g)
    groups = torch.randint(0, 4, (30,), generator=g) * 10 - 5  # arbitrary, unsorted labels
    w = fa.clone_robust_weights(x, num_samples=2000, groups=groups, backend="torch")
    for label in groups.unique():
        sel = groups == label
        assert abs(float(w[sel].sum()) - 1.0) < 1e-5
        alone = fa.clone_robust_weights(x[sel], num_samples=2000, groups=groups[sel], backend="torch")
        assert torch.equal(alone, w[sel])  # a group's samples depend only on the seed and its own label


def test_exact_duplicates_share_their_cell_equally():
    x = torch.tensor([[0.0], [0.2], [0.2], [0.2], [1.0]])
    w = fa.clone_robust_weights(x, num_samples=20_000, backend="torch")
    assert w[1] == w[2] == w[3]
    assert abs(float(w[1:4].sum()) - 0.5) < 0.02
    once = fa.clone_robust_weights(x[[0, 1, 4]], num_samples=20_000, backend="torch")
    assert torch.allclose(w[[0, 4]], once[[0, 2]]) and torch.allclose(w[1:4].sum(), once[1])


def test_all_copies_of_one_point():
    w = fa.clone_robust_weights(torch.ones(4, 3), num_samples=10, backend="torch")
    assert torch.allclose(w, torch.full((4,), 0.25))


def test_flat_dimension_is_dropped():
    line = torch.tensor([[0.0], [0.2], [1.0]])
    flat = torch.cat([line, torch.full((3, 1), 7.0)], 1)
    w_line = fa.clone_robust_weights(line, num_samples=5000, backend="torch")
    w_flat = fa.clone_robust_weights(flat, num_samples=5000, backend="torch")
    assert torch.isfinite(w_flat).all()
    assert torch.allclose(w_line, w_flat, atol=0.02)


def test_explicit_bounds():
    x = torch.tensor([[0.25], [0.75]])
    w = fa.clone_robust_weights(x, num_samples=20_000, bounds=(torch.tensor([0.0]), torch.tensor([2.0])),
                                backend="torch")
    _close(w, [0.25, 0.75], 0.01)


def test_dim_projects_onto_principal_components():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(50, 1, generator=g)
    x = t @ torch.randn(1, 40, generator=g) + 1e-6 * torch.randn(50, 40, generator=g)  # a line in 40-d
    w = fa.clone_robust_weights(x, num_samples=5000, dim=1, backend="torch")
    w_line = fa.clone_robust_weights(t, num_samples=5000, backend="torch")
    assert (w - w_line).abs().max() < 0.02


def test_seed_determinism():
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    a = fa.clone_robust_weights(x, num_samples=500, seed=7, backend="torch")
    b = fa.clone_robust_weights(x, num_samples=500, seed=7, backend="torch")
    c = fa.clone_robust_weights(x, num_samples=500, seed=8, backend="torch")
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(embeddings=torch.zeros(1, 2)), ValueError, "M = 2"),
    (dict(embeddings=torch.tensor([[0.0], [float("nan")]])), ValueError, "NaN"),
    (dict(embeddings=torch.tensor([[0.0], [float("inf")]])), ValueError, "Inf"),
    (dict(embeddings=torch.zeros(3, 0)), ValueError, "d = 0"),
    (dict(embeddings=torch.zeros(3, 2, 2)), ValueError, "embeddings"),
    (dict(num_samples=0), ValueError, "num_samples"),
    (dict(num_samples=1.5), TypeError, "num_samples"),
    (dict(bounds=(torch.zeros(2), torch.tensor([1.0, 0.0]))), ValueError, "low < high"),
    (dict(bounds=(torch.zeros(3), torch.ones(3))), ValueError, "bounds"),
    (dict(bounds="sphere"), TypeError, "bounds"),
    (dict(groups=torch.zeros(3, dtype=torch.long)), ValueError, "groups"),
    (dict(groups=torch.tensor([0, 0, 0, 1])), ValueError, "one"),
    (dict(groups=torch.zeros(4)), TypeError, "groups"),
    (dict(dim=0), ValueError, "dim"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_input(kwargs, exc, words):
    args = dict(embeddings=torch.rand(4, 2), num_samples=10, backend="torch")
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        fa.clone_robust_weights(args.pop("embeddings"), **args)


# ---- the weighted MLE ------------------------------------------------------------------------------------

def reference_weighted_mle(rewards, pairs, weights, prob, lam):
    """Float64 loop over pairs, written from the formula in the issue (not from the implementation)."""
    total = 0.0
    for k, (a, b) in enumerate(pairs.tolist()):
        d = float(rewards[a] - rewards[b])
        p = 1.0 if prob is None else float(prob[k])
        wa, wb = (1.0, 1.0) if weights is None else (float(weights[a]), float(weights[b]))
        total -= wa * wb * (p * -math.log1p(math.exp(-d)) + (1 - p) * -math.log1p(math.exp(d)))
    ws = [1.0] * len(rewards) if weights is None else weights.tolist()
    return total + lam / 2 * sum(w * float(r) ** 2 for w, r in zip(ws, rewards))


@pytest.mark.parametrize("use_weights,use_prob,lam", [(False, False, 0.0), (True, False, 0.5), (True, True, 2.0),
                                                      (False, True, 0.1)])
def test_weighted_mle_loss_matches_float64(use_weights, use_prob, lam):
    g = torch.Generator().manual_seed(0)
    m, p = 9, 20
    rewards = torch.randn(m, dtype=torch.float64, generator=g, requires_grad=True)
    pairs = torch.randint(0, m, (p, 2), generator=g)
    weights = torch.rand(m, dtype=torch.float64, generator=g) if use_weights else None
    prob = torch.rand(p, dtype=torch.float64, generator=g) if use_prob else None
    loss = fa.weighted_mle_loss(rewards, pairs, weights=weights, prob=prob, lam=lam)
    want = reference_weighted_mle(rewards.detach(), pairs, weights, prob, lam)
    assert abs(float(loss.detach()) - want) < 1e-10
    (grad,) = torch.autograd.grad(loss, rewards)
    eps = 1e-6
    for i in range(m):  # central differences of the float64 reference
        e = torch.zeros(m, dtype=torch.float64)
        e[i] = eps
        num = (reference_weighted_mle(rewards.detach() + e, pairs, weights, prob, lam)
               - reference_weighted_mle(rewards.detach() - e, pairs, weights, prob, lam)) / (2 * eps)
        assert abs(float(grad[i]) - num) < 1e-6
    loss32 = fa.weighted_mle_loss(rewards.detach().float(), pairs, weights=None if weights is None else weights.float(),
                                  prob=None if prob is None else prob.float(), lam=lam)
    assert abs(float(loss32) - want) < 1e-4 * (1 + abs(want))


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(pairs=torch.tensor([[0, 3]])), ValueError, "pairs index"),
    (dict(pairs=torch.tensor([[-1, 0]])), ValueError, "pairs index"),
    (dict(pairs=torch.tensor([0, 1])), ValueError, r"\[P, 2\]"),
    (dict(pairs=torch.tensor([[0.0, 1.0]])), TypeError, "integer"),
    (dict(weights=torch.ones(2)), ValueError, "weights"),
    (dict(weights=-torch.ones(3)), ValueError, "weights"),
    (dict(prob=torch.tensor([1.5])), ValueError, "prob"),
    (dict(prob=torch.ones(2)), ValueError, "prob"),
    (dict(lam=-1.0), ValueError, "lam"),
    (dict(rewards=torch.zeros(3, 1)), TypeError, "rewards"),
])
def test_weighted_mle_loss_bad_input(kwargs, exc, words):
    args = dict(rewards=torch.zeros(3), pairs=torch.tensor([[0, 1]]))
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        fa.weighted_mle_loss(args.pop("rewards"), args.pop("pairs"), **args)


def test_projection_falls_back_to_svd_when_eigh_does_not_converge(monkeypatch):
    """MKL's eigh can fail on a [d, d] matrix with many repeated zero eigenvalues (few points, many dimensions):
    the SVD fallback gives the same components (up to sign), padded with zeros when M < dim."""
    from fastalign.clone_robust import project
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3, 2, 1, 0.5, 0.1])
    expected = project(x, 2)

    def no_convergence(*a, **k):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", no_convergence)
    got = project(x, 2)
    signs = torch.sign((got * expected).sum(0))
    assert torch.allclose(got * signs, expected, atol=1e-10)
    assert project(x[:3], 4).shape == (3, 4)  # rank 2 after centring: components 3 and 4 are 0
