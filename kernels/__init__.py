"""Triton kernels of fastalign, installed as ``fastalign.kernels`` (never a top-level ``kernels`` module).

One kernel per file, each with its launcher. Shapes and dtypes are validated by ``fastalign.ops``.
"""
import sys as _sys

if __name__ == "kernels":
    # Imported as a top-level `kernels`: the root of a checkout is on sys.path (`python -m ...` or pytest run from
    # it), and that name belongs to Hugging Face's `kernels` package, a dependency of transformers since 5.25 that
    # it imports with its activations. This folder would shadow it. Hand the import over to the real
    # package, so that a checkout behaves like an installed fastalign.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is not None:  # else this stays an empty module without a version: transformers then sees none
        _real = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _real  # the import system returns what sys.modules holds once this file has run
        _spec.loader.exec_module(_real)
