"""backend="auto" on CPU with gradients: the kept tile (fastalign/kept_tiles.py), which keeps the logits tile
from forward to backward, and the chunk pass behind it. When auto keeps the tile and when it recomputes instead,
a second backward with retain_graph, ignored rows and tile padding that must not poison the gradients, bf16
d_weight accumulated like naive PyTorch's, and torch.compile tracing the path."""
import pytest
import torch

import fastalign as fa
from tests.linear_logprobs_cases import ATOL, assert_close_to_reference, make_case, max_err, run
from tests.reference import naive_linear_logprobs, reference_linear_logprobs


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_auto_keeps_the_tile_on_cpu_with_gradients_only(monkeypatch):
    """auto + gradients on CPU: the kept tile (3 GEMMs), never the recompute backward; forward-only, grad_filter_eps
    and an explicit backend take the general path."""
    from fastalign import kept_tiles
    from fastalign.backends import get_backend
    name = "cpp" if "cpp" in fa.available_backends() else "torch"
    kept = _count_calls(monkeypatch, kept_tiles.KeptTileFunction, "apply")
    recompute = _count_calls(monkeypatch, get_backend(name), "backward")
    hidden, weight, bias, targets, grad = make_case(21, 16, 90, bias=True)
    run(fa.linear_logprobs, hidden, weight, bias, targets, grad)
    assert (len(kept), len(recompute)) == (1, 0)
    run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend=name)
    run(fa.linear_logprobs, hidden, weight, bias, targets, grad, grad_filter_eps=1e-6)
    with torch.no_grad():
        fa.linear_logprobs(hidden, weight, targets, bias)
    assert (len(kept), len(recompute)) == (1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "softcap": 3.0}])
def test_kept_tile_second_backward_and_chunked_softcap(monkeypatch, dtype, kw):
    """retain_graph: a second backward gives the same gradients (backward never writes to the kept tile), also
    when the softcap's d logits are formed over several chunks of a copy."""
    from fastalign import chunk_pass
    monkeypatch.setattr(chunk_pass, "CHUNK_ELEMENTS", 8 * 257)  # 8 rows per chunk
    monkeypatch.setattr(chunk_pass, "MIN_CHUNK_ROWS", 1)
    hidden, weight, bias, targets, grad = make_case(45, 24, 257, dtype=dtype, bias=True)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    out = fa.linear_logprobs(h, w, targets, b, **kw)
    (out * grad).sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    (out * grad).sum().backward()
    assert all(torch.equal(a, t.grad) for a, t in zip(first, (h, w, b)))
    ref = run(reference_linear_logprobs, hidden, weight, bias, targets, grad, **kw)
    naive = run(naive_linear_logprobs, hidden, weight, bias, targets, grad, **kw)
    got = (out.detach(), *first)
    for name, g, n, r in zip(("logp", "d_hidden", "d_weight", "d_bias"), got, naive, ref):
        assert max_err(g, r) <= 2 * max_err(n, r) + ATOL[dtype], (name, max_err(g, r), max_err(n, r))


def test_kept_tile_ignored_row_with_inf_hidden():
    """An ignored row's hidden state never reaches the kept tile: inf there leaves every gradient finite."""
    hidden, weight, bias, targets, grad = make_case(12, 16, 50, bias=True, ignore_every=3)
    hidden[0] = float("inf")  # row 0 is ignored (ignore_every=3)
    got = run(fa.linear_logprobs, hidden, weight, bias, targets, grad)
    assert got[0][0] == 0 and all(torch.isfinite(g).all() for g in got[1:3])
    keep = targets != -100
    ref = run(reference_linear_logprobs, hidden[keep], weight, bias, targets[keep], grad[keep])
    assert_close_to_reference((got[0][keep], got[1][keep], got[2], got[3]), ref, ATOL[torch.float32])


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_uninitialized_tile_padding_cannot_poison_bf16_gradients(monkeypatch, softcap):
    """Tile lines are padded to 16 elements, and a bf16 GEMM reads the padding (and multiplies it by 0): every
    buffer torch.empty makes is NaN here, and the kept tile's and the chunk pass's gradients must stay finite."""
    real_empty = torch.empty

    def nan_empty(*args, **kw):
        t = real_empty(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    hidden, weight, bias, targets, grad = make_case(45, 24, 257, dtype=torch.bfloat16, bias=True, ignore_every=0)
    monkeypatch.setattr(torch, "empty", nan_empty)
    for fn in (lambda h, w, t, b: fa.linear_logprobs(h, w, t, b, softcap=softcap),
               lambda h, w, t, b: -fa.fused_linear_nll_loss(h, w, t, b, softcap=softcap, reduction="sum",
                                                            backend="auto").expand(1)):
        got = run(fn, hidden, weight, bias, targets, torch.ones(()))
        assert all(torch.isfinite(g).all() for g in got), [bool(torch.isfinite(g).all()) for g in got]


def test_kept_tile_bf16_softcap_accumulates_d_weight_like_naive(monkeypatch):
    """bf16 + softcap over 64 chunks of d logits: d_weight is one GEMM over all rows (fp32 inside BLAS), so its
    error stays that of naive bf16 PyTorch's; adding bf16 chunk products had 8x that error."""
    from fastalign import chunk_pass
    monkeypatch.setattr(chunk_pass, "CHUNK_ELEMENTS", 8 * 257)  # 8 rows per chunk
    monkeypatch.setattr(chunk_pass, "MIN_CHUNK_ROWS", 1)
    hidden, weight, bias, targets, grad = make_case(512, 24, 257, dtype=torch.bfloat16, bias=True, ignore_every=0)
    grad = grad.abs() + 0.5  # one sign: d_weight's sum over rows, and the rounding of partial sums, grow
    got = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, softcap=3.0)
    naive = run(naive_linear_logprobs, hidden, weight, bias, targets, grad, softcap=3.0)
    ref = run(reference_linear_logprobs, hidden, weight, bias, targets, grad, softcap=3.0)
    assert max_err(got[2], ref[2]) <= 1.5 * max_err(naive[2], ref[2]), (max_err(got[2], ref[2]),
                                                                          max_err(naive[2], ref[2]))


def test_torch_compile_traces_the_kept_tile_and_the_loss_path():
    """torch.compile (aot_eager: the tracing, without inductor's build time) of auto's CPU path and of the
    gradient-in-forward loss: same values and gradients as eager. The in-place row pass must be a custom op that
    compile accepts (it refused one that mutates its input and returns a list)."""
    hidden, weight, bias, targets, grad = make_case(24, 16, 50, bias=True)
    for fn, g in ((lambda h, w, t, b: fa.linear_logprobs(h, w, t, b), grad),
                  (lambda h, w, t, b: fa.fused_linear_nll_loss(h, w, t, b), torch.ones(()))):
        eager = run(fn, hidden, weight, bias, targets, g)
        compiled = run(torch.compile(fn, backend="aot_eager"), hidden, weight, bias, targets, g)
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(a, b)


def test_auto_recomputes_above_the_kept_tile_budget(monkeypatch):
    """A tile over kept_tiles.MAX_TILE_BYTES is not kept: auto takes the recompute path (O(chunk) memory)."""
    from fastalign import kept_tiles
    hidden, weight, bias, targets, grad = make_case(40, 16, 300, bias=True)
    kept = _count_calls(monkeypatch, kept_tiles.KeptTileFunction, "apply")
    monkeypatch.setattr(kept_tiles, "MAX_TILE_BYTES", 300 * 32 * 4 - 1)  # 30 labelled rows padded to 32, fp32
    got = run(fa.linear_logprobs, hidden, weight, bias, targets, grad)
    assert not kept
    monkeypatch.setattr(kept_tiles, "MAX_TILE_BYTES", 300 * 32 * 4)
    assert_close_to_reference(got, run(reference_linear_logprobs, hidden, weight, bias, targets, grad),
                              ATOL[torch.float32])
    run(fa.linear_logprobs, hidden, weight, bias, targets, grad)
    assert len(kept) == 1
