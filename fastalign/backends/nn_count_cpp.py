"""Nearest-neighbour counting, C++ CPU backend (csrc/nn_count.cpp) as a torch.library custom op.
Contract: see nn_count_torch.py."""
import torch

from fastalign import _ext

BLOCK_SAMPLES = 240        # samples per parallel task (a multiple of the micro-tiles' 12 (AVX-512) and 6 rows)
PACKED_BYTES = 128 * 1024  # one packed block of alternatives [d, block] stays in L2


def _block_alternatives(d):
    """Alternatives per packed block: a multiple of the widest micro-tile's 32 columns (AVX-512)."""
    return max(32, min(4096, PACKED_BYTES // (4 * max(d, 1))) // 32 * 32)


@torch.library.custom_op("fastalign::cpp_nn_count", mutates_args=())
def _count(points: torch.Tensor, sq_norms: torch.Tensor, group_start: torch.Tensor, keys: torch.Tensor,
           width: torch.Tensor, num_samples: int) -> torch.Tensor:
    return _ext.C.nn_count(points, sq_norms, group_start, keys, width, num_samples, BLOCK_SAMPLES,
                           _block_alternatives(points.shape[1]))


@_count.register_fake
def _(points, sq_norms, group_start, keys, width, num_samples):
    return points.new_empty(points.shape[0], dtype=torch.int64)


def count(points, sq_norms, group_start, keys, width, num_samples):
    return _count(points, sq_norms, group_start, keys, width, num_samples)


def kernels():
    """The micro-kernels this CPU can run, widest first ("avx512", "avx2", "baseline"); the op uses the first."""
    return list(_current_extension().nn_count_kernels())


def count_with_kernel(points, sq_norms, group_start, keys, width, num_samples, kernel):
    """``count`` with a named micro-kernel (one of ``kernels()``): the tests compare every kernel this CPU has."""
    return _current_extension().nn_count(points, sq_norms, group_start, keys, width, num_samples, BLOCK_SAMPLES,
                                         _block_alternatives(points.shape[1]), kernel)


def _current_extension():
    """The extension, or a clear error when it was built from older sources than these (a checkout updated
    without rebuilding keeps its prebuilt fastalign._C, which lacks the kernel choice)."""
    ext = _ext.C
    if not hasattr(ext, "nn_count_kernels"):
        raise RuntimeError(f"the C++ extension ({_ext.PATH}) was built from older sources than this checkout's "
                           "csrc/nn_count.cpp: rebuild it (`make install` or `pip install -e .`)")
    return ext
