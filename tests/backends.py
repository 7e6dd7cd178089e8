"""Which backends the CPU tests exercise: triton only under the interpreter (on a CUDA machine its tests
with CPU tensors would be refused; the gpu-marked tests cover it there)."""
import os

import fastalign as fa


def cpu_backends():
    names = [b for b in ("torch", "cpp", "triton") if b in fa.available_backends()]
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        names = [b for b in names if b != "triton"]
    return names
