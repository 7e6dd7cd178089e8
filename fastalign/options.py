from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LogprobOptions:
    """Non-tensor options of the fused op, passed to autograd and backends as one frozen value.

    softcap=None means no capping (Gemma-2's final_logit_softcapping when set). deterministic=True asks for
    bitwise run-to-run reproducible gradients (the triton backend then avoids atomics; cpp and torch always are).
    """

    backend: str
    temperature: float = 1.0
    softcap: Optional[float] = None
    deterministic: bool = False
    # Opt-in approximate backward (Cut Cross-Entropy's gradient filter): skip backward tiles whose softmax
    # probabilities are all below this value and that hold no target. None: exact. cpp and triton; torch is exact.
    grad_filter_eps: Optional[float] = None
