"""One step of the fused thin-chunk pass (csrc/chunk_step.cpp, loss_rows_cpp.chunk_step_): a chunk's gradients from
its coefficients and the next rows' logits, statistics and log-probs against float64, the calls without
coefficients or next rows, and its errors. The losses through the whole pass: tests/test_chunk_gemms.py."""
import pytest
import torch

from fastalign.backends import loss_rows_cpp
from tests.chunk_cases import D, needs_kernel, two_threads  # noqa: F401 (a fixture)


@needs_kernel
@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("first", [True, False])
def test_chunk_step_matches_float64(first):
    """One call of the fused pass's step: this chunk's gradients from its coefficients (an ignored row among them),
    then the next rows' logits, statistics and log-probs (an ignored row: logp 0), as float64 says."""
    g = torch.Generator().manual_seed(7)
    n, h, v, ld, s, e, ns, ne, temp = 20, 32, 150, 16, 3, 10, 10, 17, 0.7
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.3
    bias = torch.randn(v, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    y[5], y[12] = -1, -1
    coeff = torch.randn(e - s, generator=g)
    logits = ((hidden.to(D) @ weight.to(D).t() + bias.to(D)) / temp).t()  # [V, N]
    lse = torch.logsumexp(logits, 0)
    live = y >= 0
    logp_ref = torch.where(live, logits.gather(0, y.clamp_min(0)[None])[0] - lse, torch.zeros((), dtype=D))
    tile, stats, logp = torch.zeros(v, ld), torch.zeros(2, ld), torch.zeros(n)
    tile[:, :e - s] = logits[:, s:e].float()
    mx = logits[:, s:e].float().max(0).values
    stats[0, :e - s], stats[1, :e - s] = mx, torch.exp(logits[:, s:e] - mx.to(D)).sum(0).float()
    logp[s:e] = logp_ref[s:e].float()
    d_w0, d_b0 = torch.randn(v, h, generator=g), torch.randn(v, generator=g)
    d_w, d_b, d_h = d_w0.clone(), d_b0.clone(), torch.full((n, h), 7.0)
    loss_rows_cpp.chunk_step_(tile, weight, (bias / temp).contiguous(), 1 / temp, hidden, y, logp, stats, s, e, ns,
                              ne, coeff, d_w, d_h, d_b, first)
    # d loss / d logits of each live row: coeff (onehot - softmax) / temperature
    p = torch.softmax(logits[:, s:e], 0)
    onehot = torch.zeros_like(p)
    onehot[y[s:e].clamp_min(0), torch.arange(e - s)] = 1.0
    dl = (onehot - p) * (coeff.to(D) * live[s:e].to(D) / temp)  # [V, C]
    want_w = dl @ hidden[s:e].to(D) + (0 if first else d_w0.to(D))
    want_b = dl.sum(1) + (0 if first else d_b0.to(D))
    torch.testing.assert_close(d_w.to(D), want_w, rtol=0, atol=2e-5)
    torch.testing.assert_close(d_b.to(D), want_b, rtol=0, atol=2e-5)
    torch.testing.assert_close(d_h[s:e].to(D), dl.t() @ weight.to(D), rtol=0, atol=2e-5)
    assert (d_h[:s] == 7).all() and (d_h[e:] == 7).all()  # other rows untouched
    torch.testing.assert_close(logp[ns:ne].to(D), logp_ref[ns:ne], rtol=0, atol=2e-5)
    assert logp[12] == 0
    nxt = logits[:, ns:ne]
    torch.testing.assert_close(stats[0, :ne - ns].to(D), nxt.max(0).values, rtol=0, atol=1e-5)
    torch.testing.assert_close(stats[1, :ne - ns].to(D), torch.exp(nxt - nxt.max(0).values).sum(0), rtol=2e-5, atol=0)
    torch.testing.assert_close(tile[:, :ne - ns].to(D), nxt, rtol=0, atol=2e-5)


@needs_kernel
def test_chunk_step_rejects_bad_input():
    g = torch.Generator().manual_seed(8)
    hidden, weight = torch.randn(12, 32, generator=g), torch.randn(40, 32, generator=g)
    y = torch.randint(0, 40, (12,), generator=g)
    tile, stats, logp = torch.zeros(40, 16), torch.zeros(2, 16), torch.zeros(12)
    args = (tile, weight, None, 1.0, hidden, y, logp, stats)
    bad = y.clone()
    bad[5] = 40
    with pytest.raises(RuntimeError, match=r"targets\[5\] = 40 is not a row of weight \(V = 40\)"):
        loss_rows_cpp.chunk_step_(tile, weight, None, 1.0, hidden, bad, logp, stats, 0, 0, 0, 8)
    with pytest.raises(RuntimeError, match=r"the next chunk's rows \[8, 13\) must lie in \[0, 12\)"):
        loss_rows_cpp.chunk_step_(*args, 0, 0, 8, 13)
    with pytest.raises(RuntimeError, match="at most the tile's 16 columns"):
        loss_rows_cpp.chunk_step_(tile, weight, None, 1.0, torch.randn(20, 32), torch.zeros(20, dtype=torch.long),
                                  torch.zeros(20), stats, 0, 0, 0, 17)
    with pytest.raises(RuntimeError, match=r"coeff must be a contiguous fp32 CPU tensor of shape \[4\], got \[3\]"):
        loss_rows_cpp.chunk_step_(*args, 0, 4, 4, 8, torch.zeros(3))
    with pytest.raises(RuntimeError, match=r"stats must be .* of shape \[2, 16\], got \[2, 32\]"):
        loss_rows_cpp.chunk_step_(tile, weight, None, 1.0, hidden, y, logp, torch.zeros(2, 32), 0, 0, 0, 4)
    with pytest.raises(RuntimeError, match="targets must be a contiguous int64"):
        loss_rows_cpp.chunk_step_(tile, weight, None, 1.0, hidden, y.int(), logp, stats, 0, 0, 0, 4)
    with pytest.raises(RuntimeError, match="weight must be a contiguous fp32 CPU tensor .* Double"):
        loss_rows_cpp.chunk_step_(tile, weight.double(), None, 1.0, hidden, y, logp, stats, 0, 0, 0, 4)
    with pytest.raises(RuntimeError, match=r"d_hidden must be .* of shape \[12, 32\], got \[4, 32\]"):
        loss_rows_cpp.chunk_step_(*args, 0, 4, 4, 8, torch.zeros(4), None, torch.zeros(4, 32))
    with pytest.raises(RuntimeError, match=r"targets\[5\] = 40 is not a row"):  # this chunk's row: E' would miss it
        loss_rows_cpp.chunk_step_(tile, weight, None, 1.0, hidden, bad, logp, stats, 4, 8, 8, 8, torch.zeros(4))


@needs_kernel
def test_chunk_step_without_coefficients_then_the_last_chunk():
    """No coefficients: nothing but the next rows' logits, statistics and log-probs (the gradients untouched). The
    last chunk (no next rows): its gradients only, the statistics and log-probs left as they were."""
    g = torch.Generator().manual_seed(9)
    n, h, v, ld = 10, 16, 60, 16
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.3
    y = torch.randint(0, v, (n,), generator=g)
    y[8] = -100
    logits = (hidden.to(D) @ weight.to(D).t()).t()  # [V, N]
    want_logp = torch.log_softmax(logits, 0).gather(0, y.clamp_min(0)[None])[0]
    tile, stats, logp = torch.zeros(v, ld), torch.zeros(2, ld), torch.zeros(n)
    d_w, d_h = torch.full((v, h), 3.0), torch.full((n, h), 3.0)
    loss_rows_cpp.chunk_step_(tile, weight, None, 1.0, hidden, y, logp, stats, 0, 0, 6, n, None, d_w, d_h)
    assert (d_w == 3).all() and (d_h == 3).all()
    torch.testing.assert_close(logp[6:].to(D), torch.where(y[6:] >= 0, want_logp[6:], torch.zeros((), dtype=D)),
                               rtol=0, atol=2e-5)
    assert (logp[:6] == 0).all()
    logp_before, stats_before = logp.clone(), stats.clone()
    loss_rows_cpp.chunk_step_(tile, weight, None, 1.0, hidden, y, logp, stats, 6, n, n, n, torch.ones(4), d_w, d_h,
                              None, True)
    p = torch.softmax(logits[:, 6:], 0)
    onehot = torch.zeros_like(p)
    onehot[y[6:].clamp_min(0), torch.arange(4)] = 1.0
    dl = (onehot - p) * (y[6:] >= 0).to(D)  # [V, 4]
    torch.testing.assert_close(d_w.to(D), dl @ hidden[6:].to(D), rtol=0, atol=2e-5)
    torch.testing.assert_close(d_h[6:].to(D), dl.t() @ weight.to(D), rtol=0, atol=2e-5)
    assert (d_h[:6] == 3).all() and torch.equal(stats, stats_before) and torch.equal(logp, logp_before)
