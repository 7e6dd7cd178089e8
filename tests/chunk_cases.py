"""Shared by the fused thin-chunk tests (test_chunk_gemms.py, test_chunk_step.py): the skip mark for machines
without the kernel, the reference dtype and a two-thread fixture."""
import pytest
import torch

import fastalign as fa
from fastalign.backends import loss_rows_cpp

needs_kernel = pytest.mark.skipif("cpp" not in fa.available_backends() or not loss_rows_cpp.chunk_gemms_supported(),
                                  reason="chunk_gemms_ needs the C++ extension and a CPU with AVX-512 or AVX2")
D = torch.float64


@pytest.fixture
def two_threads():
    """Two threads whatever the machine: the per-thread partial sums of E^T W are then combined."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)
