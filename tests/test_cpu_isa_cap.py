"""FASTALIGN_CPU_ISA caps the C++ extension's run-time instruction-set dispatch (csrc/arch.h), and
bench_linear_logprobs.py --cpu-isa runs itself again with that cap and MKL's and oneDNN's (bench/common.py
CPU_ISA_ENV).
The extension reads the variable when it loads, so each case runs in a fresh interpreter."""
import json
import os
import subprocess
import sys

import pytest

from fastalign import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import json; from fastalign import _ext; from fastalign.backends import loss_rows_cpp as L; "
         "c = _ext.C; print(json.dumps({'chunk': L.chunk_gemms_isa(), 'amx': L.chunk_amx_supported(), "
         "'nn_count': list(c.nn_count_kernels())}))")
needs_ext = pytest.mark.skipif(_ext.C is None, reason="no C++ extension")


def _probe(cap):
    env = {k: v for k, v in os.environ.items() if k != "FASTALIGN_CPU_ISA"}
    if cap is not None:
        env["FASTALIGN_CPU_ISA"] = cap
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_ext
def test_avx2_cap_runs_no_avx512_and_no_amx():
    native, capped = _probe(None), _probe("avx2")
    assert capped["chunk"] == ("avx2" if native["chunk"] else "")  # the AVX2 tiles where the CPU has any
    assert not capped["amx"]
    assert "avx512" not in capped["nn_count"]
    assert [k for k in native["nn_count"] if k != "avx512"] == capped["nn_count"]  # the rest as before


@needs_ext
def test_avx512_cap_only_leaves_out_amx():
    native, capped = _probe(None), _probe("avx512")
    assert not capped["amx"]
    assert capped["chunk"] == native["chunk"].replace("+amx", "")
    assert capped["nn_count"] == native["nn_count"]


def test_unknown_cap_is_refused_before_the_extension_loads(monkeypatch):
    monkeypatch.setenv("FASTALIGN_CPU_ISA", "avx1024")
    with pytest.raises(ValueError, match=r"FASTALIGN_CPU_ISA='avx1024': expected one of avx2, avx512, native"):
        _ext.check_cpu_isa_cap()
    monkeypatch.setenv("FASTALIGN_CPU_ISA", "native")
    assert _ext.check_cpu_isa_cap() == "native"


def test_bench_cpu_isa_runs_the_script_again_with_every_cap(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    from bench import common
    calls = []
    monkeypatch.setattr(common.os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    for k in common.CPU_ISA_ENV["avx2"]:
        monkeypatch.delenv(k, raising=False)
    common.rerun_with_cpu_isa("avx2", "bench/bench_linear_logprobs.py", ["--cpu-isa", "avx2", "--repeats", "3"])
    ((exe, argv, env),) = calls
    assert exe == sys.executable and argv[1].endswith(os.path.join("bench", "bench_linear_logprobs.py"))
    assert argv[2:] == ["--cpu-isa", "avx2", "--repeats", "3"]
    assert {k: env[k] for k in common.CPU_ISA_ENV["avx2"]} == {
        "FASTALIGN_CPU_ISA": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert not set(common.CPU_ISA_ENV["avx2"]) & set(os.environ)  # only the new process gets them
    for k, v in common.CPU_ISA_ENV["avx2"].items():  # already set: no second run
        monkeypatch.setenv(k, v)
    common.rerun_with_cpu_isa("avx2", "bench/bench_linear_logprobs.py", [])
    assert len(calls) == 1
