"""Compile fastalign's Triton kernels ahead of time for Hopper (sm_90) on a machine without a GPU, specialized
exactly as the GPU JIT would specialize them.

How the arguments are made: each launcher (linear_logprobs_forward, ..._backward, the deterministic and
vocab-chunked ones) is called with CPU tensors whose sizes and strides are all multiples of 16 and whose data
pointers are 16-byte aligned, with its kernel replaced by a recorder. The recorded arguments then go through
Triton's own specialization (`native_specialize_impl` with the CUDA backend, the function the JIT's binder
calls): pointers and ints divisible by 16 get `tt.divisibility = 16`, ints equal to 1 (a unit stride) become
constants. That is the worst case for shared memory (every load vectorizable, so every operand is pipelined
through shared memory) and the common case on a GPU (contiguous tensors, H and V multiples of 16).

Used by tests/test_kernels_compile_sm90.py (in a subprocess: TRITON_INTERPRET=1 must be unset) and by hand:
    .venv/bin/python tests/sm90_compile.py [--all] [--layout contiguous|transposed] > out.json
prints one JSON object: {"results": [...]} with, per compiled kernel, its config, `shared` (bytes, from the
compiled metadata), the pruner's estimate, registers and spill bytes (from `cuobjdump --dump-resource-usage` on
the cubin, when the bundled cuobjdump runs), and whether the tile matmuls lowered to wgmma.
"""
import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # jit functions would become interpreter functions
    sys.exit("tests/sm90_compile.py compiles for the GPU: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastalign.kernels import _common  # noqa: E402
from fastalign.kernels import linear_logprobs_bwd as B  # noqa: E402
from fastalign.kernels import linear_logprobs_bwd_deterministic as D  # noqa: E402
from fastalign.kernels import linear_logprobs_bwd_vocab_chunked as C  # noqa: E402
from fastalign.kernels import linear_logprobs_fwd as F  # noqa: E402

H100_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
N, H, V = 256, 128, 512   # every size a multiple of 16: the JIT's divisibility specialization applies
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


class _Recorder:
    """Stands in for a kernel (or an autotuner): `rec[grid](*args, **kwargs)` records the launch."""

    def __init__(self, name, fn, calls):
        self.name, self.fn, self.calls, self.cache = name, fn, calls, {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, self.fn, args, kwargs))


def _inputs(dtype, layout):
    """hidden [N, H], weight [V, H] (contiguous, or the transpose of a contiguous [H, V]), bias, targets, ..."""
    hidden = torch.randn(N, H).to(dtype)
    weight = torch.randn(V, H).to(dtype) if layout == "contiguous" else torch.randn(H, V).to(dtype).t()
    bias = torch.randn(V).to(dtype)
    targets = torch.randint(0, V, (N,))
    grad = torch.randn(N)
    lse = torch.randn(N)
    return hidden, weight, bias, targets, grad, lse


def record_launches(dtype, layout="contiguous"):
    """[(kernel name, jit function, args, kwargs)] for every kernel launch of every launcher, with bias and
    softcap on (the largest kernels) and every gradient requested."""
    calls = []
    patches = [(F, "_autotuned", _Recorder("fwd", F._linear_logprobs_fwd_kernel, calls)),
               (B, "_autotuned", _Recorder("bwd", B._linear_logprobs_bwd_kernel, calls)),
               (D, "_dh_kernel", _Recorder("det_dh", D._dh_kernel, calls)),
               (D, "_dw_kernel", _Recorder("det_dw", D._dw_kernel, calls)),
               (C, "_d_chunk_kernel", _Recorder("d_chunk", C._d_chunk_kernel, calls))]
    patches += [(m, "interpreting", lambda: False) for m in (F, B, D, C, _common)]
    saved = [(m, k, getattr(m, k)) for m, k, _ in patches]
    try:
        for m, k, v in patches:
            setattr(m, k, v)
        hidden, weight, bias, targets, grad, lse = _inputs(dtype, layout)
        F.linear_logprobs_forward(hidden, weight, bias, targets, 1.0, 30.0)
        bwd = (grad, hidden, weight, bias, targets, lse, 1.0, 30.0, True, True, True)
        B.linear_logprobs_backward(*bwd)
        D.linear_logprobs_backward_deterministic(*bwd)
        C.linear_logprobs_backward_vocab_chunked(*bwd)
    finally:
        for m, k, v in saved:
            setattr(m, k, v)
    return calls


def specialize(fn, args, kwargs):
    """(signature, constexprs, attrs, options) as the JIT's binder and _pack_args would make them."""
    named = dict(zip(fn.arg_names, args))
    named.update({k: v for k, v in kwargs.items() if k not in OPTION_KEYS})
    options = {k: v for k, v in kwargs.items() if k in OPTION_KEYS}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = named[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        if kind == "constexpr":  # an int equal to 1 (or None): the JIT makes it a constant
            signature[p.name], constexprs[(i,)] = "constexpr", spec
        else:
            signature[p.name] = kind
            if isinstance(spec, str):
                attrs[(i,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs, options


def resource_usage(cubin):
    """(registers, spill bytes) of the kernel in a cubin, from the cuobjdump Triton ships; (None, None) if it
    cannot run here. Spills show as local memory (LOCAL) and stack (STACK)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    if regs is None:
        return None, None
    return int(regs.group(1)), int(stack.group(1) if stack else 0) + int(local.group(1) if local else 0)


def jobs(dtype_names, everything, layout, unpruned=False):
    """One job per (launch, config): for the autotuned kernels the configs the pruner keeps for this dtype
    (all of them with everything=True, else only the one with the largest shared-memory estimate); for the
    fixed-tile kernels their one config."""
    out = []
    for dname in dtype_names:
        for name, fn, args, kwargs in record_launches(DTYPES[dname], layout):
            module = {"fwd": F, "bwd": B}.get(name)
            if module is None:
                out.append((name, dname, layout, fn, args, kwargs, None))
                continue
            named = dict(zip(fn.arg_names, args))
            kept = list(module._CONFIGS) if unpruned else module.PRUNE(module._CONFIGS, named)
            size = named["h_ptr"].element_size()
            estimate = getattr(module.PRUNE, "estimate", None)
            estimate = (lambda c: None) if estimate is None else (lambda c, e=estimate: e(c, size))  # noqa: E731
            if not everything:
                kept = [max(kept, key=lambda c: estimate(c) or 0)]
            for cfg in kept:
                kw = {**kwargs, **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                out.append((name, dname, layout, fn, args, kw, estimate(cfg)))
    return out


_JOBS = []  # filled before the worker processes fork (jit functions do not pickle)


def compile_job(index):
    name, dname, layout, fn, args, kwargs, estimate = _JOBS[index]
    signature, constexprs, attrs, options = specialize(fn, args, kwargs)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    regs, spills = resource_usage(k.asm["cubin"])
    blocks = {key: v for key, v in kwargs.items() if key.startswith(("BLOCK_", "GROUP_"))}
    return {"kernel": name, "dtype": dname, "layout": layout, "blocks": blocks,
            "num_warps": options.get("num_warps"), "num_stages": options.get("num_stages"),
            "divisible": sorted(fn.arg_names[i[0]] for i in attrs if attrs[i]),
            "constants": sorted(signature_name for signature_name, t in signature.items() if t == "constexpr"
                                and not fn.params[fn.arg_names.index(signature_name)].is_constexpr),
            "shared": k.metadata.shared, "estimate": estimate, "n_regs": regs, "spill_bytes": spills,
            "wgmma": "warp_group_dot" in k.asm["ttgir"], "cubin": len(k.asm["cubin"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every config the pruner keeps (default: the largest)")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--layout", default="contiguous", choices=("contiguous", "transposed"))
    ap.add_argument("--unpruned", action="store_true", help="every config in the lists, pruned or not")
    ap.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    a = ap.parse_args(argv)
    _JOBS[:] = jobs(a.dtypes.split(","), a.all or a.unpruned, a.layout, a.unpruned)
    with ProcessPoolExecutor(max_workers=a.workers, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(compile_job, range(len(_JOBS))))
    json.dump({"results": results}, sys.stdout)


if __name__ == "__main__":
    main()
