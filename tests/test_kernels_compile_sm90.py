"""Compile every Triton kernel, in every autotune configuration, ahead of time for Hopper (sm_90) on this CPU
machine. The interpreter runs the kernels' math but not the GPU compiler: this catches what only a GPU
build would show (lowering errors, tiles that overflow the H100's shared memory) and checks that the bf16
tile matmuls lower to Hopper's warp-group MMA (wgmma). Runs in a subprocess: TRITON_INTERPRET=1 replaces
@triton.jit functions for the rest of the suite."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

H100_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)

SCRIPT = r'''
import json, sys, itertools
import triton
from triton.backends.compiler import GPUTarget
from fastalign.kernels import linear_logprobs_fwd as F, linear_logprobs_bwd as B
from fastalign.kernels import linear_logprobs_bwd_deterministic as D
from fastalign.kernels import linear_logprobs_bwd_vocab_chunked as C

def signature(fn, dtype, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("h_ptr", "w_ptr", "b_ptr"):
            sig[name] = "*" + dtype
        elif name == "tgt_ptr":
            sig[name] = "*i64"
        elif name == "d_ptr":
            sig[name] = "*" + dtype
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in ("inv_temp", "softcap", "grad_filter_eps"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig

def compile_one(fn, dtype, consts, num_warps, num_stages):
    src = triton.compiler.ASTSource(fn=fn, signature=signature(fn, dtype, consts),
                                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    return {"kernel": fn.__name__, "dtype": dtype, "consts": {k2: str(v) for k2, v in consts.items()},
            "shared": k.metadata.shared, "wgmma": "warp_group_dot" in k.asm["ttgir"], "cubin": len(k.asm["cubin"])}

from concurrent.futures import ProcessPoolExecutor
import os, torch
from fastalign.kernels._common import shared_memory_estimate

prec = {"bf16": "tf32", "fp32": "ieee"}
torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}
jobs = []   # (kernel, dtype, consts, warps, stages, estimate)
for dtype in ("bf16", "fp32"):
    flags = dict(HAS_BIAS=True, HAS_SOFTCAP=True, DOT_PRECISION=prec[dtype], UPCAST_DOT=False)
    probe = {"h_ptr": torch.empty(0, dtype=torch_dtype[dtype])}
    size = probe["h_ptr"].element_size()
    for cfg in F.PRUNE(F._CONFIGS, probe):   # what the autotuner would try for this dtype
        jobs.append(("fwd", dtype, {**flags, **cfg.kwargs}, cfg.num_warps, cfg.num_stages,
                     shared_memory_estimate(cfg, size, F.PRUNE.factor)))
    for cfg in B.PRUNE(B._CONFIGS, probe):
        jobs.append(("bwd", dtype, {**flags, "COMPUTE_DH": True, "COMPUTE_DW": True, "COMPUTE_DB": True,
                                    "FILTER_GRAD": False, **cfg.kwargs},
                     cfg.num_warps, cfg.num_stages, shared_memory_estimate(cfg, size, B.PRUNE.factor)))
    blocks = {k: v for k, v in D.GPU_BLOCKS.items() if k not in ("num_warps", "num_stages")}
    jobs.append(("det_dh", dtype, {**flags, **blocks}, D.GPU_BLOCKS["num_warps"], D.GPU_BLOCKS["num_stages"], None))
    jobs.append(("det_dw", dtype, {**flags, "COMPUTE_DW": True, "COMPUTE_DB": True, **blocks},
                 D.GPU_BLOCKS["num_warps"], D.GPU_BLOCKS["num_stages"], None))
    cblocks = {k: v for k, v in C.GPU_BLOCKS.items() if k not in ("num_warps", "num_stages")}
    jobs.append(("d_chunk", dtype, {**flags, **cblocks}, C.GPU_BLOCKS["num_warps"], C.GPU_BLOCKS["num_stages"], None))
KERNELS = {"fwd": F._linear_logprobs_fwd_kernel, "bwd": B._linear_logprobs_bwd_kernel, "det_dh": D._dh_kernel,
           "det_dw": D._dw_kernel, "d_chunk": C._d_chunk_kernel}

def run(job):
    name, dtype, consts, warps, stages, estimate = job
    r = compile_one(KERNELS[name], dtype, consts, warps, stages)
    r["estimate"] = estimate
    return r

if __name__ == "__main__":
    with ProcessPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        out = list(pool.map(run, jobs))
    json.dump({"n_configs": {"fwd": len(F._CONFIGS), "bwd": len(B._CONFIGS)}, "results": out}, sys.stdout)
'''


def test_every_kernel_config_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    script = tmp_path / "compile_sm90.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 and "GPUTarget" in r.stderr and "ImportError" in r.stderr:
        pytest.skip("this triton cannot compile ahead of time for a GPU target")
    assert r.returncode == 0, r.stderr[-4000:]
    data = json.loads(r.stdout)
    results = data["results"]
    bf16 = [k for k in results if k["dtype"] == "bf16"]
    assert len(bf16) == data["n_configs"]["fwd"] + data["n_configs"]["bwd"] + 3  # nothing pruned for bf16
    for k in results:
        if k["estimate"] is not None:  # the pruning estimate must not undercount what the compiler allocates
            assert k["shared"] <= k["estimate"], k
        assert k["cubin"] > 0, k
        assert k["shared"] <= H100_MAX_SHARED, f"{k['kernel']} {k['dtype']} {k['consts']} needs {k['shared']} B"
        if k["dtype"] == "bf16":
            assert k["wgmma"], f"{k['kernel']} {k['consts']}: bf16 tile matmul did not lower to wgmma"
