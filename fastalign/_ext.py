"""The one place that imports the compiled extension.

``C`` is the extension module (None when unavailable), ``ERROR`` why it is unavailable, ``SOURCE`` how it
was obtained ("prebuilt": ``fastalign._C`` built at install time; "jit": compiled on first use) and
``PATH`` the shared library. They are resolved on first access (module ``__getattr__``), in this order:

1. ``fastalign._C``, built by setup.py when torch and a compiler were present at install time;
2. otherwise (``pip install .`` with build isolation has no torch, or the prebuilt one no longer matches the
   installed torch) the sources shipped with the package (``fastalign/csrc``, or ``csrc/`` in a checkout)
   are compiled with ``torch.utils.cpp_extension.load`` into a cache folder keyed by the sources, torch and
   Python versions, the compiler and the architecture, under a file lock so that concurrent processes build once
   and wait for each other.

Environment: ``FASTALIGN_NO_EXT=1`` disables the extension (torch backend on CPU); ``FASTALIGN_NO_JIT=1``
disables step 2; ``FASTALIGN_CACHE_DIR`` overrides the cache folder (default ``$XDG_CACHE_HOME/fastalign``
or ``~/.cache/fastalign``); ``FASTALIGN_CPU_ISA=avx2`` (or ``avx512``) caps the instruction sets the extension picks
at run time, read when it loads: a CPU with AVX-512 then runs the AVX2 code a CPU without it runs (``avx512``: no
AMX). ``bench/bench_linear_logprobs.py --cpu-isa avx2`` sets it, with MKL's and oneDNN's caps, to measure the AVX2 path
against an AVX2 floor on an AVX-512 machine.
"""
import glob
import hashlib
import os
import platform
import subprocess
import sys
import threading

# Keep in step with setup.py's extra_compile_args: the JIT build must compute what the prebuilt one does.
# LD_FLAGS: without -fopenmp ATen's header-only at::parallel_for compiles to a serial loop in an extension (GCC on
# Linux; the libgomp.so.1 it links is the one torch has already loaded).
LD_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
# No -std: torch's extension tools add the standard its headers are written for (C++20 with torch 2.13; older
# releases add C++17). The build here is C++20; tests/test_portable_build.py also compiles the sources as C++17 (for
# aarch64, where a cross compiler is installed) and scans them as C++17.
CXX_FLAGS = ["-O3"] + LD_FLAGS
JIT_MODULE_NAME = "fastalign_C"
_NAMES = ("C", "ERROR", "SOURCE", "PATH")
_LOCK = threading.Lock()


def sources_dir():
    """The folder holding the extension's C++ sources: package data, or csrc/ beside the package."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if glob.glob(os.path.join(cand, "*.cpp")):
            return cand
    return None


def cache_dir():
    root = os.environ.get("FASTALIGN_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "fastalign")
    return os.path.join(root, "extensions")


def _compiler_id():
    """The compiler torch's loader will run (``CXX``, else ``c++``) and the first line of its ``--version``: a cache
    shared between machines or toolchains (an NFS home, a changed ``CXX``) must not hand one's build to another."""
    try:
        from torch.utils.cpp_extension import get_cxx_compiler
        cxx = get_cxx_compiler()
    except Exception:  # older torch: the same rule
        cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        return f"{cxx} {out.splitlines()[0] if out else ''}"
    except (OSError, subprocess.SubprocessError):
        return cxx  # no such compiler: the build itself says so


def _build_key(files):
    """The cache folder's name: torch and Python versions, then a hash of the sources, the flags, the compiler and
    the machine's architecture."""
    import torch
    h = hashlib.sha256()
    for path in files:
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(" ".join(CXX_FLAGS).encode())
    h.update(f"\0{_compiler_id()}\0{platform.machine()}\0{sys.platform}".encode())
    return f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{h.hexdigest()[:16]}"


def _import_built(path):
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.ExtensionFileLoader(JIT_MODULE_NAME, path)
    spec = importlib.util.spec_from_file_location(JIT_MODULE_NAME, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _ninja_on_path():
    """torch's loader runs `ninja` from PATH; in a venv that is not activated, the pip `ninja` package's
    executable is not on it: add its folder."""
    import shutil
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and os.path.isdir(bin_dir):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def jit_build(verbose=False):
    """Compile the shipped sources once per (sources, torch, Python, compiler, architecture) into the cache;
    return (module, .so path)."""
    import torch  # noqa: F401  (libtorch must be loaded before the extension)
    src = sources_dir()
    if src is None:
        raise FileNotFoundError("the C++ sources (fastalign/csrc/*.cpp) are not installed with this package")
    sources = sorted(glob.glob(os.path.join(src, "*.cpp")))
    headers = sorted(glob.glob(os.path.join(src, "*.h")))
    build_dir = os.path.join(cache_dir(), _build_key(sources + headers))
    os.makedirs(build_dir, exist_ok=True)
    so_path = os.path.join(build_dir, JIT_MODULE_NAME + ".so")
    import fcntl
    with open(os.path.join(build_dir, "fastalign-build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if os.path.isfile(so_path):
            return _import_built(so_path), so_path
        print(f"fastalign: compiling the C++ extension for the cpp backend (first use, once; can take a few minutes; "
              f"cached in {build_dir})", file=sys.stderr, flush=True)
        stale = os.path.join(build_dir, "lock")  # torch's own baton, left behind if a build was killed:
        if os.path.exists(stale):               # under our lock nobody else can be building here
            os.remove(stale)
        _ninja_on_path()
        from torch.utils.cpp_extension import load
        module = load(name=JIT_MODULE_NAME, sources=sources, extra_cflags=CXX_FLAGS, extra_ldflags=LD_FLAGS,
                      build_directory=build_dir,
                      verbose=verbose)
        return module, getattr(module, "__file__", so_path)


CPU_ISA_CAPS = ("avx2", "avx512", "native")


def check_cpu_isa_cap():
    """FASTALIGN_CPU_ISA's value, checked before the extension reads it (which ignores what it does not know)."""
    cap = os.environ.get("FASTALIGN_CPU_ISA")
    if cap not in (None, "") and cap not in CPU_ISA_CAPS:
        raise ValueError(f"FASTALIGN_CPU_ISA={cap!r}: expected one of {', '.join(CPU_ISA_CAPS)} (or unset), the "
                         f"widest instruction set the C++ extension may use")
    return cap or "native"


def _resolve():
    check_cpu_isa_cap()
    if os.environ.get("FASTALIGN_NO_EXT", "0") == "1":
        return {"C": None, "ERROR": "disabled by FASTALIGN_NO_EXT=1", "SOURCE": None, "PATH": None}
    try:
        from fastalign import _C  # noqa: N814
        return {"C": _C, "ERROR": None, "SOURCE": "prebuilt", "PATH": _C.__file__}
    except Exception as exc:  # not built at install time, or built against another torch
        prebuilt = f"no prebuilt fastalign._C ({type(exc).__name__}: {exc})"
    if os.environ.get("FASTALIGN_NO_JIT", "0") == "1":
        return {"C": None, "ERROR": f"{prebuilt}; building on first use disabled by FASTALIGN_NO_JIT=1",
                "SOURCE": None, "PATH": None}
    try:
        module, path = jit_build()
        return {"C": module, "ERROR": None, "SOURCE": "jit", "PATH": path}
    except Exception as exc:  # no compiler, no ninja, no sources: the torch backend still works
        return {"C": None, "ERROR": f"{prebuilt}, and building it on first use failed "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc})",
                "SOURCE": None, "PATH": None}


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(f"module 'fastalign._ext' has no attribute {name!r}")
    with _LOCK:
        if name not in globals():
            globals().update(_resolve())
    return globals()[name]


def describe():
    """One line for `fastalign info`: which C++ extension is active and why."""
    c = __getattr__("C")
    if c is None:
        return f"unavailable: {__getattr__('ERROR')}"
    if __getattr__("SOURCE") == "prebuilt":
        return f"prebuilt at install ({__getattr__('PATH')})"
    return f"JIT-built on first use ({__getattr__('PATH')})"
