"""The triton backend's own machinery, under the CPU interpreter and on CUDA: each backward strategy (atomic,
vocab-chunked, two-pass, deterministic) against the float64 reference and bitwise across runs where it promises
that, transposed, tied and row-strided inputs read in place (no copy), an unknown strategy refused, and the
gpu-marked runs at real sizes (bf16 accuracy, reproducibility, grids past CUDA's 65535 limit)."""
import pytest
import torch

import fastalign as fa
from tests.linear_logprobs_cases import ATOL, CPU_BACKENDS, assert_close_to_reference, make_case, max_err, run
from tests.reference import naive_linear_logprobs, reference_linear_logprobs


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton unavailable")
@pytest.mark.parametrize("shape", [(37, 48, 1003), (130, 40, 257)])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.8, "softcap": 3.0}])
def test_triton_deterministic_backward(shape, kw):
    """The atomics-free backward: same values as the reference, and bitwise equal across runs."""
    hidden, weight, bias, targets, grad = make_case(*shape, bias=True)
    got = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend="triton", deterministic=True, **kw)
    ref = run(reference_linear_logprobs, hidden, weight, bias, targets, grad, **kw)
    assert_close_to_reference(got, ref, ATOL[torch.float32])
    again = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend="triton", deterministic=True, **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    # frozen weight: only the d_hidden kernel runs
    h = hidden.clone().requires_grad_()
    (fa.linear_logprobs(h, weight, targets, bias, backend="triton", deterministic=True, **kw) * grad).sum().backward()
    assert max_err(h.grad, ref[1]) < ATOL[torch.float32] * max(1.0, ref[1].abs().max().item())


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton unavailable")
@pytest.mark.parametrize("strategy", ["atomic", "vocab-chunked", "two-pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_strategies(monkeypatch, strategy, dtype):
    """Every triton backward strategy against the float64 reference; the vocab-chunked one with a buffer so small
    that it takes several chunks, the last one ragged."""
    from fastalign.backends import triton_backend
    from fastalign.kernels import linear_logprobs_bwd_vocab_chunked as vc
    monkeypatch.setattr(triton_backend, "BACKWARD", strategy)
    monkeypatch.setattr(vc, "CHUNK_BYTES", 37 * 96 * 4)  # 96 fp32 columns (3 blocks) per chunk for 37 rows
    hidden, weight, bias, targets, grad = make_case(37, 48, 1003, dtype=dtype, bias=True)
    got = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend="triton", softcap=5.0, temperature=0.9)
    ref = run(reference_linear_logprobs, hidden, weight, bias, targets, grad, softcap=5.0, temperature=0.9)
    if dtype == torch.float32:
        assert_close_to_reference(got, ref, ATOL[dtype])
    else:
        naive = run(naive_linear_logprobs, hidden, weight, bias, targets, grad, softcap=5.0, temperature=0.9)
        for name, g, n, r in zip(("logp", "d_hidden", "d_weight", "d_bias"), got, naive, ref):
            assert max_err(g, r) <= 2 * max_err(n, r) + ATOL[dtype], (name, max_err(g, r), max_err(n, r))
    if strategy != "atomic":
        again = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend="triton", softcap=5.0,
                    temperature=0.9)
        assert all(torch.equal(a, b) for a, b in zip(got, again))


STRIDED_LAYOUTS = {
    # lm_head stored as [H, V] and used transposed (weight.stride() == (1, V))
    "transposed_weight": (lambda h, w: (h, w.t().contiguous()), lambda hb, wb: (hb, wb.t())),
    # weight a view into a larger (e.g. tied embedding) table: row stride H + 8, non-zero storage offset
    "tied_weight_view": (lambda h, w: (h, torch.nn.functional.pad(w, (8, 0, 3, 0))), lambda hb, wb: (hb, wb[3:, 8:])),
    # hidden a column slice of a wider buffer: row stride H + 5
    "strided_hidden": (lambda h, w: (torch.nn.functional.pad(h, (0, 5)), w),
                       lambda hb, wb: (hb[:, :hb.shape[1] - 5], wb)),
}


class _LaunchSpy:
    """Stands in for a kernel in its launcher's module: records the (hidden, weight) data pointers of each launch."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def spy(*args, **kwargs):
            self.seen.append((args[0].data_ptr(), args[1].data_ptr()))
            return launch(*args, **kwargs)
        return spy


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton unavailable")
@pytest.mark.parametrize("layout,strategy", [("transposed_weight", "atomic"), ("transposed_weight", "vocab-chunked"),
                                             ("transposed_weight", "two-pass"), ("tied_weight_view", "atomic"),
                                             ("strided_hidden", "atomic"), ("strided_hidden", "two-pass")])
def test_triton_strided_inputs_read_in_place(monkeypatch, layout, strategy):
    """A transposed or tied weight and a row-strided hidden: values and gradients (through the views, onto
    their bases) match the float64 reference, and every kernel launch reads the caller's hidden and weight
    storage itself (no copy)."""
    from fastalign.backends import triton_backend
    from fastalign.kernels import linear_logprobs_bwd as bwd, linear_logprobs_bwd_deterministic as det
    from fastalign.kernels import linear_logprobs_bwd_vocab_chunked as vc, linear_logprobs_fwd as fwd
    monkeypatch.setattr(triton_backend, "BACKWARD", strategy)
    monkeypatch.setattr(vc, "CHUNK_BYTES", 37 * 96 * 4)  # several vocabulary chunks
    seen = []
    for module, name in ((fwd, "_linear_logprobs_fwd_kernel"), (bwd, "_linear_logprobs_bwd_kernel"),
                         (det, "_dh_kernel"), (det, "_dw_kernel"), (vc, "_d_chunk_kernel")):
        monkeypatch.setattr(module, name, _LaunchSpy(getattr(module, name), seen))
    # no ignored rows: backward then gets hidden itself (it gathers the active rows when some are ignored)
    hidden, weight, bias, targets, grad = make_case(37, 48, 203, bias=True, ignore_every=0)
    make_bases, views = STRIDED_LAYOUTS[layout]
    h_base, w_base = make_bases(hidden, weight)
    h_view, w_view = views(h_base, w_base)
    assert torch.equal(h_view, hidden) and torch.equal(w_view, weight)
    assert not (h_view.is_contiguous() and w_view.is_contiguous())

    def run_views(fn, **kw):
        hb, wb = h_base.clone().requires_grad_(), w_base.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        h, w = views(hb, wb)
        if fn is fa.linear_logprobs:
            seen.clear()
            views_ptrs = (h.data_ptr(), w.data_ptr())
        out = fn(h, w, targets, b, temperature=0.9, softcap=5.0, **kw)
        (out.double() * grad.double()).sum().backward()
        if fn is fa.linear_logprobs:
            assert len(seen) >= 2 and all(ptrs == views_ptrs for ptrs in seen), (views_ptrs, seen)
        return out.detach(), hb.grad, wb.grad, b.grad

    got = run_views(fa.linear_logprobs, backend="triton")
    ref = run_views(reference_linear_logprobs)
    assert_close_to_reference(got, ref, ATOL[torch.float32])


def test_unknown_triton_strategy_is_a_clear_error(monkeypatch):
    if "triton" not in CPU_BACKENDS:
        pytest.skip("triton unavailable")
    from fastalign.backends import triton_backend
    monkeypatch.setattr(triton_backend, "BACKWARD", "magic")
    hidden, weight, _, targets, grad = make_case(5, 16, 40)
    with pytest.raises(ValueError, match="unknown triton backward strategy 'magic'.*valid: atomic, vocab-chunked"):
        run(fa.linear_logprobs, hidden, weight, None, targets, grad, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_triton_matches_reference(dtype):
    hidden, weight, bias, targets, grad = make_case(1000, 256, 32003, dtype=dtype, bias=True)
    cuda = [x.cuda() if x is not None else None for x in (hidden, weight, bias, targets, grad)]
    got = run(fa.linear_logprobs, *cuda, backend="triton", softcap=30.0)
    naive = run(naive_linear_logprobs, *cuda, softcap=30.0)
    ref = run(reference_linear_logprobs, *cuda, softcap=30.0)
    for g, n, r in zip(got, naive, ref):
        assert max_err(g, r) <= 2 * max_err(n, r) + ATOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["atomic", "vocab-chunked", "two-pass"])
def test_gpu_backward_strategies_and_reproducibility(monkeypatch, strategy):
    from fastalign.backends import triton_backend
    from fastalign.kernels import linear_logprobs_bwd_vocab_chunked as vc
    monkeypatch.setattr(triton_backend, "BACKWARD", strategy)
    monkeypatch.setattr(vc, "CHUNK_BYTES", 4099 * 8192 * 2)  # several chunks, the last one ragged
    hidden, weight, bias, targets, grad = make_case(4099, 512, 50257, dtype=torch.bfloat16, bias=True)
    cuda = [x.cuda() if x is not None else None for x in (hidden, weight, bias, targets, grad)]
    got = run(fa.linear_logprobs, *cuda, backend="triton")  # the first call autotunes: must be exact too
    naive = run(naive_linear_logprobs, *cuda)
    ref = run(reference_linear_logprobs, *cuda)
    for g, n, r in zip(got, naive, ref):
        assert max_err(g, r) <= 2 * max_err(n, r) + ATOL[torch.bfloat16]
    if strategy != "atomic":
        again = run(fa.linear_logprobs, *cuda, backend="triton")
        assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.gpu
def test_gpu_large_token_count_grid():
    """More than 65535 row blocks x vocab blocks must not hit CUDA's grid y/z limits."""
    hidden, weight, _, targets, _ = make_case(70000, 64, 1000, dtype=torch.bfloat16)
    out = fa.linear_logprobs(hidden.cuda(), weight.cuda(), targets.cuda(), backend="triton")
    ref = reference_linear_logprobs(hidden.cuda(), weight.cuda(), targets.cuda())
    assert max_err(out, ref) < 5e-2
