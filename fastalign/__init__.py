"""fastalign: fused linear -> token log-prob kernels and the preference losses built on them."""
from fastalign._version import __version__
from fastalign.backends import available_backends
from fastalign.ops import linear_logprobs, sequence_logprobs

__all__ = ["__version__", "available_backends", "linear_logprobs", "sequence_logprobs"]
