"""Nearest-neighbour counting, portable PyTorch backend (chunked cdist + argmin): the baseline.

Every nn_count backend has one contract (``fastalign.clone_robust`` prepares the arguments):

    count(points [M, d] fp32, sq_norms [M] fp32, group_start [G + 1] int64, keys [G, d] int32,
          width [G, d] fp32, num_samples) -> counts int64 [M]

``points`` are sorted by group (group g owns rows group_start[g]:group_start[g+1]) and centred on their
group's box; ``sq_norms`` = |points|^2. For each group, sample i (0 <= i < num_samples) has coordinates
s_j = (u(i, keys[g, j]) - 1/2) * width[g, j] (the box, centred), and counts[m] is the number of samples of
m's group whose nearest point (Euclidean, first index on ties) is m.

The uniforms come from a counter-based hash, identical bit for bit in torch, C++ and Triton, so nothing
sample-sized is stored and every backend draws the same points:
    v = h(h(i ^ key) + key)   (uint32 arithmetic),   u = ((v >> 8) | 1) * 2^-24   in (0, 1), exact in fp32
with h the "lowbias32" integer hash (x ^= x >> 16; x *= 0x21f0aaad; x ^= x >> 15; x *= 0x735a2d97;
x ^= x >> 15). The per-(group, dimension) keys are derived from the seed in ``fastalign.clone_robust``.
"""
import torch

HASH_MUL1 = 0x21F0AAAD
HASH_MUL2 = 0x735A2D97
MASK32 = 0xFFFFFFFF
# One chunk's [G, samples, M_max] distance tensor holds about this many elements (64 MiB in fp32).
CHUNK_ELEMENTS = 1 << 24


def hash32(x):
    """lowbias32 on uint32 values held in an int64 tensor (products wrap mod 2^64; the mask keeps 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * HASH_MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * HASH_MUL2) & MASK32
    return x ^ (x >> 15)


def uniforms(index, keys):
    """u [..., n, d] in (0, 1) fp32 for sample indices index [n] int64 and keys [..., 1, d] int64 (uint32)."""
    i = index.view(-1, 1)
    v = hash32(((hash32(i ^ keys) + keys) & MASK32))
    return ((v >> 8) | 1).to(torch.float32) * (2.0 ** -24)


def samples(index, keys, width):
    """The sample points [G, n, d] fp32 (centred box coordinates) for indices [n] of every group."""
    k = (keys.to(torch.int64) & MASK32).unsqueeze(1)           # [G, 1, d]
    return (uniforms(index.to(torch.int64), k) - 0.5) * width.unsqueeze(1)


def count(points, sq_norms, group_start, keys, width, num_samples):
    g = group_start.numel() - 1
    m_total, d = points.shape
    sizes = group_start[1:] - group_start[:-1]
    m_max = int(sizes.max())
    # all groups in one batched cdist: pad each group to m_max alternatives; padding is never the nearest
    slot = torch.arange(m_total, device=points.device) - torch.repeat_interleave(group_start[:-1], sizes)
    owner = torch.repeat_interleave(torch.arange(g, device=points.device), sizes)
    padded = points.new_zeros(g, m_max, d)
    padded[owner, slot] = points
    is_pad = torch.ones(g, m_max, dtype=torch.bool, device=points.device)
    is_pad[owner, slot] = False
    hits = torch.zeros(g, m_max, dtype=torch.int64, device=points.device)
    chunk = max(1, min(num_samples, CHUNK_ELEMENTS // max(1, g * m_max)))
    for i0 in range(0, num_samples, chunk):
        index = torch.arange(i0, min(num_samples, i0 + chunk), device=points.device)
        s = samples(index, keys, width)                        # [G, n, d]
        dist = torch.cdist(s, padded)                          # [G, n, M_max]
        dist.masked_fill_(is_pad.unsqueeze(1), float("inf"))
        nearest = dist.argmin(dim=2)                           # [G, n]
        hits.scatter_add_(1, nearest, torch.ones_like(nearest))
    return hits[owner, slot]
