"""fastalign.profiling.PeakMemory on CPU: the peak of what runs inside the block, read from the resident set."""
import sys

import pytest
import torch

from fastalign.profiling import MMAP_THRESHOLD_MAX, PeakMemory, set_mmap_threshold

MIB = 1 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS-based measurement: Linux")
def test_peak_counts_memory_reused_from_the_heap():
    """A tensor freed under glibc's high threshold (a warm-up run) leaves its pages in the heap; the measured run's
    same-sized tensor reuses them. The peak must still count it (PeakMemory trims the heap before its baseline)."""
    set_mmap_threshold(MMAP_THRESHOLD_MAX)
    warm = torch.ones(24 * MIB // 4)  # below the 32 MiB threshold: from the heap
    del warm
    with PeakMemory("cpu") as mem:
        t = torch.ones(24 * MIB // 4)
        t += 1
    del t
    assert mem.peak_bytes >= 20 * MIB, mem.peak_bytes / MIB
    with PeakMemory("cpu") as idle:
        pass
    assert idle.peak_bytes < 8 * MIB, idle.peak_bytes / MIB
