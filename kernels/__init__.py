"""Triton kernels of fastalign, installed as ``fastalign.kernels`` (never a top-level ``kernels`` module).

One kernel per file, each with its launcher. Shapes and dtypes are validated by ``fastalign.ops``.
"""
