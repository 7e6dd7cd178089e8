"""fastalign's user-facing errors: one base class the CLI turns into `fastalign: error: ...` and exit code 2.

Errors caused by what the user gave (options, data, model, paths) derive from ``FastalignError``; anything
else is a bug and keeps its traceback. ``FastalignError`` subclasses ValueError, so code that catches
ValueError for bad input keeps working.
"""


class FastalignError(ValueError):
    """Bad input from the user: the message says what was found and what was expected."""


class UnsupportedModelError(FastalignError, TypeError):
    """A model whose logits the fused path cannot reproduce (an adaptive softmax, no lm_head, an unknown head
    transform); a TypeError too, as the lookups that raise it did before."""


class ModelCheckError(UnsupportedModelError):
    """The probe found the fused path's log-probs differ from the model's own forward."""


__all__ = ["FastalignError", "UnsupportedModelError", "ModelCheckError"]


def caller_stacklevel():
    """The ``stacklevel`` for warnings.warn, called right here, that points at the first frame outside fastalign:
    the user's line (their DPOTrainer(...) call, say), however deep inside fastalign the warning is raised."""
    import os
    import sys
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1  # the function that called this one, which calls warnings.warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    if frame is None or frame.f_code.co_filename.startswith("<"):  # fastalign's own script (python -m ...): its
        return max(1, level - 1)                                    # outermost line, not <frozen runpy>
    return level
