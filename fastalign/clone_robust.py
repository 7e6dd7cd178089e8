"""Clone-robust weights: each alternative's share of the answer space (Procaccia, Schiffer and Zhang,
"Clone-Robust AI Alignment", 2025).

w(y) = vol(cell(y) within S) / vol(S), where cell(y) is y's Voronoi cell among the alternatives of its group
and S a box. Estimated by drawing ``num_samples`` uniform points of S from a counter-based generator and
counting, per alternative, the samples whose nearest alternative it is (the ``nn_count`` op, one backend
call for all groups). ``weighted_mle_loss`` in ``fastalign.losses`` trains on these weights.
"""
import numbers

import torch

from fastalign.backends import get_backend, resolve_backend
from fastalign.backends.nn_count_torch import MASK32, hash32

MAX_SAMPLES = (1 << 31) - 1  # sample indices are uint32 in the generator and int32 in the kernels


def _as_embeddings(embeddings):
    if isinstance(embeddings, torch.Tensor):
        x = embeddings
    else:
        try:
            x = torch.as_tensor(embeddings)
        except Exception as exc:
            raise TypeError(f"embeddings must be a float tensor [M, d] (or array-like), got "
                            f"{type(embeddings).__name__}: {exc}") from None
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"embeddings must hold real numbers, got dtype {x.dtype}")
    if x.dim() == 1:  # M points on a line
        x = x.unsqueeze(1)
    if x.dim() != 2:
        raise ValueError(f"embeddings must be [M, d] (or [M] for points on a line), got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"embeddings have d = 0 dimensions (shape {tuple(x.shape)}); need d >= 1")
    x = x.detach().to(torch.float64)
    bad = ~torch.isfinite(x)
    if bad.any():
        row = int(bad.any(1).nonzero()[0])
        raise ValueError(f"embeddings contain NaN or Inf ({int(bad.sum())} value(s), first in row {row})")
    return x


def _as_groups(groups, m, device):
    if groups is None:
        return torch.zeros(m, dtype=torch.int64, device=device)
    g = groups if isinstance(groups, torch.Tensor) else torch.as_tensor(groups)
    if g.dtype == torch.bool or g.is_floating_point() or g.is_complex():
        raise TypeError(f"groups must be an integer tensor [M], got dtype {g.dtype}")
    if g.dim() != 1 or g.shape[0] != m:
        raise ValueError(f"groups must be [M] = [{m}] (one group id per embedding), got shape {tuple(g.shape)}")
    return g.to(device=device, dtype=torch.int64)


def _check_int(name, v, low, high=None):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    if v < low or (high is not None and v > high):
        raise ValueError(f"{name} must be in [{low}, {high if high is not None else 'inf'}], got {v}")


def project(x, dim):
    """x [M, d] float64 onto its top ``dim`` principal components (centred): [M, min(dim, d)]."""
    if dim is None or dim >= x.shape[1]:
        return x
    centred = x - x.mean(0)
    try:
        _, vectors = torch.linalg.eigh(centred.T @ centred)          # ascending eigenvalues
    except torch.linalg.LinAlgError:
        # MKL's eigh fails to converge on some CPUs when the [d, d] matrix has many repeated (zero) eigenvalues:
        # few points in many dimensions, e.g. M = 8 sparse n-gram vectors in d = 256 on a 2-core Intel Xeon with
        # two threads (one thread converged). The SVD of the [M, d] points gives the same components.
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)   # descending singular values
        out = centred @ vh[:dim].T
        return torch.nn.functional.pad(out, (0, dim - out.shape[1]))  # M < dim: the missing components are 0
    return centred @ vectors[:, -dim:].flip(1)


def sample_keys(seed, group_ids, d):
    """Per-(group, dimension) keys [G, d] int32 of the sample generator; a group's samples depend only on
    the seed and its group id, not on which other groups are present."""
    s = torch.tensor([seed & MASK32, (seed >> 32) & MASK32], dtype=torch.int64)
    base = hash32(hash32(s[0:1]) ^ s[1:2])
    gid = group_ids.to(torch.int64).cpu()
    g = hash32(hash32(((gid & MASK32) + base) & MASK32) ^ ((gid >> 32) & MASK32))      # [G]
    j = hash32((torch.arange(d, dtype=torch.int64) * 0x9E3779B9 + 0x7F4A7C15) & MASK32)  # [d]
    k = hash32(((g.view(-1, 1) ^ j.view(1, -1)) + base) & MASK32)
    return torch.where(k >= (1 << 31), k - (1 << 32), k).to(torch.int32)  # uint32 bit pattern in int32


def clone_robust_weights(embeddings, *, num_samples=1_000_000, bounds="box", groups=None, dim=None, seed=0,
                         backend="auto"):
    """Voronoi weight of each alternative within a box: float32 [M], >= 0, summing to 1 within each group.

    embeddings [M, d] float (or [M] for points on a line); bounds "box" (each group's axis-aligned bounding box,
    no padding; a dimension where all its points coincide is dropped) or (low [d], high [d]); groups [M] int
    (weights computed independently per group, all groups in one backend call); dim: project onto the top
    ``dim`` principal components first (raw high-dimensional embeddings give degenerate weights); seed: the
    samples, identical on every backend; backend: "auto", "triton", "cpp" or "torch" (as for linear_logprobs).
    Exact duplicates within a group share their point's cell equally.
    """
    x = _as_embeddings(embeddings)
    m, _ = x.shape
    device = x.device
    _check_int("num_samples", num_samples, 1, MAX_SAMPLES)
    _check_int("seed", seed, 0, (1 << 64) - 1)
    if dim is not None:
        _check_int("dim", dim, 1)
    gid = _as_groups(groups, m, device)
    labels, group_of, group_sizes = torch.unique(gid, return_inverse=True, return_counts=True)
    if int(group_sizes.min()) < 2:
        small = labels[group_sizes < 2]
        where = "" if groups is None else f" (group(s) {small[:5].tolist()} have one)"
        raise ValueError(f"embeddings: need at least M = 2 alternatives per group, got {int(group_sizes.min())}"
                         f"{where}")
    x = project(x, dim)
    d = x.shape[1]
    n_groups = labels.numel()

    # the box of every group: [G, d] centre and width
    if isinstance(bounds, str) and bounds == "box":
        big = torch.full((n_groups, d), float("inf"), dtype=torch.float64, device=device)
        low = big.scatter_reduce(0, group_of.view(-1, 1).expand(-1, d), x, "amin")
        high = (-big).scatter_reduce(0, group_of.view(-1, 1).expand(-1, d), x, "amax")
    elif isinstance(bounds, (tuple, list)) and len(bounds) == 2:
        low, high = (torch.as_tensor(b, dtype=torch.float64, device=device).reshape(-1) for b in bounds)
        if low.numel() != d or high.numel() != d:
            raise ValueError(f"bounds: low and high must each have d = {d} entries, got {low.numel()} and "
                             f"{high.numel()}")
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            raise ValueError("bounds: low and high must be finite")
        if (low >= high).any():
            j = int((low >= high).nonzero()[0])
            raise ValueError(f"bounds: need low < high in every dimension, got low[{j}] = {float(low[j])} >= "
                             f"high[{j}] = {float(high[j])}")
        low, high = low.expand(n_groups, d), high.expand(n_groups, d)
    else:
        raise TypeError(f"bounds must be 'box' or a pair (low [d], high [d]), got {bounds!r}")
    centre, width = (low + high) / 2, high - low  # a flat dimension has width 0: no sample moves in it

    # exact duplicates within a group become one point that shares its cell
    rows = torch.cat([group_of.view(-1, 1).to(torch.float64), x], 1)
    unique_rows, inverse, copies = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    u_group = unique_rows[:, 0].to(torch.int64)             # sorted: unique rows come grouped
    points = unique_rows[:, 1:] - centre[u_group]
    group_start = torch.zeros(n_groups + 1, dtype=torch.int64, device=device)
    group_start[1:] = torch.bincount(u_group, minlength=n_groups).cumsum(0)

    points32 = points.to(torch.float32).contiguous()
    sq_norms = (points32.double() ** 2).sum(1).to(torch.float32)
    keys = sample_keys(seed, labels, d).to(device)
    name = resolve_backend(backend, device, torch.float32)
    counts = get_backend(name, op="nn_count").count(points32, sq_norms, group_start, keys,
                                                    width.to(torch.float32).contiguous(), num_samples)
    share = counts.to(torch.float64) / num_samples
    return (share[inverse] / copies[inverse]).to(torch.float32)
