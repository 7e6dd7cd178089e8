"""The chunk pass for thin fp32 chunks on CPU: each chunk's GEMM work in one pass over the vocabulary.

chunk_pass._chunk_pass makes three BLAS calls per chunk (the logits tile, then d_h and d_W from it). With thin
chunks (the memory a chunk may take is what sets its rows: a [V, C] tile) each call streams all of W or d_W from
memory for only C rows of work, and BLAS loses up to a third of its speed. Here one kernel per chunk
(csrc/linear_logprobs_chunk.cpp, op ``chunk_gemms_``) walks the vocabulary once: for each block of W it turns the
block's logits into E', adds the chunk's share to d_W, accumulates E'^T W for d_h, writes the next chunk's logits
over the block it has just used and folds them into the next chunk's running column max and sum of exp. So no
row pass reads the tile: lse comes from those statistics. The formula is chunk_pass._exp_tile_gradients', with
the target's term inside the GEMMs. The per-row arithmetic around each kernel call runs in C++ too, in the same call
(csrc/chunk_step.cpp, op ``chunk_step_``, whose header has the formula).

Used by _chunk_pass when the plan's backend is cpp, inputs and weight are fp32 (weight contiguous), there is no
softcap, H is a positive multiple of 16, no chunk has more than fused_chunk_max_rows() rows (above that BLAS is as
fast: 128 rows, 64 where the AVX2 tiles run) and the CPU has AVX-512F and AVX-512BW, or AVX2 and FMA
(loss_rows_cpp.chunk_gemms_supported(); the kernel's tiles exist for both, loss_rows_cpp.chunk_gemms_isa() says which
run).

On a CPU with AMX the kernel's d_W update runs on AMX tiles at fp32 accuracy (csrc/chunk_amx.h;
loss_rows_cpp.set_chunk_amx(False) turns it off).

Measured (bench/results/linear_logprobs-goal-step-shuffled-cpu-2026-12-07.json, 2-core Xeon with AMX, fp32,
forward+backward of the NLL, against the three unchunked GEMMs): 64 rows per chunk took 1.01x / 1.13x that floor at
N=1024 H=512 / N=2048 H=1024 (V=32000; 1.04x / 1.19x without AMX), where BLAS chunks took 1.39x / 1.69x.
"""
import torch

from fastalign.chunk_pass import padded_buffer

# Widest chunk the fused pass takes: at 128 rows it and BLAS chunks took about the same time (GEMM work alone, ad
# hoc, before the row statistics moved into the kernel); at 112 rows the fused pass took 0.93x / 0.86x BLAS
# chunks' time, at 64 rows 0.79x / 0.71x (the file above).
FUSED_CHUNK_MAX_ROWS = 128
# With the AVX2 tiles the fused pass's time per row does not fall as chunks widen, and BLAS's does: on the Xeon run as
# an AVX2 CPU (bench --cpu-isa avx2, 2026-12-08, fp32, forward+backward vs the AVX2 floor, 5 rounds; fused / BLAS
# chunks) N=1024 H=512: 64 rows 1.27x / 1.39x, 80 rows 1.33x / 1.29x, 96 rows 1.31x / 1.20x; N=2048 H=1024: 64 rows
# 1.44x / 1.44x, 96 rows 1.40x / 1.27x, 128 rows 1.45x / 1.21x. On an AMD Zen 3 (AVX2) 64 rows took 1.19x / 1.30x
# and 1.31x / 1.44x (README, "The CPU goal"). So the AVX2 tiles take chunks of up to 64 rows.
FUSED_CHUNK_MAX_ROWS_AVX2 = 64


def _max_rows(isa):
    # min: a lowered FUSED_CHUNK_MAX_ROWS (the bench's BLAS-chunks rows set it to 0) holds for the AVX2 tiles too
    return min(FUSED_CHUNK_MAX_ROWS, FUSED_CHUNK_MAX_ROWS_AVX2) if isa == "avx2" else FUSED_CHUNK_MAX_ROWS


def fused_chunk_max_rows():
    """The widest chunk the fused pass takes on this CPU now (0 where it does not run)."""
    from fastalign.backends.loss_rows_cpp import chunk_gemms_isa
    isa = chunk_gemms_isa()
    return _max_rows(isa) if isa else 0


def fused_chunks_usable(hidden, weight, plan):
    """Whether fused_chunk_pass runs this plan (see the module docstring)."""
    if not (plan.backend == "cpp" and plan.softcap is None and hidden.device.type == "cpu"
            and hidden.dtype == torch.float32 and weight.dtype == torch.float32 and weight.is_contiguous()
            and weight.shape[1] > 0 and weight.shape[1] % 16 == 0 and plan.bounds):
        return False
    from fastalign.backends.loss_rows_cpp import chunk_gemms_isa
    isa = chunk_gemms_isa()  # "" where the kernel does not run (chunk_gemms_supported() is false)
    return bool(isa) and max(e - s for s, e in plan.bounds) <= _max_rows(isa)


def fused_chunk_pass(hidden, weight, bias, targets, plan, need_h, need_w, need_b):
    """Same contract as chunk_pass._chunk_pass (fp32): logp [N] and the gradients d_h [N, H], d_w [V, H],
    d_b [V] (None where not needed) of the plan's loss.

    Each kernel call also takes the column max and sum of exp of the logits it writes, so no pass of its own reads
    the tile for the row statistics: lse = max + log(sum), and the next call turns the logits into E' block by
    block, in cache, just before it uses them. The per-row arithmetic around the GEMMs (the coefficients' scaling,
    E''s target values, d_h's rows, the next rows' log-probs) runs in the same call (loss_rows_cpp.chunk_step_):
    Python does the loss's coefficients and one call per chunk."""
    from fastalign.backends.loss_rows_cpp import chunk_step_
    n, v = hidden.shape[0], weight.shape[0]
    hidden = hidden.contiguous()  # [N, H]: small; weight is contiguous (fused_chunks_usable), never copied
    targets = targets.contiguous()
    inv_t = 1.0 / plan.temperature
    bounds = plan.bounds
    logp = torch.zeros(n, dtype=torch.float32)
    d_h = torch.empty_like(hidden) if need_h else None
    d_w = torch.empty_like(weight) if need_w else None  # the first chunk writes it, the others add
    d_b = torch.empty(v, dtype=torch.float32) if need_b else None
    grads = need_h or need_w or need_b
    tile_buf = padded_buffer(v, max(e - s for s, e in bounds), torch.float32, hidden.device)
    stats = torch.empty(2, tile_buf.shape[1], dtype=torch.float32)  # the tile's rows' column max and sum of exp
    bias_v = None if bias is None else (bias.to(torch.float32) * inv_t).contiguous()  # the GEMM's alpha scales it
    common = (tile_buf, weight, bias_v, inv_t, hidden, targets, logp, stats)
    chunk_step_(*common, 0, 0, *bounds[0])  # the first chunk's logits, nothing else
    for i, (s, e) in enumerate(bounds):
        nxt = bounds[i + 1] if i + 1 < len(bounds) else (e, e)
        coeff = plan.coeff_fn(s, e, logp[s:e]).to(torch.float32).contiguous() if grads else None
        chunk_step_(*common, s, e, *nxt, coeff, d_w, d_h, d_b, i == 0)
    return logp, d_h, d_w, d_b
