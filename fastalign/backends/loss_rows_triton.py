"""On CUDA the gradient-in-forward loss path runs its row passes with PyTorch ops (its GEMMs are cuBLAS calls
either way); a fused Triton row kernel is not written yet. The contract is in loss_rows_cpp.py."""
from fastalign.backends.loss_rows_torch import rows_dlogits_, rows_logsumexp_  # noqa: F401
