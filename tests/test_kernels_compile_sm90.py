"""Compile the Triton kernels ahead of time for Hopper (sm_90) on this CPU machine, specialized the way the GPU
JIT specializes them (tests/sm90_compile.py: the launchers' own arguments through Triton's own specialization, so
16-divisible pointers, sizes and strides carry tt.divisibility=16 and unit strides become constants). The
interpreter runs the kernels' math but not the GPU compiler: this catches what only a GPU build shows (lowering
errors, tiles that overflow the H100's shared memory once loads are pipelined, register spills) and checks that
the 16-bit tile matmuls lower to Hopper's warp-group MMA (wgmma). Runs in a subprocess: TRITON_INTERPRET=1
replaces @triton.jit functions for the rest of the suite.

By default it compiles, per dtype, every fixed-tile kernel and the autotuned kernels' largest surviving config
(by the pruner's estimate); FASTALIGN_SM90_ALL=1 compiles every config the pruner keeps (a few minutes on 2 cores
without Triton's cache)."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)


def compile_sm90(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sm90_compile.py"), *args], env=env,
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0 and "ImportError" in r.stderr and ("GPUTarget" in r.stderr or "native_specialize_impl"
                                                            in r.stderr):
        pytest.skip("this triton cannot compile ahead of time for a GPU target")
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)["results"]


def check(results):
    kernels = {(k["kernel"], k["dtype"]) for k in results}
    for name in ("fwd", "bwd", "det_dh", "det_dw", "d_chunk"):
        for dtype in ("bf16", "fp32"):
            assert (name, dtype) in kernels, f"{name} {dtype} was not compiled"
    for k in results:
        what = f"{k['kernel']} {k['dtype']} {k['layout']} {k['blocks']} warps={k['num_warps']} stages={k['num_stages']}"
        # compiled as the JIT will: 16-aligned pointers and 16-divisible sizes specialized, unit strides constant
        assert {"h_ptr", "w_ptr", "N", "V", "H"} <= set(k["divisible"]), (what, k["divisible"])
        assert {"stride_hk", "stride_wk" if k["layout"] == "contiguous" else "stride_wv"} <= set(k["constants"]), what
        assert k["cubin"] > 0, what
        assert k["shared"] <= H100_MAX_SHARED, f"{what} needs {k['shared']} B of shared memory"
        if k["estimate"] is not None:  # the pruner's estimate must not undercount what the compiler allocates
            assert k["shared"] <= k["estimate"], (what, k["shared"], k["estimate"])
        if k["dtype"] == "bf16":
            assert k["wgmma"], f"{what}: bf16 tile matmul did not lower to wgmma"
        # fp32 has its own tiles so that it does not spill (tuned for contiguous inputs: a transposed weight's
        # fp32 forward (64, 64, 64) build keeps a 24 B stack frame)
        if k["dtype"] == "fp32" and k["layout"] == "contiguous" and k["spill_bytes"] is not None:
            assert k["spill_bytes"] == 0, f"{what}: {k['spill_bytes']} B stack frame (spills), {k['n_regs']} registers"


def test_kernels_compile_for_sm90_as_specialized_by_the_jit():
    check(compile_sm90())


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTALIGN_SM90_ALL") != "1",
                    reason="every surviving config: minutes of compiling; set FASTALIGN_SM90_ALL=1")
def test_every_surviving_config_compiles_for_sm90():
    check(compile_sm90("--all"))
    check(compile_sm90("--layout", "transposed"))


def test_pruner_drops_configs_over_the_h100_limit_and_splits_by_dtype():
    """The estimate covers what sm_90 builds specialized by the JIT were measured to need (bf16 backward
    (64, 256, 64) x 3 stages: 253952 B, (128, 256, 64) x 3 stages: 278528 B, both over 232448) and the pruner
    keeps each dtype's own list."""
    import torch
    from fastalign.kernels import _common, linear_logprobs_bwd as B, linear_logprobs_fwd as F

    def cfg(bn, bv, bk, stages):
        return triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, "GROUP_N": 8}, num_warps=8,
                             num_stages=stages)
    over = [cfg(64, 256, 64, 3), cfg(128, 256, 64, 3)]
    for c, measured in zip(over, (253952, 278528)):
        assert _common.shared_memory_estimate(c, 2, "bwd") >= measured > _common.SHARED_MEMORY_BUDGET
    bf16 = {"h_ptr": torch.empty(0, dtype=torch.bfloat16)}
    fp32 = {"h_ptr": torch.empty(0, dtype=torch.float32)}
    fits = cfg(128, 128, 64, 3)
    assert _common.shared_memory_pruner("bwd")(over + [fits], bf16) == [fits]
    for module in (F, B):
        kept16, kept32 = module.PRUNE(module._CONFIGS, bf16), module.PRUNE(module._CONFIGS, fp32)
        assert kept16 and all(any(c is d for d in module._CONFIGS_16BIT) for c in kept16)
        assert kept32 and all(any(c is d for d in module._CONFIGS_FP32) for c in kept32)
        for size, kept in ((2, kept16), (4, kept32)):
            assert all(module.PRUNE.estimate(c, size) <= H100_MAX_SHARED for c in kept)
