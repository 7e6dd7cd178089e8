"""nn_count backends (torch / cpp / triton) against an independent float64 brute-force reference.

The reference re-implements the documented sample generator in numpy (uint32 arithmetic) and assigns every
sample to its nearest point in float64 with materialized distances."""
import numpy as np
import pytest
import torch

from fastalign.backends import get_backend
from fastalign.clone_robust import sample_keys
from tests.backends import cpu_backends


def _hash32(x):
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x21F0AAAD)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x735A2D97)
    x ^= x >> np.uint32(15)
    return x


def reference_counts(points, group_start, keys, width, num_samples):
    """counts [M] and, per group, the float64 distance gap between the best and second-best point of each
    sample (small gaps are near-ties that fp32 may resolve either way)."""
    points = points.double().numpy()
    keys = keys.numpy().view(np.uint32)
    width = width.double().numpy()
    start = group_start.tolist()
    counts = np.zeros(points.shape[0], dtype=np.int64)
    gaps = []
    with np.errstate(over="ignore"):
        for g in range(len(start) - 1):
            i = np.arange(num_samples, dtype=np.uint32)[:, None]
            k = keys[g][None, :]
            v = _hash32(_hash32(i ^ k) + k)
            u = ((v >> np.uint32(8)) | np.uint32(1)).astype(np.float64) * 2.0 ** -24
            s = (u - 0.5) * width[g][None, :].astype(np.float32).astype(np.float64)
            x = points[start[g]:start[g + 1]]
            dist = ((s[:, None, :] - x[None, :, :]) ** 2).sum(-1)
            nearest = dist.argmin(1)
            counts[start[g]:start[g + 1]] += np.bincount(nearest, minlength=x.shape[0])
            part = np.sort(dist, 1)
            gaps.append(part[:, 1] - part[:, 0] if x.shape[0] > 1 else np.full(num_samples, np.inf))
    return counts, np.concatenate(gaps)


def _problem(sizes, d, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    m = sum(sizes)
    points = (torch.randn(m, d, generator=g) * scale).float()
    start = torch.tensor([0] + list(np.cumsum(sizes)), dtype=torch.int64)
    keys = sample_keys(seed, torch.arange(len(sizes)), d)
    width = (torch.rand(len(sizes), d, generator=g) * 3 + 0.5).float()
    return points, (points.double() ** 2).sum(1).float(), start, keys, width


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("sizes,d,num_samples", [
    ([7], 1, 300),                 # one group, a line
    ([5, 17, 2], 3, 200),          # ragged groups, one launch
    ([40], 33, 130),               # d not a power of two; several alternative tiles; ragged sample tail
    ([3, 9], 150, 70),             # d above the Triton single-tile limit (chunked k loop)
])
def test_counts_match_float64_reference(backend, sizes, d, num_samples):
    points, sq, start, keys, width = _problem(sizes, d)
    got = get_backend(backend, op="nn_count").count(points, sq, start, keys, width, num_samples)
    want, gaps = reference_counts(points, start, keys, width, num_samples)
    assert got.dtype == torch.int64 and got.shape == (sum(sizes),)
    assert int(got.sum()) == num_samples * len(sizes)
    # fp32 distances may flip only near-ties; there must be (almost) none at these sizes
    n_close = int((gaps < 1e-4 * (1 + np.abs(gaps).max())).sum())
    assert np.abs(got.numpy() - want).sum() <= 2 * n_close, (got.numpy(), want)


def test_backends_agree_exactly_on_counts():
    backends = cpu_backends()
    points, sq, start, keys, width = _problem([11, 6, 30], 8, seed=3)
    counts = [get_backend(b, op="nn_count").count(points, sq, start, keys, width, 257) for b in backends]
    for b, c in zip(backends[1:], counts[1:]):
        assert torch.equal(c, counts[0]), b


def _cpp_kernels():
    if "cpp" not in cpu_backends():
        return []
    from fastalign.backends import nn_count_cpp
    try:
        return nn_count_cpp.kernels()
    except RuntimeError:  # a stale build: the tests below run once and report it, collection does not fail
        return ["auto"]


@pytest.mark.parametrize("kernel", _cpp_kernels())
@pytest.mark.parametrize("sizes,d,num_samples", [
    # a group of 35 panels of 32 columns in two cache blocks (992 alternatives each at d=33), packed once, with a
    # ragged last panel; and a small group packed per block of samples, in the same call
    ([1100, 7], 33, 500),
    ([5, 70, 31, 12], 8, 50),  # small groups only: 8-, 16- and 32-column tiles, groups ending inside a panel
])
def test_every_cpp_kernel_matches_float64_reference(kernel, sizes, d, num_samples):
    """Each micro-kernel this CPU has (AVX-512, AVX2, baseline), not only the one the op picks here."""
    from fastalign.backends import nn_count_cpp
    points, sq, start, keys, width = _problem(sizes, d, seed=6)
    got = nn_count_cpp.count_with_kernel(points, sq, start, keys, width, num_samples, kernel)
    want, gaps = reference_counts(points, start, keys, width, num_samples)
    if sizes[0] == 1100:  # the second cache block and the last panel must win samples, or they go untested
        assert want[992:1100].sum() > 0 and want[1088:1100].sum() > 0
    assert int(got.sum()) == num_samples * len(sizes)
    n_close = int((gaps < 1e-4 * (1 + np.abs(gaps).max())).sum())
    assert np.abs(got.numpy() - want).sum() <= 2 * n_close, (kernel, got.numpy(), want)


@pytest.mark.parametrize("kernel", _cpp_kernels())
def test_cpp_kernels_give_exact_duplicates_to_the_first_as_argmin_does(kernel):
    """Clones: an exact duplicate ties its original in every score; the first index wins, as torch.argmin's
    does, whether the two share a lane (o, o + 32), not (o, o + 17), or sit in different cache blocks (o, 1050)."""
    from fastalign.backends import nn_count_cpp
    points, sq, start, keys, width = _problem([1100], 33, seed=6)
    before = nn_count_cpp.count_with_kernel(points, sq, start, keys, width, 500, kernel)  # its own (see below)
    o = int(before[:900].argmax())  # the original: a point that wins many samples
    dups = [o + 32, o + 17, 1050]
    for dup in dups:
        points[dup] = points[o]
    sq = (points.double() ** 2).sum(1).float()
    got = nn_count_cpp.count_with_kernel(points, sq, start, keys, width, 500, kernel)
    torch_counts = get_backend("torch", op="nn_count").count(points, sq, start, keys, width, 500)
    assert int(got[o]) >= int(before[o]) > 5 and int(got[dups].sum()) == 0
    assert int(torch_counts[dups].sum()) == 0


@pytest.mark.parametrize("backend", cpu_backends())
def test_every_backend_gives_exact_duplicates_to_the_first(backend):
    """Clones (exact duplicates) on every backend: the first index takes all their samples, as argmin does."""
    points, sq, start, keys, width = _problem([40], 8, seed=6)
    # the backend's own counts before: backends may split a near-tie differently (rounding), so another backend's
    # count is no bound (the Triton interpreter gave the original 17 samples where torch gave it 19, on an AMD EPYC)
    before = get_backend(backend, op="nn_count").count(points, sq, start, keys, width, 300)
    o = int(before[:20].argmax())
    dups = [o + 16, o + 5, 39]
    for dup in dups:
        points[dup] = points[o]
    sq = (points.double() ** 2).sum(1).float()
    got = get_backend(backend, op="nn_count").count(points, sq, start, keys, width, 300)
    assert int(got[o]) >= int(before[o]) > 5 and int(got[dups].sum()) == 0


@pytest.mark.parametrize("group_start", [[0, 0, 5], [0, 5, 5], [0, 2, 2, 5]])
def test_cpp_nn_count_skips_empty_groups_like_torch(group_start):
    """An empty group, first, last or between two others: no alternative to count, the others as in torch."""
    if "cpp" not in cpu_backends():
        pytest.skip("no C++ extension")
    points, sq, _, keys, width = _problem([5], 4)
    g = len(group_start) - 1
    keys, width = keys.repeat(g, 1), width.repeat(g, 1)
    start = torch.tensor(group_start)
    want = get_backend("torch", op="nn_count").count(points, sq, start, keys, width, 40)
    for kernel in _cpp_kernels():
        from fastalign.backends import nn_count_cpp
        got = nn_count_cpp.count_with_kernel(points, sq, start, keys, width, 40, kernel)
        assert torch.equal(got, want), (kernel, got, want)


def test_cpp_nn_count_rejects_unknown_kernels_and_bad_group_bounds():
    if "cpp" not in cpu_backends():
        pytest.skip("no C++ extension")
    from fastalign.backends import nn_count_cpp
    points, sq, start, keys, width = _problem([5], 4)
    with pytest.raises(RuntimeError, match="kernel 'sse9' is not supported on this CPU; supported: auto"):
        nn_count_cpp.count_with_kernel(points, sq, start, keys, width, 10, "sse9")
    with pytest.raises(RuntimeError, match="group_start must run from 0 to M = 5, got 0 to 4"):
        nn_count_cpp.count_with_kernel(points, sq, torch.tensor([0, 4]), keys, width, 10, "auto")
    with pytest.raises(RuntimeError, match=r"group_start must not decrease \(group 1\)"):
        nn_count_cpp.count_with_kernel(points, sq, torch.tensor([0, 6, 5]), keys.repeat(2, 1), width.repeat(2, 1),
                                       10, "auto")


def test_sample_generator_matches_reference_bits():
    """The torch generator, the shared source of truth, against the numpy rewrite above."""
    from fastalign.backends.nn_count_torch import samples
    keys = sample_keys(123, torch.tensor([0, 5]), 4)
    width = torch.tensor([[1.0, 2.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]])
    s = samples(torch.arange(1000), keys, width)
    k = keys.numpy().view(np.uint32)
    with np.errstate(over="ignore"):
        i = np.arange(1000, dtype=np.uint32)[:, None]
        v = _hash32(_hash32(i ^ k[0][None]) + k[0][None])
    u = ((v >> np.uint32(8)) | np.uint32(1)).astype(np.float32) * np.float32(2.0 ** -24)
    assert np.array_equal(s[0].numpy(), (u - np.float32(0.5)) * width[0].numpy())
    assert float(s[0].abs().max(0).values[1]) <= 1.0 and float(s[0].abs().max(0).values[1]) > 0.99


def test_cpp_source_keeps_blas_out_of_parallel_regions():
    """DESIGN.md's CPU threading rule, checked structurally: no at::mm/matmul/addmm in nn_count.cpp."""
    import pathlib
    src = (pathlib.Path(__file__).parents[1] / "csrc" / "nn_count.cpp").read_text()
    for call in ("at::mm", "at::matmul", "addmm", "at::bmm", ".mm(", "cblas"):
        assert call not in src, call


def test_a_stale_extension_is_named_not_an_attribute_error(monkeypatch):
    """A checkout updated without rebuilding keeps a prebuilt _C that lacks the kernel choice: say so."""
    from fastalign import _ext
    from fastalign.backends import nn_count_cpp
    monkeypatch.setattr(_ext, "C", object(), raising=False)
    with pytest.raises(RuntimeError, match=r"built from older sources than this checkout's csrc/nn_count.cpp"):
        nn_count_cpp.kernels()
