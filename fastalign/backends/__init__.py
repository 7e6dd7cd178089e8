"""The single dispatch point: which backend computes the fused op for given tensors.

Every backend module exposes the same contract (targets already mapped so that -1 means ignored):

    forward(hidden [N,H], weight [V,H], bias [V]|None, targets [N] int64, opts, save_for_hidden: bool)
        -> (logp fp32 [N], lse fp32 [N], hidden_grad_basis fp32 [N,H] | None)
    backward(grad fp32 [N], hidden, weight, bias, targets, lse, hidden_grad_basis, opts,
             need_hidden, need_weight, need_bias) -> (d_hidden | None, d_weight | None, d_bias | None)

``hidden_grad_basis`` lets a backend that can compute d_hidden per unit upstream gradient during forward
(the C++ one) hand it to backward, where d_hidden = grad[:, None] * basis.
"""
import importlib
import os

BACKENDS = ("triton", "cpp", "torch")


def _triton_usable():
    try:
        import torch
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton is not importable ({type(exc).__name__}: {exc}); `pip install triton`"
    if torch.cuda.is_available():
        return True, None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, None
    return False, ("triton needs a CUDA device, or TRITON_INTERPRET=1 (set before importing triton) "
                   "to run its kernels in the CPU interpreter")


def _why_unavailable(name):
    if name == "torch":
        return None
    if name == "cpp":
        from fastalign import _ext
        if _ext.C is None:
            return (f"the C++ extension fastalign._C is not built ({_ext.ERROR}); reinstall with a C++ "
                    "compiler and torch present: `pip install --no-build-isolation -e .` (without FASTALIGN_NO_EXT=1)")
        return None
    if name == "triton":
        ok, why = _triton_usable()
        return None if ok else why
    raise ValueError(f"unknown backend {name!r}; expected one of {('auto',) + BACKENDS}")


def available_backends():
    """Names of the backends usable in this process, e.g. ['cpp', 'torch'] on CPU, ['triton', 'torch'] with CUDA."""
    return [name for name in BACKENDS if _why_unavailable(name) is None]


_MODULES = {}
# Module of each (op, backend): linear_logprobs in {name}_backend.py, other ops in {op}_{name}.py.
OPS = ("linear_logprobs", "nn_count", "loss_rows")


def _module(name, op="linear_logprobs"):
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    key = (op, name)
    if key not in _MODULES:
        path = f"{name}_backend" if op == "linear_logprobs" else f"{op}_{name}"
        _MODULES[key] = importlib.import_module(f"fastalign.backends.{path}")
    return _MODULES[key]


def resolve_backend(backend, device, dtype=None):
    """Choose the backend name for tensors on ``device``; raise with a remedy when a forced one is missing."""
    import torch
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and dtype == torch.float64:
            return "torch"
        if device.type == "cuda":
            return "triton" if _why_unavailable("triton") is None else "torch"
        if device.type == "cpu":
            return "cpp" if _why_unavailable("cpp") is None else "torch"
        return "torch"
    why = _why_unavailable(backend)
    if backend == "triton" and dtype == torch.float64:
        raise TypeError("backend 'triton' supports float32, bfloat16 and float16 inputs, got float64; "
                        "use backend='cpp' or 'torch' for float64")
    if why is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {why}")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors only, got tensors on {device}; use backend='auto'")
    if backend == "triton" and device.type not in ("cuda", "cpu"):
        raise ValueError(f"backend 'triton' needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("backend 'triton' got CPU tensors: run with TRITON_INTERPRET=1 or move the tensors to CUDA")
    return backend


def get_backend(name, op="linear_logprobs"):
    """The backend module implementing ``op`` for ``name`` (already resolved): forward/backward for
    linear_logprobs, count for nn_count (the contract is in nn_count_torch.py), the row passes of the
    gradient-in-forward losses for loss_rows (the contract is in loss_rows_cpp.py)."""
    return _module(name, op)
