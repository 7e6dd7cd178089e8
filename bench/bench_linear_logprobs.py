"""Microbenchmark of the fused op: every backend vs naive PyTorch (materialized logits), torch.compile of
it, and the three plain GEMMs of the same shapes (the floor). Forward and forward+backward, median time
and peak extra memory, as ratios against naive measured in the same run.

  python bench/bench_linear_logprobs.py                  # CPU shapes, or the H100 shape on CUDA
  python bench/bench_linear_logprobs.py --shape 4096,2048,32000 --dtype float32 --repeats 5
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fastalign as fa  # noqa: E402
from bench.common import environment, markdown_table, measure, ratio_plot, write_results  # noqa: E402
from fastalign.profiling import median_time  # noqa: E402
from tests.reference import naive_linear_logprobs  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def three_gemms(hidden, weight):
    """The unfused floor: logits, d_hidden and d_weight as plain matmuls of the same shapes."""
    n, v = hidden.shape[0], weight.shape[0]
    logits = hidden @ weight.t()
    d_logits = logits  # same shape and dtype; the values do not matter for time
    _ = d_logits @ weight
    _ = d_logits.t() @ hidden
    del logits, d_logits
    return n, v


def make_step(fn, hidden, weight, targets, backward):
    def step():
        if backward:
            h = hidden.detach().requires_grad_()
            w = weight.detach().requires_grad_()
            out = fn(h, w, targets)
            out.sum().backward()
        else:
            with torch.no_grad():
                fn(hidden, weight, targets)
    return step


def variants(device, with_compile):
    out = [("naive", naive_linear_logprobs)]
    if with_compile:
        out.append(("naive+compile", torch.compile(naive_linear_logprobs, dynamic=False)))
    for b in fa.available_backends():
        if b == "cpp" and device.type != "cpu":
            continue
        if b == "triton" and device.type != "cuda":
            continue
        if b == "triton":  # every backward strategy, so one GPU run decides the default
            from fastalign.backends import triton_backend
            for strategy in triton_backend.STRATEGIES:
                out.append((f"fastalign[triton:{strategy}]", (lambda s: lambda h, w, t: _with_strategy(
                    triton_backend, s, lambda: fa.linear_logprobs(h, w, t, backend="triton")))(strategy)))
            continue
        out.append((f"fastalign[{b}]", (lambda b: lambda h, w, t: fa.linear_logprobs(h, w, t, backend=b))(b)))
    return out


def _with_strategy(module, strategy, fn):
    """Run fn with the triton backward strategy set; the autograd backward reads it when .backward() runs, so
    the strategy stays set until the next variant sets its own."""
    module.BACKWARD = strategy
    return fn()


def bench_shape(n, h, v, dtype, device, repeats, with_compile):
    torch.manual_seed(0)
    hidden = (torch.randn(n, h, device=device) * 0.5).to(dtype)
    weight = (torch.randn(v, h, device=device) * 0.02).to(dtype)
    targets = torch.randint(0, v, (n,), device=device)
    rows = []
    shape = f"N={n} H={h} V={v} {str(dtype).split('.')[-1]}"
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        flops = (8 if backward else 2) * n * h * v
        for name, fn in variants(device, with_compile):
            seconds, peak = measure(make_step(fn, hidden, weight, targets, backward), device, repeats, f"{name} {mode}")
            if seconds is None:
                rows.append(dict(shape=shape, mode=mode, variant=name, error=peak))
                continue
            rows.append(dict(shape=shape, mode=mode, variant=name, seconds=seconds, peak_extra_mib=peak / 2**20,
                             tflops=flops / seconds / 1e12))
            print(f"  {shape} {mode:8s} {name:22s} {seconds * 1e3:9.1f} ms  {peak / 2**20:8.0f} MiB", file=sys.stderr)
        if backward:
            gemm_step = lambda: three_gemms(hidden, weight)  # noqa: E731
            gemm_step()
            seconds = median_time(gemm_step, warmup=0, repeats=repeats, device=device)
            rows.append(dict(shape=shape, mode=mode, variant="3 GEMMs (floor)", seconds=seconds,
                             tflops=6 * n * h * v / seconds / 1e12))
    for r in rows:
        base = next((b for b in rows if b["mode"] == r["mode"] and b["variant"] == "naive" and "seconds" in b), None)
        if base and "seconds" in r:
            r["time_vs_naive"] = r["seconds"] / base["seconds"]
            if r.get("peak_extra_mib") is not None and base["peak_extra_mib"] > 0:
                r["memory_vs_naive"] = r["peak_extra_mib"] / base["peak_extra_mib"]
        floor = next((b for b in rows if b["variant"] == "3 GEMMs (floor)"), None)
        if floor and r["mode"] == "fwd+bwd" and "seconds" in r:
            r["time_vs_3gemm"] = r["seconds"] / floor["seconds"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", help="N,H,V (repeatable)")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    default = ["16384,4096,128256"] if device.type == "cuda" else ["1024,512,32000", "2048,1024,32000"]
    shapes = [tuple(int(x) for x in s.split(",")) for s in (args.shape or default)]
    env = environment()
    rows = []
    for n, h, v in shapes:
        rows += bench_shape(n, h, v, dtype, device, args.repeats, not args.no_compile)
    columns = [("shape", "shape", None), ("mode", "pass", None), ("variant", "variant", None),
               ("seconds", "time (ms)", None), ("time_vs_naive", "time vs naive", "{:.2f}x"),
               ("time_vs_3gemm", "time vs 3 GEMMs", "{:.2f}x"), ("tflops", "TFLOP/s", "{:.2f}"),
               ("peak_extra_mib", "peak extra (MiB)", "{:.0f}"), ("memory_vs_naive", "memory vs naive", "{:.3f}x")]
    for r in rows:
        if "seconds" in r:
            r["seconds_ms"] = r["seconds"] * 1e3
    columns[3] = ("seconds_ms", "time (ms)", "{:.1f}")
    table = markdown_table(rows, columns)
    print(f"\nfastalign {env['fastalign']}, torch {env['torch']}, triton {env['triton']}, on {env['device']}, "
          f"{env['date']}\n")
    print(table)
    path = write_results("linear_logprobs", env, rows, table)
    plot = ratio_plot("linear_logprobs", env, [r for r in rows if r["mode"] == "fwd+bwd" and "time_vs_naive" in r],
                      "shape", "variant", [("time_vs_naive", "fwd+bwd time vs naive"),
                                           ("memory_vs_naive", "peak extra memory vs naive")])
    print(f"\nresults: {path}" + (f"\nplot: {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
