"""Nearest-neighbour counting, Triton backend (kernels/nn_count.py). Contract: see nn_count_torch.py."""
import torch

from fastalign.kernels.nn_count import nn_count


def count(points, sq_norms, group_start, keys, width, num_samples):
    return nn_count(points, _first_copies_only(points, sq_norms, group_start), group_start, keys, width, num_samples)


def _first_copies_only(points, sq_norms, group_start):
    """sq_norms [M] with +inf at every exact copy of an earlier alternative of its group, so that the first copy wins
    all their samples, as the contract says. The kernel's tl.dot need not round identical rows alike: in the CPU
    interpreter it is numpy's matmul, whose BLAS computes a tile's columns in blocks of different shapes (on a 2-core
    AMD EPYC a copy took 2 of its original's 19 samples). An infinite score never wins (the kernel's comparisons are
    strict), and the first copy keeps its own finite one."""
    m = points.shape[0]
    if m < 2:
        return sq_norms
    sizes = group_start[1:] - group_start[:-1]
    group = torch.repeat_interleave(torch.arange(sizes.numel(), device=points.device), sizes)
    rows = torch.cat([group.unsqueeze(1).double(), points.double()], 1)  # exact: fp32 values and group ids
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    index = torch.arange(m, device=points.device)
    first = torch.full((m,), m, dtype=index.dtype, device=points.device).scatter_reduce(0, inverse, index, "amin")
    copy = first[inverse] != index
    return sq_norms.masked_fill(copy, float("inf")) if bool(copy.any()) else sq_norms
