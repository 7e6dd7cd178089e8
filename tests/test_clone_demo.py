"""Evidence for the paper's claim on synthetic data with known structure: after cluster A is copied many
times (approximate clones), the standard regularized MLE moves the rewards of the other alternatives, the
weighted MLE with clone-robust weights barely does."""
from fastalign.clone_demo import alternatives, fit_rewards, run


def test_weighted_mle_is_robust_to_clones():
    res = run(copies=20, num_samples=20_000, backend="torch")
    assert res["standard"]["movement"] > 0.02          # the standard MLE is pulled by the clones
    assert res["weighted"]["movement"] < res["standard"]["movement"] / 10
    # the clones of A together keep about A's share of the space
    a = [i for i, lab in enumerate(res["labels"]) if lab == "A"]
    base_w = __import__("fastalign").clone_robust_weights(alternatives(3, 0)[0], num_samples=20_000,
                                                          backend="torch")
    assert abs(float(res["weights_after"][a].sum()) - float(base_w[:3].sum())) < 0.02


def test_fit_recovers_a_consistent_model():
    """Sanity of the fitting routine: with one annotator type (a Bradley-Terry model) and no regularization
    the fitted reward differences are the true ones."""
    import torch
    pts, _ = alternatives(2, 0)
    import fastalign.clone_demo as demo
    orig = demo.preference_probs

    def single(points, scale=4.0):
        pairs, _ = orig(points, scale)
        diff = points[pairs[:, 0]] - points[pairs[:, 1]]
        return pairs, torch.sigmoid(scale * diff[:, 0])
    demo.preference_probs = single
    try:
        r = fit_rewards(pts, lam=0.0)
    finally:
        demo.preference_probs = orig
    true = 4.0 * pts[:, 0]
    assert torch.allclose(r - r.mean(), true - true.mean(), atol=1e-4)


def test_demo_options_are_checked_when_parsed(capsys):
    import pytest

    from fastalign.clone_demo import main
    for argv, message in ((["--copies", "0"], "argument --copies: expected an integer >= 1, got '0'"),
                          (["--num-samples", "x"], "argument --num-samples: expected an integer, got 'x'")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
