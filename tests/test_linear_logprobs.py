"""Every backend of the fused op against the float64 reference: values and gradients in each dtype, with bias,
temperature and softcap, and on the inputs that break naive code (ignored rows, frozen operands, extreme logits,
empty, strided and autocast inputs); also the torch and cpp backends' own chunking, the cpp threading rule, and
grad_filter_eps. The triton backend's backward strategies are in test_linear_logprobs_triton.py, and what
backend="auto" keeps on CPU (the kept tile) in test_linear_logprobs_kept_tile.py."""
import pytest
import torch

import fastalign as fa
from tests.linear_logprobs_cases import ATOL, CPU_BACKENDS, assert_close_to_reference, make_case, max_err, run
from tests.reference import naive_linear_logprobs, reference_linear_logprobs

# (N, H, V): ragged on purpose; no dimension is a multiple of any block size used by any backend
SHAPES = [(37, 48, 1003), (5, 17, 131), (1, 32, 50), (130, 40, 257)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["plain", "bias", "temperature", "softcap", "all"])
def test_fp32_matches_reference(backend, shape, variant):
    kw = {"plain": {}, "bias": {}, "temperature": {"temperature": 0.7}, "softcap": {"softcap": 4.0},
          "all": {"temperature": 1.3, "softcap": 2.5}}[variant]
    hidden, weight, bias, targets, grad = make_case(*shape, bias=variant in ("bias", "all"))
    got = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend=backend, **kw)
    ref = run(reference_linear_logprobs, hidden, weight, bias, targets, grad, **kw)
    assert got[0].dtype == torch.float32
    assert_close_to_reference(got, ref, ATOL[torch.float32])
    # ignored positions give exactly 0 and no gradient
    ignored = targets == -100
    assert torch.all(got[0][ignored] == 0)
    assert torch.all(got[1][ignored] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_naive_error(backend, dtype):
    """err(kernel) <= 2 * err(plain PyTorch in the same dtype) + atol, against float64."""
    hidden, weight, bias, targets, grad = make_case(29, 40, 777, dtype=dtype, bias=True)
    got = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend=backend, softcap=6.0)
    naive = run(naive_linear_logprobs, hidden, weight, bias, targets, grad, softcap=6.0)
    ref = run(reference_linear_logprobs, hidden, weight, bias, targets, grad, softcap=6.0)
    for name, g, n, r in zip(("logp", "d_hidden", "d_weight", "d_bias"), got, naive, ref):
        if name != "logp":
            assert g.dtype == dtype, f"{name} should come back in {dtype}, got {g.dtype}"
        assert max_err(g, r) <= 2 * max_err(n, r) + ATOL[dtype], (name, max_err(g, r), max_err(n, r))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_rows_ignored_and_zero_grad_rows(backend):
    hidden, weight, bias, targets, grad = make_case(9, 20, 70, bias=True)
    targets[:] = -100
    got = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend=backend)
    assert torch.all(got[0] == 0)
    assert all(torch.all(g == 0) for g in got[1:])
    # a zero upstream gradient on some valid rows: they are skipped in backward, still exact
    hidden, weight, bias, targets, grad = make_case(33, 20, 70, bias=True, ignore_every=0)
    grad[::3] = 0
    got = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend=backend)
    ref = run(reference_linear_logprobs, hidden, weight, bias, targets, grad)
    assert_close_to_reference(got, ref, ATOL[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_ignore_index_inside_vocab(backend):
    hidden, weight, _, targets, grad = make_case(21, 16, 40, ignore_every=0)
    targets[::3] = 0  # 0 is the ignore_index here: a pad id inside the vocabulary
    got = run(fa.linear_logprobs, hidden, weight, None, targets, grad, backend=backend, ignore_index=0)
    ref = run(reference_linear_logprobs, hidden, weight, None, targets, grad, ignore_index=0)
    assert_close_to_reference(got, ref, ATOL[torch.float32])
    assert torch.all(got[0][targets == 0] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_partial_requires_grad(backend, frozen):
    """A frozen lm_head (LoRA) skips d_weight; a frozen trunk skips d_hidden; the rest stays exact."""
    hidden, weight, bias, targets, grad = make_case(19, 24, 300, bias=True)
    h = hidden.clone().requires_grad_(frozen != "hidden")
    w = weight.clone().requires_grad_(frozen != "weight")
    out = fa.linear_logprobs(h, w, targets, bias, backend=backend)
    (out * grad).sum().backward()
    h2 = hidden.double().requires_grad_()
    w2 = weight.double().requires_grad_()
    (reference_linear_logprobs(h2, w2, targets, bias) * grad.double()).sum().backward()
    if frozen == "weight":
        assert w.grad is None and max_err(h.grad, h2.grad) < ATOL[torch.float32]
    else:
        assert h.grad is None and max_err(w.grad, w2.grad) < ATOL[torch.float32]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_forward_only(backend):
    hidden, weight, bias, targets, _ = make_case(17, 24, 99, bias=True)
    with torch.no_grad():
        out = fa.linear_logprobs(hidden.requires_grad_(), weight, targets, bias, backend=backend)
    assert out.grad_fn is None and not out.requires_grad
    ref = reference_linear_logprobs(hidden.detach(), weight, targets, bias)
    assert max_err(out, ref) < ATOL[torch.float32]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extreme_logits_are_stable(backend):
    """Logits up to +-1e4 in fp32: finite, and equal to the reference."""
    n, h, v = 12, 16, 90
    hidden = torch.zeros(n, h)
    hidden[:, 0] = 1.0
    weight = torch.zeros(v, h)
    weight[:, 0] = torch.linspace(-1e4, 1e4, v)
    targets = torch.randint(0, v, (n,))
    targets[0] = v - 1
    grad = torch.ones(n)
    got = run(fa.linear_logprobs, hidden, weight, None, targets, grad, backend=backend)
    ref = run(reference_linear_logprobs, hidden, weight, None, targets, grad)
    for g in got[:3]:
        assert torch.isfinite(g).all()
    assert max_err(got[0], ref[0]) < 1e-2  # 1e4-sized logits: fp32 rounding of the logits is ~1e-3
    assert got[0][0].abs().item() < 1e-3  # the top logit carries all the mass


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_input(backend):
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    out = fa.linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    assert hidden.grad.shape == (0, 8)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpp") if b in fa.available_backends()] + ["auto"])
def test_gradcheck_float64(backend):
    hidden, weight, bias, targets, _ = make_case(6, 5, 23, dtype=torch.float64, bias=True, ignore_every=3)
    for kw in ({}, {"temperature": 0.8, "softcap": 2.0}):
        def f(h, w, b):
            return fa.linear_logprobs(h, w, targets, b, backend=backend, **kw)
        assert torch.autograd.gradcheck(f, (hidden.requires_grad_(), weight.requires_grad_(),
                                            bias.requires_grad_()), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    hidden, weight, _, targets, grad = make_case(16, 32, 64)
    h_nc = hidden.t().contiguous().t()  # same values, column-major
    w_nc = torch.cat([weight, weight], 1)[:, :32]  # strided view, same values
    assert not h_nc.is_contiguous() and not w_nc.is_contiguous()
    got = fa.linear_logprobs(h_nc, w_nc, targets, backend=backend)
    assert max_err(got, reference_linear_logprobs(hidden, weight, targets)) < ATOL[torch.float32]


def test_sequence_logprobs_matches_reference():
    from tests.reference import reference_sequence_logprobs
    gen = torch.Generator().manual_seed(3)
    b, t, h, v = 3, 11, 16, 61
    hidden = torch.randn(b, t, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, requires_grad=True)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[:, :4] = -100   # prompt
    labels[1, 8:] = -100   # padding
    labels[2, :] = -100    # a whole row ignored
    for backend in CPU_BACKENDS:
        seq, n_tok = fa.sequence_logprobs(hidden, weight, labels, backend=backend)
        ref, ref_n = reference_sequence_logprobs(hidden.detach(), weight.detach(), labels)
        assert seq.shape == (b,) and torch.equal(n_tok, ref_n)
        assert max_err(seq, ref) < 1e-4
        assert seq[2].item() == 0.0 and n_tok[2].item() == 0


def test_backends_agree_on_auto_dispatch():
    hidden, weight, bias, targets, _ = make_case(10, 16, 40, bias=True)
    auto = fa.linear_logprobs(hidden, weight, targets, bias)
    expected = "cpp" if "cpp" in fa.available_backends() else "torch"
    forced = fa.linear_logprobs(hidden, weight, targets, bias, backend=expected)
    assert torch.equal(auto, forced)


def test_torch_backend_chunks_over_rows(monkeypatch):
    """The torch backend's memory bound: several chunks must give the same answer as one."""
    from fastalign.backends import torch_backend
    hidden, weight, bias, targets, grad = make_case(50, 16, 100, bias=True)
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 700)  # 7 rows per chunk
    got = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend="torch")
    ref = run(reference_linear_logprobs, hidden, weight, bias, targets, grad)
    assert_close_to_reference(got, ref, ATOL[torch.float32])


def test_autocast_casts_inputs_like_linear():
    hidden, weight, bias, targets, grad = make_case(13, 16, 60, bias=True)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fa.linear_logprobs(h, w, targets, bias)
    (out * grad).sum().backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32  # grads land in the params' dtype
    ref = reference_linear_logprobs(hidden.bfloat16(), weight.bfloat16(), targets, bias.bfloat16())
    assert max_err(out, ref) < ATOL[torch.bfloat16]


@pytest.mark.skipif("cpp" not in fa.available_backends(), reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.8, "softcap": 3.0}])
def test_cpp_row_chunks_and_vocab_blocks(monkeypatch, dtype, kw):
    """The cpp sweep with several row chunks (16, 16, 5) and ragged vocabulary blocks (37 columns), with bias,
    ignored rows, and each of d_hidden / d_weight alone."""
    from fastalign.backends import cpp_backend
    monkeypatch.setattr(cpp_backend, "BLOCK_N", 16)
    monkeypatch.setattr(cpp_backend, "TILE_ELEMENTS", 0)
    monkeypatch.setattr(cpp_backend, "MIN_BLOCK_V", 37)
    assert cpp_backend._blocks(37, 1003) == (16, 37)
    hidden, weight, bias, targets, grad = make_case(37, 48, 1003, dtype=dtype, bias=True)
    got = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend="cpp", **kw)
    ref = run(reference_linear_logprobs, hidden, weight, bias, targets, grad, **kw)
    if dtype == torch.float32:
        assert_close_to_reference(got, ref, ATOL[dtype])
    else:
        naive = run(naive_linear_logprobs, hidden, weight, bias, targets, grad, **kw)
        for name, g, n, r in zip(("logp", "d_hidden", "d_weight", "d_bias"), got, naive, ref):
            assert max_err(g, r) <= 2 * max_err(n, r) + ATOL[dtype], (name, max_err(g, r), max_err(n, r))
    for frozen in ("weight", "hidden"):
        h = hidden.clone().requires_grad_(frozen != "hidden")
        w = weight.clone().requires_grad_(frozen != "weight")
        (fa.linear_logprobs(h, w, targets, bias, backend="cpp", **kw).double() * grad.double()).sum().backward()
        assert (w.grad is None) == (frozen == "weight") and (h.grad is None) == (frozen == "hidden")
        live, want = (h.grad, got[1]) if frozen == "weight" else (w.grad, got[2])
        assert torch.equal(live, want)


def _parallel_regions(source):
    """The text of every at::parallel_for(...) call in C++ source (parentheses matched, comments dropped)."""
    import re
    source = re.sub(r"//[^\n]*", "", source)
    out = []
    for m in re.finditer(r"\bat::parallel_for\s*\(", source):
        depth, i = 1, m.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        out.append(source[m.end():i])
    return out


_BLAS_CALL = r"\b(at::|torch::)?(mm|addmm|matmul|bmm|baddbmm|addbmm|mv|addmv|linear|einsum|tensordot|dot)(_out|_)?\s*\("


def test_cpp_no_blas_inside_parallel_regions():
    """DESIGN.md's threading rule, checked on the source: no GEMM-shaped ATen call inside an at::parallel_for
    body (a BLAS call there may start its own threads inside the region and oversubscribe the cores)."""
    import glob
    import os
    import re
    # the checker itself must be able to fail
    bad = "at::parallel_for(0, n, 1, [&](int64_t a, int64_t b) { acc.addmm_(p, w); });"
    assert any(re.search(_BLAS_CALL, r) for r in _parallel_regions(bad))
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    sources = sorted(glob.glob(os.path.join(root, "*.cpp")))
    assert sources
    n_regions = 0
    for path in sources:
        with open(path) as f:
            regions = _parallel_regions(f.read())
        n_regions += len(regions)
        for body in regions:
            hit = re.search(_BLAS_CALL, body)
            assert hit is None, f"{os.path.basename(path)}: BLAS call {hit.group(0)!r} inside at::parallel_for"
    assert n_regions >= 2  # the forward and backward row passes of linear_logprobs.cpp


FILTER_BACKENDS = [b for b in ("cpp", "triton") if b in CPU_BACKENDS]


def _small_blocks(monkeypatch, backend):
    """cpp: vocabulary blocks of 37 columns, so that a row's target is outside most blocks (filterable)."""
    if backend == "cpp":
        from fastalign.backends import cpp_backend
        monkeypatch.setattr(cpp_backend, "TILE_ELEMENTS", 0)
        monkeypatch.setattr(cpp_backend, "MIN_BLOCK_V", 37)


@pytest.mark.parametrize("backend", FILTER_BACKENDS)
def test_grad_filter_eps_zero_or_none_is_exact(monkeypatch, backend):
    _small_blocks(monkeypatch, backend)
    hidden, weight, bias, targets, grad = make_case(21, 32, 301, bias=True, scale=4.0)
    exact = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend=backend, softcap=20.0)
    for eps in (None, 0, 0.0):
        got = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend=backend, softcap=20.0,
                  grad_filter_eps=eps)
        if backend == "cpp":  # deterministic: bitwise
            assert all(torch.equal(a, b) for a, b in zip(got, exact))
        else:
            assert_close_to_reference(got, exact, 1e-6)


@pytest.mark.parametrize("backend", FILTER_BACKENDS)
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "softcap": 20.0}])
def test_grad_filter_eps_error_is_bounded(monkeypatch, backend, kw):
    """A peaked distribution (logits with std ~12, as in a trained model): the filter skips tiles, the values
    stay exact, and each gradient's error is within the filter's bound (every dropped entry of dlogp/dlogits
    is below eps * |g| / tau) plus the fp32 tolerance; a large eps shows the filter does act."""
    _small_blocks(monkeypatch, backend)
    hidden, weight, bias, targets, grad = make_case(21, 32, 301, bias=True, scale=4.0)
    ref = run(reference_linear_logprobs, hidden, weight, bias, targets, grad, **kw)
    tau = kw.get("temperature", 1.0)
    eps = 1e-6
    got = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend=backend, grad_filter_eps=eps, **kw)
    exact = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend=backend, **kw)
    assert torch.equal(got[0], exact[0])  # forward untouched
    g = grad.abs().double() * (targets != -100) / tau
    bound_dh = eps * g.max() * weight.double().abs().sum(0).max() + ATOL[torch.float32]
    bound_dw = eps * (g[:, None] * hidden.double().abs()).sum(0).max() + ATOL[torch.float32]
    bound_db = eps * g.sum() + ATOL[torch.float32]
    for name, gg, r, bound in zip(("d_hidden", "d_weight", "d_bias"), got[1:], ref[1:], (bound_dh, bound_dw, bound_db)):
        assert max_err(gg, r) <= bound * max(1.0, r.abs().max().item()), (name, max_err(gg, r), float(bound))
    coarse = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend=backend, grad_filter_eps=0.999, **kw)
    assert max_err(coarse[2], ref[2]) > 10 * max_err(exact[2], ref[2])  # tiles were skipped


def test_grad_filter_eps_rejects_bad_values():
    hidden, weight, _, targets, _ = make_case(5, 16, 40)
    for bad in (-0.1, 1.0, "1e-6", True):
        with pytest.raises(ValueError, match="grad_filter_eps must be None or a number in \\[0, 1\\)"):
            fa.linear_logprobs(hidden, weight, targets, grad_filter_eps=bad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_labelled_inf_row_with_zero_upstream_gradient_leaves_gradients_finite(backend):
    """A labelled row whose hidden state is inf, multiplied away by a zero upstream gradient: the other rows'
    gradients stay finite and exact (0 times its NaN tile column must not reach the GEMMs)."""
    hidden, weight, bias, targets, grad = make_case(12, 16, 40, bias=True, ignore_every=0)
    hidden[3] = float("inf")
    grad[3] = 0.0
    got = run(fa.linear_logprobs, hidden, weight, bias, targets, grad, backend=backend)
    assert all(torch.isfinite(g).all() for g in got[1:]), backend
    keep = torch.arange(12) != 3
    ref = run(reference_linear_logprobs, hidden[keep], weight, bias, targets[keep], grad[keep])
    assert_close_to_reference((got[0][keep], got[1][keep], got[2], got[3]), ref, ATOL[torch.float32])
    assert torch.all(got[1][3] == 0)


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7}])
def test_bf16_bias_and_temperature_round_the_logits_once(kw):
    """bf16 with a bias and a temperature: logp within 1.25x naive bf16's error. Adding the bias after the GEMM,
    or scaling hidden by 1/temperature before it, rounds the logits twice (1.6x naive's error)."""
    hidden, weight, bias, targets, grad = make_case(512, 64, 500, dtype=torch.bfloat16, bias=True)
    ref = reference_linear_logprobs(hidden, weight, targets, bias, **kw)
    naive_err = max_err(naive_linear_logprobs(hidden, weight, targets, bias, **kw), ref)
    for got in (fa.linear_logprobs(hidden.requires_grad_(), weight, targets, bias, **kw),
                -fa.fused_linear_nll_loss(hidden, weight, targets, bias, reduction="sum", **kw)):
        err = max_err(got, ref) if got.dim() else abs(got.item() - ref.sum().item()) / targets.ne(-100).sum().item()
        assert err <= 1.25 * naive_err, (err, naive_err)
