"""Build script. The C++ extension ``fastalign._C`` is optional: the package installs and runs without it.
Where it is not built here (no torch in an isolated build, no compiler), the C++ sources ship as package data
(fastalign/csrc) and fastalign/_ext.py compiles them on first use (cached), wherever a compiler is.

Environment flags (flash-attention's habits):
  FASTALIGN_NO_EXT=1   skip building the extension entirely
  MAX_JOBS=N           parallel compile jobs (read by torch's BuildExtension / ninja)
"""
import glob
import os
import re
import shutil
import sys
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "fastalign", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def extension_modules():
    """Return (ext_modules, cmdclass); both empty, with a warning, when the toolchain is missing."""
    if os.environ.get("FASTALIGN_NO_EXT", "0") == "1":
        print("fastalign: FASTALIGN_NO_EXT=1, skipping the C++ extension", file=sys.stderr)
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch absent at build time: the pure-Python package still works
        warnings.warn(f"fastalign: torch is not importable at build time ({exc}); "
                      "building without the C++ extension; "
                      "it will be compiled on first use instead (or install torch first and use "
                      "`pip install --no-build-isolation` to build it now).")
        return [], {}
    # GCC on Linux (torch's wheels ship libgomp.so.1); elsewhere at::parallel_for stays serial in the extension
    OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        warnings.warn(f"fastalign: no C++ compiler found ({cxx!r}); building without the C++ extension.")
        return [], {}
    # CUDA sources only where CUDA is: none yet; csrc/*.cu will be added with torch.version.cuda checks.
    ext = CppExtension(
        name="fastalign._C",
        sources=sorted(glob.glob(os.path.join("csrc", "*.cpp"))),  # every kernel file plus bindings.cpp
        # the same flags as fastalign/_ext.py CXX_FLAGS / LD_FLAGS. Without -fopenmp ATen's header-only
        # at::parallel_for compiles to a serial loop in an extension; linked, libgomp.so.1 is the one torch loaded.
        # no -std: torch adds the standard its headers need (C++20 for recent torch, C++17 for older)
        extra_compile_args={"cxx": ["-O3"] + OPENMP_FLAGS},
        extra_link_args=OPENMP_FLAGS,
    )

    class TolerantBuildExtension(BuildExtension):
        """A compile failure becomes a warning: the package must install without its extension."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                warnings.warn(f"fastalign: building the C++ extension failed ({exc}); "
                              "continuing without it (backend 'cpp' unavailable).")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                warnings.warn(f"fastalign: building {ext.name} failed ({exc}); continuing without it.")

    return [ext], {"build_ext": TolerantBuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extension_modules()

setup(
    version=read_version(),
    packages=find_packages(include=["fastalign", "fastalign.*"]) + ["fastalign.kernels", "fastalign.csrc"],
    # The Triton kernels live in kernels/ but install as fastalign.kernels: a top-level `kernels`
    # module would collide with an unrelated PyPI project.
    # csrc/ installs as fastalign/csrc (sources only) for the build-on-first-use fallback in fastalign/_ext.py.
    package_dir={"fastalign.kernels": "kernels", "fastalign.csrc": "csrc"},
    package_data={"fastalign.data": ["*.json", "*.jsonl"], "fastalign.csrc": ["*.cpp", "*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
