"""Nearest-neighbour counting, Triton backend (kernels/nn_count.py). Contract: see nn_count_torch.py."""
from fastalign.kernels.nn_count import nn_count


def count(points, sq_norms, group_start, keys, width, num_samples):
    return nn_count(points, sq_norms, group_start, keys, width, num_samples)
