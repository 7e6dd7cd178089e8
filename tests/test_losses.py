"""Losses against formulas written out independently here (float64), and fused modules against a naive
pipeline that materializes the logits."""

import pytest
import torch

import fastalign as fa
from tests.backends import cpu_backends
from tests.loss_cases import assert_grads_close, batch, grads, logsig, naive_dpo, naive_pair_logps
from tests.reference import reference_sequence_logprobs

BACKENDS = cpu_backends()


def pairs(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(b, generator=g, dtype=torch.float64) * 20 + 1) for _ in range(4)]


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_sigmoid_and_robust(eps):
    pc, pr, rc, rr = pairs()
    beta = 0.3
    h = (pc - rc) - (pr - rr)
    want = -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
    got = fa.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid", label_smoothing=eps)
    torch.testing.assert_close(got, want)
    want = (-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps)
    torch.testing.assert_close(fa.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps), want)


def test_dpo_hinge_and_ipo():
    pc, pr, rc, rr = pairs()
    beta = 0.5
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(fa.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge"),
                               torch.clamp(1 - beta * h, min=0))
    torch.testing.assert_close(fa.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo"), (h - 1 / (2 * beta)) ** 2)


def test_dpo_gradient_matches_closed_form():
    pc, pr, rc, rr = pairs()
    pc.requires_grad_()
    beta = 0.2
    fa.dpo_loss(pc, pr, rc, rr, beta=beta).sum().backward()
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(pc.grad, -beta * (1 - torch.sigmoid(beta * h.detach())))


def test_simpo_orpo_sft_weighted_bt():
    pc, pr, _, _ = pairs()
    avg_c, avg_r = pc / 10, pr / 7
    m = 2.0 * (avg_c - avg_r) - 0.5
    torch.testing.assert_close(fa.simpo_loss(avg_c, avg_r, beta=2.0, gamma=0.5, label_smoothing=0.1),
                               -0.9 * logsig(m) - 0.1 * logsig(-m))
    odds = lambda a: torch.exp(a) / (1 - torch.exp(a))  # noqa: E731
    ratio = torch.log(odds(avg_c)) - torch.log(odds(avg_r))
    torch.testing.assert_close(fa.orpo_loss(avg_c, avg_r, lam=0.25), -avg_c - 0.25 * logsig(ratio))
    n = torch.tensor([10, 7, 3, 1, 5, 2], dtype=torch.float64)
    torch.testing.assert_close(fa.sft_loss(pc, n), -pc.sum() / n.sum())
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.25], dtype=torch.float64)
    want = -(w * logsig(pc - pr)).sum() / w.sum()
    torch.testing.assert_close(fa.weighted_bt_loss(pc, pr, w), want)
    torch.testing.assert_close(fa.weighted_bt_loss(pc, pr), -logsig(pc - pr).mean())
    margins = torch.tensor([0.0, 1.0, 2.5, -1.0, 0.5, 3.0], dtype=torch.float64)  # TRL's reward-data margin column
    torch.testing.assert_close(fa.weighted_bt_loss(pc, pr, w, margins), -(w * logsig(pc - pr - margins)).sum() / w.sum())


def test_clone_robust_weights_neutralize_duplicates():
    """Weighted MLE: duplicating an alternative k times while giving each copy weight 1/k changes nothing."""
    c = torch.tensor([1.0, 0.2, -0.3], dtype=torch.float64)
    r = torch.tensor([0.0, 0.5, -1.0], dtype=torch.float64)
    base = fa.weighted_bt_loss(c, r)
    cloned = fa.weighted_bt_loss(torch.cat([c, c[:1].repeat(3)]), torch.cat([r, r[:1].repeat(3)]),
                                 torch.tensor([0.25, 1, 1, 0.25, 0.25, 0.25], dtype=torch.float64))
    torch.testing.assert_close(base, cloned)
    unweighted = fa.weighted_bt_loss(torch.cat([c, c[:1].repeat(3)]), torch.cat([r, r[:1].repeat(3)]))
    assert not torch.allclose(base, unweighted)


@pytest.mark.parametrize("call, match", [
    (lambda x: fa.dpo_loss(x, x, x, x, loss_type="kto"), "unknown loss_type 'kto'; valid: sigmoid, robust, hinge, ipo"),
    (lambda x: fa.dpo_loss(x, x, x, x, beta=0), "beta must be a positive finite number"),
    (lambda x: fa.dpo_loss(x, x, x, x, beta=-1), "beta must be a positive finite number"),
    (lambda x: fa.dpo_loss(x, x, x, x, label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    (lambda x: fa.dpo_loss(x, x, x, x, loss_type="hinge", label_smoothing=0.1), "has no meaning for loss_type='hinge'"),
    (lambda x: fa.dpo_loss(x, x[:2], x, x), "1-D tensors of one shape"),
    (lambda x: fa.weighted_bt_loss(x, x, -torch.ones(4)), "non-negative"),
    (lambda x: fa.weighted_bt_loss(x, x, torch.ones(3)), r"weights must have shape \(4,\)"),
    # all-zero weights and no labelled token are not errors: the empty case (loss 0), tests/test_edges.py
    (lambda x: fa.FusedDPOLoss(loss_type="dpo"), "unknown loss_type 'dpo'"),
    (lambda x: fa.FusedDPOLoss(rpo_alpha=0), "rpo_alpha must be a positive"),
    (lambda x: fa.FusedSimPOLoss(beta=0), "beta must be a positive"),
])
def test_bad_loss_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.zeros(4))


# ---- fused modules against a naive pipeline --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type, eps, rpo_alpha", [("sigmoid", 0.0, None), ("sigmoid", 0.2, None),
                                                        ("robust", 0.1, None), ("hinge", 0.0, None),
                                                        ("ipo", 0.0, None), ("sigmoid", 0.0, 0.5)])
def test_fused_dpo_matches_naive(backend, loss_type, eps, rpo_alpha):
    hidden, weight, labels, ref_hidden, ref_weight = batch()
    beta = 0.4
    fn = fa.FusedDPOLoss(beta=beta, loss_type=loss_type, label_smoothing=eps, rpo_alpha=rpo_alpha, backend=backend)
    got = grads(lambda h, w: fn(h, w, labels, ref_hidden=ref_hidden, ref_weight=ref_weight).loss, hidden, weight)
    want = grads(lambda h, w: naive_dpo(h.double(), w.double(), labels, ref_hidden.double(), ref_weight.double(),
                                        beta, loss_type, eps, rpo_alpha), hidden, weight)
    assert_grads_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_dpo_outputs_and_pair_weights(backend):
    hidden, weight, labels, ref_hidden, ref_weight = batch()
    fn = fa.FusedDPOLoss(beta=0.1, backend=backend)
    with torch.no_grad():
        ref_c, ref_r = fa.FusedDPOLoss(backend="torch").sequence_logps(ref_hidden, ref_weight, labels)[0].split(3)
    pw = torch.tensor([0.5, 2.0, 1.0])
    out = fn(hidden, weight, labels, ref_c, ref_r, pair_weights=pw)
    out2 = fn(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, pair_weights=pw)
    torch.testing.assert_close(out.loss, out2.loss, rtol=1e-5, atol=1e-5)
    want = naive_dpo(hidden.double(), weight.double(), labels, ref_hidden.double(), ref_weight.double(), 0.1,
                     "sigmoid", 0.0, None, w=pw.double())
    assert abs(out.loss.item() - want.item()) < 1e-5
    pc, pr, _, _ = naive_pair_logps(hidden, weight, labels)
    torch.testing.assert_close(out.chosen_logps.double(), pc, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.chosen_rewards, 0.1 * (out.chosen_logps - ref_c).detach())
    torch.testing.assert_close(out.reward_margins, out.chosen_rewards - out.rejected_rewards)
    assert torch.equal(out.reward_accuracies, (out.chosen_rewards > out.rejected_rewards).float())
    assert not out.chosen_rewards.requires_grad and out.losses.shape == (3,)
    assert out.chosen_n_tokens.tolist() == [1.0, 3.0, 6.0]


def test_label_smoothing_is_honoured_on_the_fused_path():
    """A peer's fused path silently dropped label_smoothing: ours must change the loss exactly as the formula says."""
    hidden, weight, labels, ref_hidden, ref_weight = batch()
    kw = dict(ref_hidden=ref_hidden, ref_weight=ref_weight)
    a = fa.FusedDPOLoss(beta=0.3, label_smoothing=0.0)(hidden, weight, labels, **kw)
    b = fa.FusedDPOLoss(beta=0.3, label_smoothing=0.25)(hidden, weight, labels, **kw)
    h = ((a.chosen_rewards - a.rejected_rewards) / 0.3).double()  # beta * h = margins
    want = (-(0.75) * logsig(0.3 * h) - 0.25 * logsig(-0.3 * h)).mean()
    assert abs(b.loss.item() - want.item()) < 1e-5 and abs(a.loss.item() - b.loss.item()) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_simpo_orpo_sft_match_naive(backend):
    hidden, weight, labels, _, _ = batch(seed=1)

    def naive_avgs(h, w):
        pc, pr, nc, nr = naive_pair_logps(h.double(), w.double(), labels)
        return pc / nc, pr / nr

    simpo = fa.FusedSimPOLoss(beta=2.0, gamma=0.3, backend=backend)
    got = grads(lambda h, w: simpo(h, w, labels).loss, hidden, weight)
    want = grads(lambda h, w: (lambda c, r: -logsig(2.0 * (c - r) - 0.3).mean())(*naive_avgs(h, w)), hidden, weight)
    assert_grads_close(got, want)

    orpo = fa.FusedORPOLoss(lam=0.2, backend=backend)
    got = grads(lambda h, w: orpo(h, w, labels).loss, hidden, weight)

    def naive_orpo(h, w):
        c, r = naive_avgs(h, w)
        lo = lambda a: a - torch.log(1 - torch.exp(a))  # noqa: E731
        return (-c - 0.2 * logsig(lo(c) - lo(r))).mean()
    assert_grads_close(got, grads(naive_orpo, hidden, weight))

    sft = fa.FusedSFTLoss(backend=backend)
    got = grads(lambda h, w: sft(h, w, labels).loss, hidden, weight)

    def naive_sft(h, w):
        seq, n = reference_sequence_logprobs(h.double(), w.double(), labels)
        return -seq.sum() / n.sum()
    assert_grads_close(got, grads(naive_sft, hidden, weight))


@pytest.mark.parametrize("call, exc, match", [
    (lambda m, h, w, l: m(h[:5], w, l[:5]), ValueError, "odd number: 5"),
    (lambda m, h, w, l: m(h, w, l[:, :4]), ValueError, r"labels must be \[rows, T\] = \(6, 9\)"),
    (lambda m, h, w, l: m(h, w, l), ValueError, "needs reference log-probs"),
    (lambda m, h, w, l: m(h, w, l, torch.zeros(3)), ValueError, "pass both ref_chosen_logps and ref_rejected_logps"),
    (lambda m, h, w, l: m(h, w, l, torch.zeros(2), torch.zeros(2)), ValueError, r"shape \[B\] = \(3,\)"),
    (lambda m, h, w, l: m(h, w, l, torch.zeros(3), torch.zeros(3), pair_weights=-torch.ones(3)), ValueError,
     "non-negative"),
    (lambda m, h, w, l: m(h, w, torch.where(torch.arange(6)[:, None] == 4, -100, l), torch.zeros(3), torch.zeros(3)),
     ValueError, "row 4 of labels has no labelled token"),
])
def test_fused_module_bad_input(call, exc, match):
    hidden, weight, labels, _, _ = batch()
    with pytest.raises(exc, match=match):
        call(fa.FusedDPOLoss(), hidden, weight, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_equal_padded(backend):
    """Padding-free layout: the same sequences packed into one row give the same losses and gradients."""
    hidden, weight, labels, ref_hidden, ref_weight = batch()
    lengths = [9, 6, 9, 9, 9, 5]   # rows 1 and 5 end in padding
    keep = torch.zeros(labels.shape, dtype=torch.bool)
    for i, n in enumerate(lengths):
        keep[i, :n] = True
    seq_index = torch.arange(6)[:, None].expand(6, 9)[keep][None]
    fn = fa.FusedDPOLoss(beta=0.2, backend=backend)

    def padded(h, w):
        return fn(h, w, labels, ref_hidden=ref_hidden, ref_weight=ref_weight).loss

    def packed(h, w):
        return fn(h[keep][None], w, labels[keep][None], ref_hidden=ref_hidden[keep][None], ref_weight=ref_weight,
                  sequence_index=seq_index, n_sequences=6).loss
    assert_grads_close(grads(packed, hidden, weight), grads(padded, hidden, weight), tol=1e-5)


def test_fused_loss_classes_still_import_from_losses_as_the_same_objects():
    from fastalign import fused_losses, losses
    for name in losses._MOVED_TO_FUSED_LOSSES:
        assert getattr(losses, name) is getattr(fused_losses, name), name
    with pytest.raises(AttributeError, match="has no attribute 'FusedNope'"):
        losses.FusedNope
