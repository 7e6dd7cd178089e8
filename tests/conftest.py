import os

import pytest
import torch

# Without a GPU the Triton backend runs in the CPU interpreter (how CI tests it). Must be set before
# triton is first imported; importing torch does not import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` skips without CUDA; `@pytest.mark.gpu(count=2)` also skips with fewer than 2 GPUs."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        need = marker.kwargs.get("count", 1)
        if have < need:
            found = "no CUDA device" if have == 0 else f"{have} CUDA device(s)"
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA device(s), found {found}"))
