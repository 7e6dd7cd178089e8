"""Timing and peak-memory measurement shared by the demo and the benchmarks."""
import os
import statistics
import sys
import threading
import time

import torch


def _sync(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, *, warmup=1, repeats=3, device=None):
    """Median wall time in seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MEASURE = 1 << 17  # while PeakMemory measures: every large tensor mmap'd
MMAP_THRESHOLD_MAX = 32 << 20     # glibc's ceiling for its dynamic threshold on 64-bit, where a long process ends up


def _glibc_call(name, *args):
    """libc.so.6's ``name(*args)`` on Linux; nothing elsewhere or where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        getattr(ctypes.CDLL("libc.so.6"), name)(*args)
    except (OSError, AttributeError):
        pass


def set_mmap_threshold(nbytes):
    """Fix glibc's mmap threshold (Linux; a no-op elsewhere).

    glibc raises its threshold (up to MMAP_THRESHOLD_MAX) each time a large block is freed; later tensors under
    that size then come from the heap and stay resident after they are freed, so RSS under-reports the next
    peak. PeakMemory sets MMAP_THRESHOLD_MEASURE on entry, so that freed tensors leave the resident set, and
    MMAP_THRESHOLD_MAX on exit: timed runs outside it then pay no page faults a training process would not pay.
    """
    _glibc_call("mallopt", _M_MMAP_THRESHOLD, int(nbytes))


def release_free_heap():
    """Hand the heap's free memory back to the OS (glibc's malloc_trim; Linux only, a no-op elsewhere).

    A large request is served from free heap chunks before glibc considers mmap, whatever the threshold: memory
    freed earlier under a high threshold (a warm-up run) would be reused without raising RSS, and a peak measured
    from RSS would miss it. PeakMemory calls this on entry, before it reads the baseline."""
    _glibc_call("malloc_trim", 0)


class PeakMemory:
    """Peak memory above the level at entry, in bytes, of what runs inside the block.

    CUDA: the caching allocator's own peak statistic (exact). CPU: resident set size sampled every
    millisecond by a thread (large tensors are mmap'd and returned to the OS when freed, so RSS follows
    them); short spikes below ~1 ms can be missed, which only favours the baseline.
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            set_mmap_threshold(MMAP_THRESHOLD_MEASURE)
            release_free_heap()
            self._base = _rss_bytes()
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._peak = max(self._peak, _rss_bytes())
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(0, self._peak - self._base)
            set_mmap_threshold(MMAP_THRESHOLD_MAX)
        return False
