"""The fused thin-chunk pass (csrc/linear_logprobs_chunk.cpp, fastalign/chunk_pass_fused.py): the kernel against
float64 products on ragged shapes (the last block's lines, the last strip's columns, padded chunk rows, several
blocks per thread), its errors, the losses through it against float64 references, and when it is (not) used. One
step of the pass (csrc/chunk_step.cpp): tests/test_chunk_step.py."""
import pytest
import torch

import fastalign as fa
from fastalign import chunk_pass_fused
from fastalign.backends import loss_rows_cpp
from fastalign.fused_grad import fused_linear_nll_loss
from tests.chunk_cases import D, needs_kernel, two_threads  # noqa: F401 (a fixture)
from tests.loss_cases import assert_grads_close, batch, grads, naive_dpo
from tests.reference import reference_linear_logprobs


def _case(v, h, c, cn, ld, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, h, generator=g)
    tile = torch.randn(v, ld, generator=g)  # E in columns < c; the rest must not matter
    scaled = torch.randn(c, h, generator=g)
    nxt = torch.randn(cn, h, generator=g)
    d_w = torch.randn(v, h, generator=g)
    bias = torch.randn(v, generator=g)
    return weight, tile, scaled, nxt, d_w, bias


@pytest.fixture(params=["amx", "avx512", "avx2"])
def products(request):
    """Each set of tiles this CPU runs: AMX for d_weight's update (set_chunk_amx), the AVX-512 tiles, and the AVX2
    tiles (set_chunk_avx512(False) runs them on a CPU with AVX-512 too)."""
    isa = request.param
    saved_wide = loss_rows_cpp.set_chunk_avx512(isa != "avx2")
    saved_amx = loss_rows_cpp.set_chunk_amx(isa == "amx")
    try:
        running = loss_rows_cpp.chunk_gemms_isa()
        if running != {"amx": "avx512+amx"}.get(isa, isa):
            pytest.skip(f"this CPU or OS runs {running!r} tiles, not {isa}")
        yield isa
    finally:
        loss_rows_cpp.set_chunk_amx(saved_amx)
        loss_rows_cpp.set_chunk_avx512(saved_wide)


def _e_prime(logits, shift, y, target_values=None):
    """float64 E' = exp(l - shift) with each labelled row's (column's) target entry set to target_values (0 if
    None): logits [V, C], y [C]."""
    e = torch.exp(logits.to(D) - shift.to(D))
    live = (y >= 0).nonzero().squeeze(1)
    e[y[live], live] = 0 if target_values is None else target_values[live].to(D)
    return e


@needs_kernel
@pytest.mark.usefixtures("two_threads", "products")
@pytest.mark.parametrize("v, h, c, cn, ld", [
    (1001, 80, 37, 33, 48),   # 6 blocks of 192 lines (3 per thread), the last 41 lines; strips of 48 and 32
    (97, 16, 8, 16, 16),      # one block, one 16-column strip, a full next chunk
    (50, 4096, 5, 3, 16),     # the smallest block (24 lines, 48 with AMX) of a wide H; AMX: K 5 padded to 32
    (300, 144, 64, 64, 64),   # whole strips, whole tiles
    (400, 32, 70, 80, 80),    # tiles of 64 columns and a last one of 16; AMX: 3 K steps, a last block of 16 lines
    (700, 96, 45, 40, 48),    # AMX: blocks of 192 lines, the last 124 (112 on AMX, 12 on AVX-512), 6 column tiles
    (500, 64, 32, 40, 48),    # AMX: K an exact step, the last block 116 lines (112 on AMX)
    (500, 288, 37, 127, 128),  # AMX (c): 8 column tiles (a second group of 4), K in two segments (256 + 32)
])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("entry", ["E'", "logits", "logits, target values"])
def test_kernel_matches_float64(v, h, c, cn, ld, first, entry):
    """Every output against float64: d_weight, d_bias, E'^T W, the next logits (their padding 0) and their column
    max and sum of exp, with the tile holding E' on entry or logits that the kernel turns into E' itself."""
    weight, tile, scaled, nxt, d_w, bias = _case(v, h, c, cn, ld)
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, v, (c,), generator=g)
    y[::3] = -1  # ignored rows: nothing zeroed in their columns
    y[1] = v - 1  # a target on the last line of the last block
    shift = torch.randn(c, generator=g) + 2.0
    f = torch.randn(c, generator=g)
    d_b = torch.randn(v, generator=g)
    got_tile, got_dw, got_db = tile.clone(), d_w.clone(), d_b.clone()
    if entry != "E'":
        tv = torch.randn(c, generator=g) * 50 if entry == "logits, target values" else None
        e = _e_prime(tile[:, :c], shift, y, tv)
        extra = (shift, y, got_db, f, tv)
    else:
        e = tile[:, :c].to(D)
        extra = (None, None, got_db, f)
    p, mx, se = loss_rows_cpp.chunk_gemms_(got_tile, c, scaled, weight, got_dw, first, True, nxt, bias, 0.7, *extra)
    want_p = e.t() @ weight.to(D)
    want_dw = e @ scaled.to(D) + (0 if first else d_w.to(D))
    want_db = e @ f.to(D) + (0 if first else d_b.to(D))
    want_l = 0.7 * weight.to(D) @ nxt.to(D).t() + bias.to(D).unsqueeze(1)
    scale = (c + h) ** 0.5
    assert p.shape == (c, h) and (p.to(D) - want_p).abs().max() < 1e-5 * scale * v ** 0.5
    assert (got_dw.to(D) - want_dw).abs().max() < 1e-5 * scale
    assert (got_db.to(D) - want_db).abs().max() < 1e-5 * c ** 0.5
    assert (got_tile[:, :cn].to(D) - want_l).abs().max() < 1e-5 * h ** 0.5
    assert torch.equal(got_tile[:, cn:], torch.zeros(v, ld - cn))  # the padding stays zero
    # the statistics are of the logits the kernel wrote (fp32), the max exactly, lse to fp32 rounding
    assert torch.equal(mx, got_tile[:, :cn].max(0).values)
    want_lse = torch.logsumexp(got_tile[:, :cn].to(D), 0)
    assert mx.shape == se.shape == (cn,) and ((mx.to(D) + se.to(D).log()) - want_lse).abs().max() < 1e-5


@needs_kernel
@pytest.mark.skipif(not loss_rows_cpp.chunk_amx_supported(), reason="this CPU or OS has no AMX")
def test_amx_products_are_as_accurate_as_fp32():
    """AMX's six bf16 part products against float64: d_weight's error within 2x AVX-512's fp32 FMAs' (both well
    under 1e-6 of the sum of |products|). Leaving out one of the six (a1 b3, say) makes it about 100x larger."""
    g = torch.Generator().manual_seed(11)
    v, h, c = 960, 256, 64
    weight = torch.randn(v, h, generator=g)
    e = torch.rand(v, 64, generator=g) * torch.randn(v, 1, generator=g).exp()  # E'-like: positive, lines of all sizes
    scaled = torch.randn(c, h, generator=g) * torch.logspace(-3, 1, c).unsqueeze(1)  # rows of all sizes (f h)
    want = e.to(D) @ scaled.to(D)
    size = e.to(D).abs() @ scaled.to(D).abs()
    errors = {}
    for amx in (True, False):
        saved = loss_rows_cpp.set_chunk_amx(amx)
        try:
            d_w = torch.empty(v, h)
            loss_rows_cpp.chunk_gemms_(e.clone(), c, scaled, weight, d_w, True, False, None, None, 1.0)
        finally:
            loss_rows_cpp.set_chunk_amx(saved)
        errors[amx] = ((d_w.to(D) - want).abs() / size).max().item()
    assert errors[True] < 2 * errors[False] + 1e-8 and errors[True] < 1e-6, errors


@needs_kernel
@pytest.mark.skipif(not loss_rows_cpp.chunk_amx_supported(), reason="this CPU or OS has no AMX")
@pytest.mark.parametrize("h", [96, 1024])  # one K segment of 256 and part of one; four of them
def test_amx_logits_are_as_accurate_as_fp32(h):
    """The next chunk's logits on AMX (W's lines split by truncation as they are used, summed every 256 of H in fp32)
    against float64: within 2x the error of AVX-512's fp32 FMAs and under 1e-6 of the sum of |products|, on lines
    and rows of all sizes; the padding columns stay zero, and the vocabulary's last lines (not a multiple of 16) run
    on AVX-512."""
    g = torch.Generator().manual_seed(12)
    v, cn, ld = 1000, 40, 48
    weight = torch.randn(v, h, generator=g) * torch.logspace(-4, 1, v).unsqueeze(1)[torch.randperm(v, generator=g)]
    nxt = torch.randn(cn, h, generator=g) * torch.logspace(-3, 2, cn).unsqueeze(1)
    want = weight.to(D) @ nxt.to(D).T * 0.7
    size = weight.to(D).abs() @ nxt.to(D).abs().T * 0.7
    errors = {}
    for amx in (True, False):
        saved = loss_rows_cpp.set_chunk_amx(amx)
        try:
            tile = torch.full((v, ld), float("nan"))
            loss_rows_cpp.chunk_gemms_(tile, 0, None, weight, None, False, False, nxt, None, 0.7)
        finally:
            loss_rows_cpp.set_chunk_amx(saved)
        assert torch.equal(tile[:, cn:], torch.zeros(v, ld - cn))
        errors[amx] = ((tile[:, :cn].to(D) - want).abs() / size).max().item()
    assert errors[True] < 2 * errors[False] + 1e-8 and errors[True] < 1e-6, errors


@needs_kernel
@pytest.mark.usefixtures("products")
@pytest.mark.parametrize("threads", [1, 2])
def test_d_weight_ignores_the_tile_padding(threads):
    """Columns past the chunk's rows may hold anything, NaN included: d_weight never reads them (AMX splits lines
    16 columns at a time; one thread runs the blocks inline in the caller)."""
    weight, tile, scaled, nxt, d_w, bias = _case(300, 64, 37, 37, 48)
    tile[:, 37:] = float("nan")
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = d_w.clone()
        loss_rows_cpp.chunk_gemms_(tile.clone(), 37, scaled, weight, got, False, False, None, None, 1.0)
    finally:
        torch.set_num_threads(saved)
    want = tile[:, :37].to(D) @ scaled.to(D) + d_w.to(D)
    assert (got.to(D) - want).abs().max() < 1e-4


@needs_kernel
@pytest.mark.usefixtures("two_threads")
def test_kernel_statistics_rescale_as_the_max_grows():
    """Logits that grow along the vocabulary (each block's max above the last), spread over 80 units: the running
    sum of exp is rescaled block by block and per thread, and lse still matches float64."""
    v, h = 2000, 16
    weight = torch.zeros(v, h)
    weight[:, 0] = torch.linspace(-40.0, 40.0, v)
    weight[:, 1] = torch.randn(v, generator=torch.Generator().manual_seed(7))
    nxt = torch.zeros(3, h)
    nxt[:, 0], nxt[:, 1] = torch.tensor([1.0, -1.0, 0.01]), 1.0
    tile = torch.zeros(v, 16)
    _, mx, se = loss_rows_cpp.chunk_gemms_(tile, 0, None, weight, None, False, False, nxt, None, 1.0)
    want = torch.logsumexp(weight.to(D) @ nxt.to(D).t(), 0)
    assert ((mx.to(D) + se.to(D).log()) - want).abs().max() < 1e-5


@needs_kernel
def test_kernel_parts_are_independent():
    """Without d_weight nothing is added to it, without need_p an empty [0, H] comes back, without next_hidden the
    tile is left as it was and the statistics are empty; rows=0 (the first chunk) only writes the logits."""
    weight, tile, scaled, nxt, d_w, bias = _case(200, 32, 9, 7, 16)
    t0 = tile.clone()
    p, mx, se = loss_rows_cpp.chunk_gemms_(t0, 9, None, weight, None, False, True, None, None, 1.0)
    assert torch.equal(t0, tile) and (p.to(D) - tile[:, :9].to(D).t() @ weight.to(D)).abs().max() < 1e-4
    assert mx.shape == se.shape == (0,)
    dw = d_w.clone()
    p = loss_rows_cpp.chunk_gemms_(tile.clone(), 9, scaled, weight, dw, False, False, None, None, 1.0)[0]
    assert p.shape == (0, 32) and (dw.to(D) - d_w.to(D) - tile[:, :9].to(D) @ scaled.to(D)).abs().max() < 1e-4
    t1 = tile.clone()
    loss_rows_cpp.chunk_gemms_(t1, 0, None, weight, None, False, False, nxt, None, 1.0)
    assert (t1[:, :7].to(D) - weight.to(D) @ nxt.to(D).t()).abs().max() < 1e-4 and not t1[:, 7:].any()
    dw = torch.full_like(d_w, float("nan"))  # first with no rows: d_weight is written (zeros), not left as it was
    loss_rows_cpp.chunk_gemms_(tile.clone(), 0, scaled[:0], weight, dw, True, True, None, None, 1.0)
    assert torch.equal(dw, torch.zeros_like(dw))
    t2 = tile.clone()  # the conversion alone: E' in the first 9 columns, the other columns as they were
    y = torch.tensor([3, -1, 199, 0, 5, 6, 7, 8, 9])
    shift = torch.full((9,), 1.5)
    loss_rows_cpp.chunk_gemms_(t2, 9, None, weight, None, False, False, None, None, 1.0, shift, y)
    assert (t2[:, :9].to(D) - _e_prime(tile[:, :9], shift, y)).abs().max() < 1e-6 and torch.equal(t2[:, 9:],
                                                                                                  tile[:, 9:])


@needs_kernel
def test_kernel_rejects_what_it_cannot_run():
    weight, tile, scaled, nxt, d_w, bias = _case(40, 32, 4, 4, 16)
    for bad_h in (24, 0):
        with pytest.raises(RuntimeError, match="H a positive multiple of 16"):
            loss_rows_cpp.chunk_gemms_(tile.clone(), 4, None, weight[:, :bad_h].contiguous(), None, False, True, None,
                                       None, 1.0)
    with pytest.raises(RuntimeError, match="ld a multiple of 16"):
        loss_rows_cpp.chunk_gemms_(torch.zeros(40, 12), 4, None, weight, None, False, True, None, None, 1.0)
    with pytest.raises(RuntimeError, match="contiguous fp32 CPU \\[V, ld\\] buffer"):  # a view narrower than its lines
        loss_rows_cpp.chunk_gemms_(torch.zeros(40, 32)[:, :16], 4, None, weight, None, False, True, None, None, 1.0)
    from fastalign import _ext  # the extension itself: the custom op sends a meta tensor to its fake kernel
    with pytest.raises(RuntimeError, match="on meta"):
        _ext.C.chunk_gemms_(tile, 4, scaled.to("meta"), weight, d_w, False, True, None, None, 1.0, None, None, None,
                            None, None)
    with pytest.raises(RuntimeError, match="scaled_hidden and d_weight come together"):
        loss_rows_cpp.chunk_gemms_(tile, 4, scaled, weight, None, False, True, None, None, 1.0)
    with pytest.raises(RuntimeError, match="scaled_hidden must be .*CPU \\[4, 32\\] tensor, got \\[3, 32\\]"):
        loss_rows_cpp.chunk_gemms_(tile, 4, scaled[:3], weight, d_w, False, True, None, None, 1.0)
    with pytest.raises(RuntimeError, match="more rows than"):
        loss_rows_cpp.chunk_gemms_(tile, 4, None, weight, None, False, True, torch.zeros(17, 32), None, 1.0)
    shift, y = torch.zeros(4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="exp_shift and targets come together"):
        loss_rows_cpp.chunk_gemms_(tile, 4, None, weight, None, False, True, None, None, 1.0, shift, None)
    with pytest.raises(RuntimeError, match="targets must be a contiguous Long CPU \\[4\\] tensor, got \\[4\\] Int"):
        loss_rows_cpp.chunk_gemms_(tile, 4, None, weight, None, False, True, None, None, 1.0, shift, y.int())
    with pytest.raises(RuntimeError, match="exp_shift must be a contiguous Float CPU \\[4\\] tensor, got \\[5\\]"):
        loss_rows_cpp.chunk_gemms_(tile, 4, None, weight, None, False, True, None, None, 1.0, torch.zeros(5), y)
    with pytest.raises(RuntimeError, match="target_values needs exp_shift and targets"):
        loss_rows_cpp.chunk_gemms_(tile, 4, None, weight, None, False, True, None, None, 1.0, None, None, None, None,
                                   torch.zeros(4))
    with pytest.raises(RuntimeError, match="d_bias and bias_scale come together"):
        loss_rows_cpp.chunk_gemms_(tile, 4, None, weight, None, False, True, None, None, 1.0, None, None,
                                   torch.zeros(40), None)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The rows [start, stop) of each call the losses below make to chunk_step_ (the fused pass's kernel)."""
    calls = []
    real = loss_rows_cpp.chunk_step_

    def spy(*args):
        calls.append(args[8:10])
        return real(*args)
    monkeypatch.setattr(loss_rows_cpp, "chunk_step_", spy)
    return calls


def _reference_nll(h, w, y, b, temperature):
    logp = reference_linear_logprobs(h, w, y, b, temperature=temperature)
    live = (y != -100).to(D)
    return -(logp * live).sum() / live.sum()


@needs_kernel
@pytest.mark.usefixtures("products")
@pytest.mark.parametrize("h", [48, 64])  # 64: AMX's d_weight update (H a multiple of 32), the last 5 lines on AVX-512
@pytest.mark.parametrize("with_bias, temperature, chunk_rows", [(False, 1.0, 16), (True, 0.7, 23), (True, 1.0, None)])
def test_nll_loss_through_the_fused_pass_matches_float64(kernel_calls, with_bias, temperature, chunk_rows, h):
    chunk_rows = chunk_rows or chunk_pass_fused.fused_chunk_max_rows()  # None: the widest these tiles take
    g = torch.Generator().manual_seed(1)
    n, v = 101, 389
    h64, w64 = torch.randn(n, h, generator=g, dtype=D), torch.randn(v, h, generator=g, dtype=D) * 0.3
    b64 = torch.randn(v, generator=g, dtype=D) if with_bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[::6] = -100
    leaves = [t.float().requires_grad_() for t in (h64, w64) + ((b64,) if with_bias else ())]
    loss = fused_linear_nll_loss(leaves[0], leaves[1], y, leaves[2] if with_bias else None, temperature=temperature,
                                 backend="cpp", chunk_rows=chunk_rows)
    (3.0 * loss).backward()
    assert kernel_calls, "the fused pass was not used"
    ref = [t.float().double().requires_grad_() for t in (h64, w64) + ((b64,) if with_bias else ())]
    want = _reference_nll(ref[0], ref[1], y, ref[2] if with_bias else None, temperature)
    (3.0 * want).backward()
    assert abs(loss.item() - want.item()) <= 2e-5 * max(1.0, abs(want.item()))
    for got, r in zip(leaves, ref):
        assert (got.grad.double() - r.grad).abs().max() <= 2e-5 * max(1.0, r.grad.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("need", ["weight", "hidden"])
def test_only_the_needed_gradient(kernel_calls, need):
    """A frozen lm_head (LoRA) or frozen hidden states: the other gradient alone, still exact."""
    g = torch.Generator().manual_seed(2)
    h64, w64 = torch.randn(40, 32, generator=g, dtype=D), torch.randn(150, 32, generator=g, dtype=D) * 0.3
    y = torch.randint(0, 150, (40,), generator=g)
    hidden, weight = h64.float().requires_grad_(need == "hidden"), w64.float().requires_grad_(need == "weight")
    fused_linear_nll_loss(hidden, weight, y, backend="cpp", chunk_rows=16).backward()
    assert kernel_calls
    ref = [h64.float().double().requires_grad_(need == "hidden"), w64.float().double().requires_grad_(need == "weight")]
    _reference_nll(ref[0], ref[1], y, None, 1.0).backward()
    got, want = (hidden, ref[0]) if need == "hidden" else (weight, ref[1])
    assert (got.grad.double() - want.grad).abs().max() < 2e-5
    assert (hidden if need == "weight" else weight).grad is None


@needs_kernel
def test_dpo_through_the_fused_pass_matches_float64(kernel_calls):
    hidden, weight, labels, ref_hidden, ref_weight = batch(h=32)
    pw = torch.tensor([0.5, 0.0, 2.0])
    fn = fa.FusedDPOLoss(beta=0.4, backend="cpp", grad_in_forward=True, chunk_rows=5)
    got = grads(lambda h, w: fn(h, w, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, pair_weights=pw).loss,
                hidden, weight)
    assert kernel_calls
    want = grads(lambda h, w: naive_dpo(h.double(), w.double(), labels, ref_hidden.double(), ref_weight.double(),
                                        0.4, "sigmoid", 0.0, None, w=pw.double()), hidden, weight)
    assert_grads_close(got, want, tol=2e-5)


@needs_kernel
def test_fused_and_blas_passes_agree(kernel_calls, monkeypatch):
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(70, 64, generator=g), torch.randn(300, 64, generator=g) * 0.2
    y = torch.randint(0, 300, (70,), generator=g)
    fused = grads(lambda h, w: fused_linear_nll_loss(h, w, y, backend="cpp", chunk_rows=32), hidden, weight)
    assert kernel_calls
    monkeypatch.setattr(chunk_pass_fused, "FUSED_CHUNK_MAX_ROWS", 0)
    n_calls = len(kernel_calls)
    blas = grads(lambda h, w: fused_linear_nll_loss(h, w, y, backend="cpp", chunk_rows=32), hidden, weight)
    assert len(kernel_calls) == n_calls
    for a, b in zip(fused, blas):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_edge_chunks_bias_only_and_compile(kernel_calls):
    """A chunk whose rows are all ignored, a gradient for the bias alone, and torch.compile (aot_eager) of the loss
    through the fused pass: all as float64 says."""
    g = torch.Generator().manual_seed(6)
    h64, w64, b64 = (torch.randn(48, 32, generator=g, dtype=D), torch.randn(90, 32, generator=g, dtype=D) * 0.3,
                     torch.randn(90, generator=g, dtype=D))
    y = torch.randint(0, 90, (48,), generator=g)
    y[16:32] = -100  # the second chunk of 16 rows
    bias = b64.float().requires_grad_()
    loss = fused_linear_nll_loss(h64.float(), w64.float(), y, bias, backend="cpp", chunk_rows=16)
    loss.backward()
    ref = b64.float().double().requires_grad_()
    want = _reference_nll(h64.float().double(), w64.float().double(), y, ref, 1.0)
    want.backward()
    assert kernel_calls and abs(loss.item() - want.item()) < 2e-5
    assert (bias.grad.double() - ref.grad).abs().max() < 2e-6
    leaves = [t.float().requires_grad_() for t in (h64, w64)]
    compiled = torch.compile(lambda a, b: fused_linear_nll_loss(a, b, y, backend="cpp", chunk_rows=16),
                             backend="aot_eager")
    compiled(*leaves).backward()
    eager = [t.float().requires_grad_() for t in (h64, w64)]
    fused_linear_nll_loss(*eager, y, backend="cpp", chunk_rows=16).backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.skipif("cpp" not in fa.available_backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("case", ["h not a multiple of 16", "h = 0", "softcap", "bf16", "wide chunks",
                                  "torch backend", "transposed weight", "old extension"])
def test_when_the_fused_pass_is_not_used(kernel_calls, monkeypatch, case):
    """Each condition the fused pass needs, broken alone: the BLAS chunk pass runs instead, with the same result."""
    g = torch.Generator().manual_seed(5)
    h, v, rows, kw, dtype = 32, 120, 16, {}, torch.float32
    if case == "h not a multiple of 16":
        h = 40
    elif case == "softcap":
        kw = {"softcap": 5.0}
    elif case == "bf16":
        dtype = torch.bfloat16
    elif case == "wide chunks":
        rows = chunk_pass_fused.FUSED_CHUNK_MAX_ROWS + 1
    elif case == "h = 0":
        h = 0
    elif case == "torch backend":
        kw = {"backend": "torch"}
    else:  # a prebuilt extension from before chunk_gemms_ (no attribute), or with its first contract (no version
        # attribute, other arguments): no fused pass, not an AttributeError or a TypeError
        from fastalign import _ext
        real = _ext.C
        monkeypatch.setattr(_ext, "C", type("OldExtension", (), {"rows_logsumexp_": real.rows_logsumexp_}))
        assert not loss_rows_cpp.chunk_gemms_supported()
        monkeypatch.setattr(_ext, "C", type("FirstContract", (), {"chunk_gemms_": real.chunk_gemms_,
                                                                  "chunk_gemms_supported": real.chunk_gemms_supported}))
        assert not loss_rows_cpp.chunk_gemms_supported()
        return
    hidden, weight = torch.randn(200, h, generator=g).to(dtype), (torch.randn(v, h, generator=g) * 0.3).to(dtype)
    y = torch.randint(0, v, (200,), generator=g)
    view = (lambda w: w.t().contiguous().t()) if case == "transposed weight" else (lambda w: w)  # same values
    got = grads(lambda a, b: _nll_rows(a, view(b), y, rows, {"backend": "cpp", **kw}), hidden, weight)
    assert not kernel_calls
    want = grads(lambda a, b: _nll_rows(a.double(), b.double(), y, rows, {**kw, "backend": "torch"}), hidden, weight)
    if h == 0:  # no features: a uniform distribution, zero-sized gradients (the kernel would divide by H)
        assert abs(got[0].item() - want[0].item()) < 1e-6 and got[2].shape == (v, 0)
        return
    assert_grads_close(got, want, tol=3e-2 if dtype == torch.bfloat16 else 2e-5)


def _nll_rows(hidden, weight, y, rows, kw):
    """The NLL through the gradient-in-forward path (FusedSFT's row order: no pair grouping)."""
    from fastalign.chunk_pass import row_bounds, run_grad_in_forward
    n = hidden.shape[0]
    logp, carrier = run_grad_in_forward(hidden, weight, None, y, row_bounds(n, rows), lambda s, e, lp: -torch.ones(
        e - s, dtype=lp.dtype) / n, temperature=1.0, softcap=kw.get("softcap"), backend=kw["backend"])
    return -logp.sum() / n + carrier


def test_info_and_the_switch_name_the_tiles_that_run():
    """`fastalign info` names the thin-chunk tiles this CPU runs; set_chunk_avx512(False) makes them AVX2 wherever the
    kernel runs at all (an AVX-512 CPU has AVX2 too), and the old setting comes back."""
    from fastalign.cli.info import info_dict
    isa = loss_rows_cpp.chunk_gemms_isa()
    shown = info_dict()["cpu_chunk_tiles"]
    assert shown == isa if isa else shown.startswith("none")
    saved = loss_rows_cpp.set_chunk_avx512(False)
    try:
        assert loss_rows_cpp.chunk_gemms_isa() == ("avx2" if isa else "")
    finally:
        loss_rows_cpp.set_chunk_avx512(saved)
    assert loss_rows_cpp.chunk_gemms_isa() == isa


@needs_kernel
def test_avx2_tiles_take_chunks_of_at_most_64_rows(kernel_calls):
    """With the AVX2 tiles the fused pass takes chunks of up to FUSED_CHUNK_MAX_ROWS_AVX2 rows, wider ones go to BLAS
    chunks (faster there, chunk_pass_fused's comment); the AVX-512 tiles take up to FUSED_CHUNK_MAX_ROWS. The result
    is the same either way."""
    g = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(200, 32, generator=g), torch.randn(120, 32, generator=g) * 0.3
    y = torch.randint(0, 120, (200,), generator=g)
    narrow, wide = chunk_pass_fused.FUSED_CHUNK_MAX_ROWS_AVX2, chunk_pass_fused.FUSED_CHUNK_MAX_ROWS_AVX2 + 16
    saved = loss_rows_cpp.set_chunk_avx512(False)
    try:
        assert chunk_pass_fused.fused_chunk_max_rows() == narrow
        got_narrow = grads(lambda a, b: _nll_rows(a, b, y, narrow, {"backend": "cpp"}), hidden, weight)
        assert kernel_calls and max(e - s for s, e in kernel_calls) == narrow
        kernel_calls.clear()
        got_wide = grads(lambda a, b: _nll_rows(a, b, y, wide, {"backend": "cpp"}), hidden, weight)
        assert not kernel_calls
    finally:
        loss_rows_cpp.set_chunk_avx512(saved)
    if loss_rows_cpp.chunk_gemms_isa() != "avx2":  # this CPU has AVX-512: its tiles take the wider chunks
        assert chunk_pass_fused.fused_chunk_max_rows() == chunk_pass_fused.FUSED_CHUNK_MAX_ROWS
        grads(lambda a, b: _nll_rows(a, b, y, wide, {"backend": "cpp"}), hidden, weight)
        assert kernel_calls and max(e - s for s, e in kernel_calls) == wide
    want = grads(lambda a, b: _nll_rows(a.double(), b.double(), y, wide, {"backend": "torch"}), hidden, weight)
    assert_grads_close(got_narrow, want, tol=2e-5)
    assert_grads_close(got_wide, want, tol=2e-5)
