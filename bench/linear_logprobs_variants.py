"""The variants bench/bench_linear_logprobs.py measures, one factory per family: naive PyTorch (materialized
logits) and naive under torch.compile, every fastalign backend (triton once per backward strategy, and what
backend="auto" runs on CPU), the gradient-in-forward loss path (with each --chunk-rows, and with its fused
thin-chunk pass or AMX turned off, for scale), Liger-Kernel and Cut Cross-Entropy. A factory maps a Ctx to rows
[(name, fn or why-not string, sign)]; the bench runs them interleaved, shape by shape."""
import torch

import fastalign as fa
from bench import peers
from fastalign import chunk_pass_fused
from tests.reference import naive_linear_logprobs


class Ctx:
    """What a variant factory may look at: device, dtype, softcap, and whether torch.compile rows run."""

    def __init__(self, device, dtype, softcap, with_compile, chunk_rows=()):
        self.device, self.dtype, self.softcap, self.with_compile = device, dtype, softcap, with_compile
        self.chunk_rows = tuple(chunk_rows or ())


# ---- the variants: each entry maps a Ctx to [(name, fn or why-not string, sign)] --------------------------------
# fn(hidden [N, H], weight [V, H], targets [N]) returns per-token log-probs (sign +1) or the NLL sum (sign -1);
# the step differentiates out.sum(). A string instead of fn becomes a row saying why the variant did not run.
# Adding a row is adding one entry to VARIANTS.

def _naive(ctx):
    return [("naive", lambda h, w, t: naive_linear_logprobs(h, w, t, softcap=ctx.softcap), 1)]


def _naive_compile(ctx):
    if not ctx.with_compile:
        return [("naive+compile", "skipped (--no-compile, or a dry run)", 1)]
    compiled = torch.compile(naive_linear_logprobs, dynamic=False)
    return [("naive+compile", lambda h, w, t: compiled(h, w, t, softcap=ctx.softcap), 1)]


def _fastalign(ctx):
    out = []
    for b in fa.available_backends():
        if (b == "cpp" and ctx.device.type != "cpu") or (b == "triton" and ctx.device.type != "cuda"):
            continue
        if b == "triton":  # every backward strategy, so one GPU run decides the default
            from fastalign.backends import triton_backend
            for strategy in triton_backend.STRATEGIES:
                out.append((f"fastalign[triton:{strategy}]", (lambda s: lambda h, w, t: _with_strategy(
                    triton_backend, s, lambda: fa.linear_logprobs(h, w, t, softcap=ctx.softcap,
                                                                  backend="triton")))(strategy), 1))
            continue
        out.append((f"fastalign[{b}]", (lambda b: lambda h, w, t: fa.linear_logprobs(
            h, w, t, softcap=ctx.softcap, backend=b))(b), 1))
    if ctx.device.type == "cpu":  # what backend="auto" does there: with gradients, the kept tile (kept_tiles.py)
        out.append(("fastalign[auto]", lambda h, w, t: fa.linear_logprobs(h, w, t, softcap=ctx.softcap), 1))
    return out


def _fastalign_loss(ctx):
    """The gradient-in-forward loss path (fastalign.fused_grad; what the trainers use on CPU): 3 GEMMs for
    forward+backward. Its backward needs the loss's own gradient, so it returns the NLL sum, like Liger and CCE."""
    out = []
    for b in fa.available_backends():
        if b == "triton" or (b == "cpp" and ctx.device.type != "cpu"):
            continue  # on CUDA the row passes are torch ops whatever the backend: one row
        out.append((f"fastalign NLL[{b}] grad-in-fwd", (lambda b: lambda h, w, t: fa.fused_linear_nll_loss(
            h, w, t, softcap=ctx.softcap, backend=b, reduction="sum"))(b), -1))
        if b == "cpp":  # --chunk-rows: the time / memory trade of the chunk size, one row each
            for r in ctx.chunk_rows:
                fn = (lambda r: lambda h, w, t: fa.fused_linear_nll_loss(h, w, t, softcap=ctx.softcap, backend="cpp",
                                                                         reduction="sum", chunk_rows=r))(r)
                out.append((f"fastalign NLL[cpp] grad-in-fwd chunk_rows={r}", fn, -1))
                if _fused_pass_runs(ctx) and r <= chunk_pass_fused.fused_chunk_max_rows():  # and BLAS's, for scale
                    out.append((f"fastalign NLL[cpp] grad-in-fwd chunk_rows={r} BLAS chunks", _blas_chunks(fn), -1))
                    if _amx_runs():  # and with AVX-512 alone, for what AMX's d_weight update brings
                        out.append((f"fastalign NLL[cpp] grad-in-fwd chunk_rows={r} no AMX", _without_amx(fn), -1))
    return out


def _amx_runs():
    from fastalign.backends.loss_rows_cpp import chunk_amx_supported
    return chunk_amx_supported()


def _without_amx(fn):
    """fn with the fused pass's AMX path turned off (loss_rows_cpp.set_chunk_amx): AVX-512 for all three products."""
    from fastalign.backends.loss_rows_cpp import set_chunk_amx

    def run(h, w, t):
        saved = set_chunk_amx(False)
        try:
            return fn(h, w, t)
        finally:
            set_chunk_amx(saved)
    return run


def _fused_pass_runs(ctx):
    """Whether thin fp32 chunks take the fused pass here (fastalign/chunk_pass_fused.py; H is checked per shape
    by the pass itself, and every goal shape has H a multiple of 16)."""
    from fastalign.backends.loss_rows_cpp import chunk_gemms_supported
    return ctx.device.type == "cpu" and ctx.dtype == torch.float32 and ctx.softcap is None and chunk_gemms_supported()


def _blas_chunks(fn):
    """fn with the fused thin-chunk pass (fastalign/chunk_pass_fused.py) turned off: three BLAS calls per chunk."""
    def run(h, w, t):
        saved = chunk_pass_fused.FUSED_CHUNK_MAX_ROWS
        chunk_pass_fused.FUSED_CHUNK_MAX_ROWS = 0
        try:
            return fn(h, w, t)
        finally:
            chunk_pass_fused.FUSED_CHUNK_MAX_ROWS = saved
    return run


def _liger(ctx):
    return [("Liger FusedLinearCE", peers.liger_linear_cross_entropy(ctx.device, ctx.softcap), -1)]


def _cce(ctx):
    rows = [("CCE[cce]", peers.cce_linear_cross_entropy(ctx.device, "cce", ctx.softcap), -1)]
    if ctx.device.type == "cpu":  # CCE's own CPU path; on CUDA its kernel is the row that matters
        fn = peers.cce_linear_cross_entropy(ctx.device, "torch_compile", ctx.softcap)
        if not ctx.with_compile and not isinstance(fn, str):
            fn = "skipped (--no-compile, or a dry run): CCE's CPU path is torch.compile"
        rows.append(("CCE[torch_compile]", fn, -1))
    return rows


VARIANTS = [_naive, _naive_compile, _fastalign, _fastalign_loss, _liger, _cce]


def variants(ctx):
    return [v for factory in VARIANTS for v in factory(ctx)]


def _with_strategy(module, strategy, fn):
    """Run fn with the triton backward strategy set; the autograd backward reads it when .backward() runs, so
    the strategy stays set until the next variant sets its own."""
    module.BACKWARD = strategy
    return fn()
