"""Smoke of every available backend: one tiny linear_logprobs forward+backward, compared with a float64
reference computed here from log_softmax (values and gradients of hidden, weight and bias).

usage: smoke.py --jsonl PATH
Appends one {"kind": "row", "benchmark": "smoke", "backend": ..., "ok": ...} line per (backend, dtype) as
each finishes; exit status 1 when any row is not ok (every backend still runs). The shape is ragged (N, V
not multiples of any tile) and a few targets are ignore_index, so masking and tails are exercised.
"""
import argparse
import json
import os
import sys
import time
import traceback

import torch

N, H, V = 37, 64, 1003
IGNORE = -100
TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2}  # max abs error; tf32/bf16 dots on the GPU


def case(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = IGNORE
    grad = torch.randn(N, generator=g, dtype=torch.float64)
    low = [x.to(dtype) for x in (hidden, weight, bias)]  # the reference sees the same rounded inputs
    return [x.double() for x in low], [x.to(device) for x in low], targets, grad


def reference(hidden, weight, bias, targets, grad):
    hidden, weight, bias = (x.clone().requires_grad_(True) for x in (hidden, weight, bias))
    logp = torch.log_softmax(hidden @ weight.T + bias, dim=-1)
    keep = targets != IGNORE
    out = torch.zeros(N, dtype=torch.float64)
    out[keep] = logp[keep].gather(1, targets[keep, None]).squeeze(1)
    out.backward(grad)
    return out.detach(), hidden.grad, weight.grad, bias.grad


def check(backend, dtype, device):
    import fastalign as fa
    ref_in, inputs, targets, grad = case(dtype, device)
    ref = reference(*ref_in, targets, grad)
    hidden, weight, bias = (x.clone().requires_grad_(True) for x in inputs)
    t0 = time.perf_counter()
    out = fa.linear_logprobs(hidden, weight, targets.to(device), bias, ignore_index=IGNORE, backend=backend)
    out.backward(grad.to(device=device, dtype=out.dtype))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    got = (out, hidden.grad, weight.grad, bias.grad)
    errs = {}
    for name, g, r in zip(("logp", "d_hidden", "d_weight", "d_bias"), got, ref):
        if g is None:
            errs[name] = None
            continue
        g = g.detach().double().cpu()
        errs[name] = float("nan") if not torch.isfinite(g).all() else float((g - r).abs().max())
    ok = all(e is not None and e == e and e <= TOL[dtype] * max(1.0, float(r.abs().max()))
             for e, r in zip(errs.values(), ref))
    return {"backend": backend, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "shape": [N, H, V], "seconds_first_call": round(seconds, 4), "max_abs_err": errs, "ok": ok}


def plan():
    """(backend, device, dtype) to check: triton on CUDA (or the CPU interpreter), cpp on CPU, torch on both."""
    import fastalign as fa
    cuda = torch.cuda.is_available()
    cpu, gpu = torch.device("cpu"), torch.device("cuda") if cuda else None
    out = []
    for backend in fa.available_backends():
        if backend == "triton":
            if cuda:
                out += [(backend, gpu, torch.float32), (backend, gpu, torch.bfloat16)]
            elif os.environ.get("TRITON_INTERPRET", "0") == "1":
                out.append((backend, cpu, torch.float32))
        elif backend == "cpp":
            out.append((backend, cpu, torch.float32))
        else:
            out.append((backend, gpu or cpu, torch.float32))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jsonl", required=True)
    args = p.parse_args(argv)
    failures = 0
    with open(args.jsonl, "a", buffering=1) as f:
        import fastalign as fa
        from fastalign.backends import _why_unavailable
        for backend in ("triton", "cpp", "torch"):
            if backend not in fa.available_backends():
                why = _why_unavailable(backend)
                f.write(json.dumps({"kind": "missing", "benchmark": "smoke", "backend": backend, "why": why}) + "\n")
                print(f"smoke {backend}: unavailable ({why})")
        for backend, device, dtype in plan():
            try:
                row = check(backend, dtype, device)
            except Exception as e:
                traceback.print_exc()
                row = {"backend": backend, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                       "ok": False, "error": f"{type(e).__name__}: {e}"}
            failures += not row["ok"]
            f.write(json.dumps({"kind": "row", "benchmark": "smoke", **row}) + "\n")
            print(f"smoke {backend} {row['device']} {row['dtype']}: {'ok' if row['ok'] else 'FAILED'} "
                  f"{row.get('max_abs_err', row.get('error'))}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
