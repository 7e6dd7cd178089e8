"""Which backends the CPU tests exercise: triton only under the interpreter (on a CUDA machine its tests
with CPU tensors would be refused; the gpu-marked tests cover it there)."""
import os

import fastalign as fa


def cpu_backends():
    names = [b for b in ("torch", "cpp", "triton") if b in fa.available_backends()]
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        names = [b for b in names if b != "triton"]
    return names


def free_port():
    """A TCP port free on 127.0.0.1 right now, for torchrun's --master_port: a fixed port collides with another
    job on the machine (or a port still in TIME_WAIT), and the test then fails for reasons of its own."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
