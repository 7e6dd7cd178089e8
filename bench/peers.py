"""The peers fastalign is measured against, as bench variants: Liger-Kernel and Cut Cross-Entropy (optional,
`pip install fastalign[bench]`). Each factory returns a callable, or a string saying why the peer cannot run
here (not installed, needs CUDA); the bench turns that string into a row, never a failure.

What each computes, so that the rows compare like with like:
- Liger ``LigerFusedLinearCrossEntropyLoss(reduction="sum")``: the per-token NLL summed, = -sum_i logp_i.
  Its forward also computes the gradients (they are stored for backward), so its "fwd" row under no_grad is
  the loss alone. Triton kernels: CUDA only (on CPU triton has no driver).
- Cut Cross-Entropy ``linear_cross_entropy(reduction="sum")``: the same -sum logp. impl="cce" is its Triton
  kernel (CUDA only); impl="torch_compile" is its fallback (torch.compile of logits + cross-entropy), the only
  path it has on CPU. Its default ``filter_eps="high"`` (gradient filtering) is kept: what its users get.
- Liger ``LigerFusedLinearDPOLoss``: DPO (sigmoid) from hidden states, chunked in PyTorch and torch.compile'd,
  so it runs on CPU too.
"""
import importlib.util

MISSING = "not installed (pip install 'fastalign[bench]')"


def installed(module):
    return importlib.util.find_spec(module) is not None


def liger_linear_cross_entropy(device, softcap=None):
    """(hidden [N, H], weight [V, H], targets [N]) -> scalar -sum logp, or why not."""
    if not installed("liger_kernel"):
        return f"liger-kernel {MISSING}"
    if device.type != "cuda":
        return "needs CUDA: Liger's fused linear cross-entropy is a Triton kernel (triton has no CPU driver)"
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=softcap)
    return lambda h, w, t: loss(w, h, t)


def cce_linear_cross_entropy(device, impl, softcap=None):
    """(hidden, weight, targets) -> scalar -sum logp with CCE's impl ("cce" or "torch_compile"), or why not."""
    if not installed("cut_cross_entropy"):
        return f"cut-cross-entropy {MISSING}"
    if impl == "cce" and device.type != "cuda":
        return "needs CUDA: CCE's kernel is Triton (triton has no CPU driver); see the CCE[torch_compile] row"
    from cut_cross_entropy import linear_cross_entropy
    return lambda h, w, t: linear_cross_entropy(h, w, t, softcap=softcap, reduction="sum", impl=impl)


def liger_dpo(beta, compiled=True):
    """(hidden [2B, T, H], weight, labels [2B, T], ref_hidden, ref_weight) -> DPO loss (chosen rows first),
    or why not. compiled: Liger's torch.compile of its chunk step (its default)."""
    if not installed("liger_kernel"):
        return f"liger-kernel {MISSING}"
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    loss = LigerFusedLinearDPOLoss(beta=beta, compute_nll_loss=False, use_ref_model=True, compiled=compiled)
    return lambda h, w, lab, rh, rw: loss(w, h, lab, ref_input=rh, ref_weight=rw)[0]
