"""The gradient-in-forward losses (fastalign.fused_grad) against float64 references written in the tests:
values and gradients, several chunks (pairs larger than a chunk too), ignored tokens, softcap, temperature,
bias, pair weights (zero included), packed sequences, bf16/fp16; and the row passes alone on a tile."""
import pytest
import torch

import fastalign as fa
from fastalign.fused_grad import fused_linear_nll_loss, group_bounds
from tests.backends import cpu_backends
from tests.reference import reference_linear_logprobs, reference_sequence_logprobs
from tests.loss_cases import assert_grads_close, batch, grads, logsig, naive_dpo, naive_pair_logps

BACKENDS = [b for b in cpu_backends() if b in ("cpp", "torch")]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def test_rows_per_chunk():
    from fastalign.chunk_pass import CHUNK_ELEMENTS, MIN_CHUNK_ROWS, rows_per_chunk
    assert rows_per_chunk(32000) == 512 == CHUNK_ELEMENTS // 32000 // 64 * 64 >= MIN_CHUNK_ROWS
    assert rows_per_chunk(256000) == MIN_CHUNK_ROWS  # a large vocabulary keeps GEMMs thick enough
    assert rows_per_chunk(256000, 7) == 7


def test_group_bounds_keep_groups_whole():
    assert group_bounds([3, 4, 2, 9, 1], 7) == ((0, 7), (7, 9), (9, 18), (18, 19))
    assert group_bounds([], 5) == ()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type, eps, rpo_alpha", [("sigmoid", 0.0, None), ("robust", 0.1, None),
                                                        ("ipo", 0.0, None), ("sigmoid", 0.0, 0.5)])
def test_dpo_grad_in_forward_matches_reference(backend, dtype, loss_type, eps, rpo_alpha):
    hidden, weight, labels, ref_hidden, ref_weight = batch(dtype=dtype)
    pw = torch.tensor([0.5, 0.0, 2.0])  # a zero-weight pair contributes nothing
    fn = fa.FusedDPOLoss(beta=0.4, loss_type=loss_type, label_smoothing=eps, rpo_alpha=rpo_alpha, backend=backend,
                         grad_in_forward=True, chunk_rows=5)  # pairs of 7-12 tokens: several chunks, some too big
    got = grads(lambda h, w: fn(h, w, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                pair_weights=pw).loss, hidden, weight)
    want = grads(lambda h, w: naive_dpo(h.double(), w.double(), labels, ref_hidden.double(), ref_weight.double(),
                                        0.4, loss_type, eps, rpo_alpha, w=pw.double()), hidden, weight)
    assert_grads_close(got, want, tol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_grad_in_forward_outputs_equal_op_path(backend):
    hidden, weight, labels, ref_hidden, ref_weight = batch()
    kw = dict(ref_hidden=ref_hidden, ref_weight=ref_weight)
    h = hidden.clone().requires_grad_()
    a = fa.FusedDPOLoss(beta=0.1, backend=backend, grad_in_forward=True, chunk_rows=8)(h, weight, labels, **kw)
    b = fa.FusedDPOLoss(beta=0.1, backend=backend)(h, weight, labels, **kw)
    for name in ("loss", "losses", "chosen_logps", "rejected_logps", "chosen_rewards", "reward_margins",
                 "chosen_n_tokens", "rejected_n_tokens"):
        torch.testing.assert_close(getattr(a, name).detach(), getattr(b, name).detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(a.reward_accuracies, b.reward_accuracies)
    assert a.loss.requires_grad and not a.chosen_logps.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_simpo_orpo_sft_grad_in_forward_match_reference(backend):
    hidden, weight, labels, _, _ = batch(seed=1, dtype=torch.float64)

    def avgs(h, w):
        pc, pr, nc, nr = naive_pair_logps(h, w, labels)
        return pc / nc, pr / nr

    kw = dict(backend=backend, grad_in_forward=True, chunk_rows=6)
    simpo = fa.FusedSimPOLoss(beta=2.0, gamma=0.3, **kw)
    want = grads(lambda h, w: (lambda c, r: -logsig(2.0 * (c - r) - 0.3).mean())(*avgs(h, w)), hidden, weight)
    assert_grads_close(grads(lambda h, w: simpo(h, w, labels).loss, hidden, weight), want, tol=1e-10)
    orpo = fa.FusedORPOLoss(lam=0.2, **kw)

    def naive_orpo(h, w):
        c, r = avgs(h, w)
        lo = lambda a: a - torch.log(1 - torch.exp(a))  # noqa: E731
        return (-c - 0.2 * logsig(lo(c) - lo(r))).mean()
    assert_grads_close(grads(lambda h, w: orpo(h, w, labels).loss, hidden, weight),
                       grads(naive_orpo, hidden, weight), tol=1e-10)
    sft = fa.FusedSFTLoss(**kw)

    def naive_sft(h, w):
        seq, n = reference_sequence_logprobs(h, w, labels)
        return -seq.sum() / n.sum()
    assert_grads_close(grads(lambda h, w: sft(h, w, labels).loss, hidden, weight), grads(naive_sft, hidden, weight),
                       tol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_grad_in_forward_equals_padded(backend):
    hidden, weight, labels, ref_hidden, ref_weight = batch(dtype=torch.float64)
    lengths = [9, 6, 9, 9, 9, 5]
    keep = torch.zeros(labels.shape, dtype=torch.bool)
    for i, n in enumerate(lengths):
        keep[i, :n] = True
    seq_index = torch.arange(6)[:, None].expand(6, 9)[keep][None]
    fn = fa.FusedDPOLoss(beta=0.2, backend=backend, grad_in_forward=True, chunk_rows=4)
    padded = grads(lambda h, w: naive_dpo(h, w, labels, ref_hidden, ref_weight, 0.2, "sigmoid", 0.0, None),
                   hidden, weight)
    packed = grads(lambda h, w: fn(h[keep][None], w, labels[keep][None], ref_hidden=ref_hidden[keep][None],
                                   ref_weight=ref_weight, sequence_index=seq_index, n_sequences=6).loss,
                   hidden, weight)
    assert_grads_close(packed, padded, tol=1e-10)


def _reference_nll(h, w, y, b, tw, temperature, softcap, reduction):
    lp = reference_linear_logprobs(h, w, y, b, temperature=temperature, softcap=softcap)
    m = (y != -100).double()
    loss = -(tw * m * lp).sum()
    return loss / (tw * m).sum() if reduction == "mean" else loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5), (torch.bfloat16, 3e-2),
                                        (torch.float16, 1e-2)])
@pytest.mark.parametrize("softcap, temperature, with_bias, reduction", [(None, 1.0, False, "mean"),
                                                                         (4.0, 0.7, True, "sum")])
def test_nll_loss_matches_reference(backend, dtype, tol, softcap, temperature, with_bias, reduction):
    g = torch.Generator().manual_seed(3)
    n, hdim, v = 29, 12, 67
    h64 = torch.randn(n, hdim, generator=g, dtype=torch.float64)
    w64 = torch.randn(v, hdim, generator=g, dtype=torch.float64) * 0.4
    b64 = torch.randn(v, generator=g, dtype=torch.float64) if with_bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[::4] = -100
    tw = torch.rand(n, generator=g, dtype=torch.float64)
    leaves = [t.to(dtype).requires_grad_() for t in (h64, w64) + ((b64,) if with_bias else ())]
    loss = fused_linear_nll_loss(leaves[0], leaves[1], y, leaves[2] if with_bias else None, token_weights=tw,
                                 reduction=reduction, temperature=temperature, softcap=softcap, backend=backend,
                                 chunk_rows=8)
    (2.0 * loss).backward()  # the upstream gradient scales the gradients computed in forward
    ref_leaves = [t.to(dtype).double().requires_grad_() for t in (h64, w64) + ((b64,) if with_bias else ())]
    want = _reference_nll(ref_leaves[0], ref_leaves[1], y, ref_leaves[2] if with_bias else None, tw, temperature,
                          softcap, reduction)
    (2.0 * want).backward()
    assert abs(loss.item() - want.item()) <= tol * max(1.0, abs(want.item()))
    for got, ref in zip(leaves, ref_leaves):
        assert got.grad.dtype == dtype
        err = (got.grad.double() - ref.grad).abs().max().item()
        assert err <= tol * max(1.0, ref.grad.abs().max().item()), err


def test_nll_loss_edges_and_bad_input():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    y = torch.full((4,), -100)
    loss = fused_linear_nll_loss(h, w, y)  # nothing labelled: zero loss, zero gradients
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
    with torch.no_grad():  # forward only: the value, nothing saved
        y2 = torch.tensor([1, 2, -100, 3])
        want = -reference_linear_logprobs(h.double(), w.double(), y2)[[0, 1, 3]].sum() / 3
        assert abs(fused_linear_nll_loss(h, w, y2).item() - want.item()) < 1e-5
    for bad in (float("nan"), float("inf")):  # an ignored row's values never reach the others' gradients
        hb = torch.randn(4, 8)
        hb[2] = bad
        hb.requires_grad_()
        wb = w.detach().clone().requires_grad_()
        fused_linear_nll_loss(hb, wb, torch.tensor([1, 2, -100, 3]), backend="cpp" if "cpp" in BACKENDS else "torch").backward()
        assert torch.isfinite(hb.grad).all() and torch.isfinite(wb.grad).all() and hb.grad[2].abs().sum() == 0
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        fused_linear_nll_loss(h, w, y, reduction="none")
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        fused_linear_nll_loss(h, w, torch.tensor([1, 2, 3, 4]), chunk_rows=0)
    with pytest.raises(ValueError, match=r"token_weights must be a tensor \[N\] = \[4\]"):
        fused_linear_nll_loss(h, w, y, token_weights=torch.ones(3))
    with pytest.raises(ValueError, match=r"targets\[1\] = 11 is outside \[0, 11\)"):
        fused_linear_nll_loss(h, w, torch.tensor([0, 11, 1, 2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_pass_cancels_policy_exactly(backend):
    """With grad_in_forward, a no-grad sequence_logps (the reference pass) uses the same rows, order and chunks
    as the policy's pass: equal models give equal log-probs bit for bit, so DPO starts at exactly ln 2."""
    hidden, weight, labels, _, _ = batch()
    fn = fa.FusedDPOLoss(beta=0.1, backend=backend, grad_in_forward=True, chunk_rows=7)
    with torch.no_grad():
        seq, n = fn.sequence_logps(hidden, weight, labels)
    want, want_n = reference_sequence_logprobs(hidden.double(), weight.double(), labels)
    torch.testing.assert_close(seq.double(), want, rtol=1e-5, atol=1e-4)
    assert n.tolist() == want_n.tolist()
    out = fn(hidden.clone().requires_grad_(), weight, labels, seq[:3], seq[3:])
    assert out.loss.item() == pytest.approx(0.6931471805599453, abs=1e-7)
    assert torch.equal(out.chosen_logps, seq[:3]) and torch.equal(out.rejected_logps, seq[3:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_row_passes_on_a_vocabulary_major_tile(monkeypatch, backend, dtype, softcap):
    """The row passes alone on a [V, C] tile against float64: V large enough for several vocabulary ranges (one
    per thread), C = 45 (two 16-wide AVX-512 vectors, one 8-wide AVX2 vector, a scalar tail of 5), an ignored row.
    bf16/fp16 tiles (no softcap) keep their type and hold exp(l - shift) afterwards; fp32/fp64 tiles too, or l with
    a softcap. The torch pass works on a narrow tile in vocabulary blocks: 64 rows here, 24 blocks with a tail."""
    from fastalign.backends import get_backend, loss_rows_torch
    from fastalign.chunk_pass import GradInForwardPlan
    monkeypatch.setattr(loss_rows_torch, "WIDEN_BLOCK_ELEMENTS", 45 * 64)
    if softcap is not None and dtype in (torch.bfloat16, torch.float16):
        pytest.skip("a softcap runs on an fp32 tile")
    rows = get_backend(backend, op="loss_rows")
    plan = GradInForwardPlan(backend=backend, temperature=1.0, softcap=softcap, bounds=(), coeff_fn=None)
    g = torch.Generator().manual_seed(5)
    v, c = 1500, 45
    tile = (torch.randn(v, c, generator=g, dtype=torch.float64) * 4).to(dtype)
    y = torch.randint(0, v, (c,), generator=g)
    y[3] = -1
    l64 = tile.double().clone()  # .double() of an fp64 tile is the tile itself, which the passes overwrite
    if softcap is not None:
        l64 = softcap * torch.tanh(l64 / softcap)
    lse64 = torch.logsumexp(l64, dim=0)
    logp64 = torch.where(y >= 0, l64.gather(0, y.clamp_min(0).unsqueeze(0)).squeeze(0) - lse64, torch.zeros(c, dtype=torch.float64))
    logp, lse, shift = rows.rows_logsumexp_(tile, y, plan)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert (lse.double() - lse64).abs().max().item() <= tol * lse64.abs().max().item()
    assert (logp.double() - logp64).abs().max().item() <= tol * lse64.abs().max().item()
    assert tile.dtype == dtype
    if softcap is None:
        want = torch.exp(l64 - shift.double().unsqueeze(0))
        # rounding of the stored type, plus that of l - shift, which exp turns into a relative error
        eps = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10, torch.float32: 2 ** -23}.get(dtype, 2 ** -50)
        rel = eps * (2 + (l64 - shift.double().unsqueeze(0)).abs())
        tiny = 2.0 ** -24 if dtype == torch.float16 else 1e-30  # fp16's subnormal spacing
        assert ((tile.double() - want).abs() <= rel * want + tiny).all()
    coeff = torch.randn(c, generator=g, dtype=torch.float64)
    if dtype in (torch.float32, torch.float64):
        p = None
        if softcap is None:  # d logits from E as chunk_pass._exp_tile_gradients forms them, and by rows_dlogits_
            p = tile.double() * torch.exp(shift.double() - lse.double()).unsqueeze(0)
        rows.rows_dlogits_(tile, lse, shift, y, coeff.to(lse.dtype), plan)
        onehot = torch.zeros(v, c, dtype=torch.float64).scatter_(0, y.clamp_min(0).unsqueeze(0), 1.0)
        chain = 1.0 if softcap is None else 1.0 - (l64 / softcap) ** 2
        want_d = coeff * (onehot - torch.softmax(l64, dim=0)) * chain * (y >= 0)
        for got_d in [tile.double()] + ([] if p is None else [coeff * (onehot - p) * (y >= 0)]):
            assert (got_d - want_d).abs().max().item() <= 10 * tol * max(1.0, want_d.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_predictions_keep_their_gradient_in_bf16(backend):
    """A row whose target holds p ~ 0.998: its d logits is g (1 - p), a difference that bf16's E_y (good to 2^-9)
    would mostly lose; the target's term is computed from logp instead. d_hidden must stay within the error that
    bf16 logits themselves cause (a few percent), not tens of percent."""
    g = torch.Generator().manual_seed(11)
    n, hdim, v = 6, 32, 300
    w = torch.randn(v, hdim, generator=g, dtype=torch.float64) * 0.3
    y = torch.randint(0, v, (n,), generator=g)
    aim = w[y] / w[y].norm(dim=1, keepdim=True) ** 2  # h . w_y = 1 along this direction
    h = torch.randn(n, hdim, generator=g, dtype=torch.float64) * 0.1 + 17.6 * aim
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16()
    fused_linear_nll_loss(hb, wb, y, reduction="sum", backend=backend).backward()
    h64 = hb.detach().double().requires_grad_()
    with torch.no_grad():
        p_y = torch.softmax(h64 @ wb.double().t(), dim=1).gather(1, y[:, None]).squeeze(1)
    assert float(p_y.min()) > 0.99  # the regime this test is about
    (-torch.log_softmax(h64 @ wb.double().t(), dim=1).gather(1, y[:, None]).sum()).backward()
    rel = (hb.grad.double() - h64.grad).norm(dim=1) / h64.grad.norm(dim=1)
    assert float(rel.max()) < 0.1, rel
