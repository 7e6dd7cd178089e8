"""The one place that imports the compiled extension ``fastalign._C``.

Everything else asks ``_ext.C`` (None when the extension was not built) and ``_ext.ERROR``.
"""
try:
    from fastalign import _C as C  # noqa: N812
    ERROR = None
except Exception as exc:  # not built (FASTALIGN_NO_EXT=1, no compiler) or built against another torch
    C = None
    ERROR = f"{type(exc).__name__}: {exc}"
