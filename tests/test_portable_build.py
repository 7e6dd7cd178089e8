"""The C++ extension builds for CPUs other than x86-64 (csrc/arch.h).

Its x86-64 code (AVX2, AVX-512 and AMX, picked at run time) is compiled only where the target is x86-64; elsewhere
(aarch64: Graviton, Ampere, Apple silicon under Linux) the portable code is, and the thin-chunk kernel says it is
unsupported, so the fused pass uses BLAS chunks. Before, one x86 header made the whole extension fail to build on
aarch64 and the cpp backend was missing there. FASTALIGN_PORTABLE_ONLY builds the portable variant on this machine;
where an aarch64 cross compiler is installed (Debian: g++-aarch64-linux-gnu) every source is compiled for aarch64.
"""
import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest

torch_ext = pytest.importorskip("torch.utils.cpp_extension")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
HOST_CXX = os.environ.get("CXX", "c++")
CROSS_CXX = "aarch64-linux-gnu-g++"
# what only an x86-64 compiler accepts: intrinsics, their header and types, CPU feature builtins, target attributes
X86_ONLY = re.compile(r"immintrin|__builtin_cpu_(supports|init)|target\(\"|\b_mm\d*_|\b__m(128|256|512)|"
                      r"__get_cpuid|\b_tile_")


def compile_args(*extra, std="c++17"):
    """The build's flags. setup.py and _ext.py leave -std to torch (C++20 with torch 2.13, C++17 with older
    releases), so the tests compile the sources both ways."""
    includes = [f"-I{p}" for p in torch_ext.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    return [f"-std={std}", "-DTORCH_EXTENSION_NAME=_C", "-w", *includes, *extra]


def lines_of_our_sources(preprocessed):
    """The lines of preprocessor output that come from csrc/ (linemarkers say which file each line is from)."""
    ours, out = False, []
    for line in preprocessed.splitlines():
        if line.startswith("# "):
            marker = line.split('"')
            ours = len(marker) > 1 and os.path.dirname(os.path.abspath(marker[1])) == os.path.join(ROOT, "csrc")
        elif ours:
            out.append(line)
    return out


def x86_lines(source, *defines):
    text = subprocess.run([HOST_CXX, "-E", *compile_args(*defines), source], capture_output=True, text=True,
                          check=True).stdout
    return [line for line in lines_of_our_sources(text) if X86_ONLY.search(line)]


@pytest.fixture(scope="module")
def host_compiler():
    if shutil.which(HOST_CXX) is None:
        pytest.skip(f"no C++ compiler ({HOST_CXX!r})")


def test_portable_variant_leaves_out_every_x86_only_line(host_compiler):
    found = {os.path.basename(s): x86_lines(s, "-DFASTALIGN_PORTABLE_ONLY") for s in SOURCES}
    assert not any(found.values()), {name: lines[:3] for name, lines in found.items() if lines}
    # the scan finds them when they are compiled in: the kernels with x86 paths have such lines in the x86 build
    for name in ("nn_count.cpp", "linear_logprobs_chunk.cpp", "linear_logprobs_rows.cpp"):
        assert x86_lines(os.path.join(ROOT, "csrc", name)), name


def compile_all(cxx, sources, *extra, std="c++17", objects=None):
    """Compile each source, two at a time: syntax and types only, or, with objects (a folder), to objects there
    (<name>.o); returns {source: compiler errors}."""
    failures, pending = {}, list(sources)
    while pending:
        batch, pending = pending[:2], pending[2:]
        procs = []
        for s in batch:
            mode = ["-fsyntax-only"] if objects is None else \
                ["-c", "-O0", "-fPIC", "-o", os.path.join(objects, os.path.basename(s) + ".o")]
            procs.append((s, subprocess.Popen([cxx, *mode, *compile_args(*extra, std=std), s], stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True)))
        for source, proc in procs:
            output = proc.communicate(timeout=300)[0]
            if proc.returncode != 0:
                failures[os.path.basename(source)] = [line for line in output.splitlines() if "error" in line][:5]
    return failures


# the functions of fastalign.h that each guarded file defines: its portable variant must define them too (a missing
# stub compiles, and fails only when the module is imported)
GUARDED = {"linear_logprobs_chunk.cpp": ("chunk_gemms_supported", "chunk_amx_supported", "set_chunk_amx",
                                         "set_chunk_avx512", "chunk_gemms_isa", "chunk_gemms_"),
           "nn_count.cpp": ("nn_count", "nn_count_kernels")}


@pytest.mark.slow
def test_portable_variant_compiles_and_defines_every_declared_function(host_compiler, tmp_path):
    # the two files whose x86 code is left out: what remains (the stubs, the baseline micro-tile) must compile
    guarded = [os.path.join(ROOT, "csrc", name) for name in GUARDED]
    assert compile_all(HOST_CXX, guarded, "-DFASTALIGN_PORTABLE_ONLY", std="c++20", objects=str(tmp_path)) == {}
    if shutil.which("nm") is None:
        pytest.skip("no nm to list the objects' symbols")
    for name, functions in GUARDED.items():
        defined = subprocess.run(["nm", "-C", "--defined-only", str(tmp_path / f"{name}.o")], capture_output=True,
                                 text=True, check=True).stdout
        # "0000 T nn_count_kernels[abi:cxx11]()": the name before its ABI tag and arguments
        names = {line.split(" ", 2)[2].split("(")[0].split("[")[0] for line in defined.splitlines() if " T " in line}
        assert set(functions) <= names, (name, set(functions) - names)


@pytest.mark.slow
def test_x86_variant_without_amx_compiles(host_compiler):
    """Where the compiler has no AMX intrinsics or the OS is not Linux, chunk_amx.h's stubs stand in for its
    functions: the kernel must still compile against them (a stub whose signature lagged behind once broke it)."""
    source = os.path.join(ROOT, "csrc", "linear_logprobs_chunk.cpp")
    assert compile_all(HOST_CXX, [source], "-DFASTALIGN_NO_AMX", std="c++20") == {}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(CROSS_CXX) is None, reason=f"no aarch64 cross compiler ({CROSS_CXX})")
def test_every_source_compiles_for_aarch64():
    assert compile_all(CROSS_CXX, SOURCES, "-fopenmp") == {}
