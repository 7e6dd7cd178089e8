"""Microbenchmark of the fused op: every backend vs naive PyTorch (materialized logits), torch.compile of
it, and the plain GEMMs of the same shapes (the floor: 1 GEMM for forward, 3 for forward+backward).
Forward and forward+backward, median time and peak extra memory, as ratios against naive and against the
floor measured in the same run (repeats interleaved across variants, so load on a shared machine hits all
of them alike), GFLOP/s for every row. On CPU a CHECK row fails (exit status 1) when the cpp backend, which
backend="auto" picks there, is slower than naive PyTorch.

  python bench/bench_linear_logprobs.py                  # CPU shapes (fp32 and bf16), or the H100 shape on CUDA
  python bench/bench_linear_logprobs.py --shape 4096,2048,32000 --dtype float32 --repeats 5
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fastalign as fa  # noqa: E402
from bench.common import (JsonlStream, add_common_args, dryrun, environment, markdown_table, ratio_plot,  # noqa: E402
                          write_results)
from fastalign.profiling import PeakMemory, _sync  # noqa: E402
from tests.reference import naive_linear_logprobs  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def floor_gemms(hidden, weight, backward):
    """The unfused floor: logits (forward), then d_hidden and d_weight, as plain matmuls of the same shapes."""
    logits = hidden @ weight.t()
    if backward:
        d_logits = logits  # same shape and dtype; the values do not matter for time
        _ = d_logits @ weight
        _ = d_logits.t() @ hidden


def interleaved_medians(steps, device, repeats):
    """{name: median seconds}: each round runs every step once, so load changes hit every variant alike."""
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


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


def bench_shape(n, h, v, dtype, device, repeats, with_compile, only=None, stream=None):
    stream = stream or JsonlStream(None, "", {})
    torch.manual_seed(0)
    hidden = (torch.randn(n, h, device=device) * 0.5).to(dtype)
    weight = (torch.randn(v, h, device=device) * 0.02).to(dtype)
    targets = torch.randint(0, v, (n,), device=device)
    rows = []
    shape = f"N={n} H={h} V={v} {str(dtype).split('.')[-1]}"
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        flops = (8 if backward else 2) * n * h * v  # with the logits recompute in backward
        floor_name = "3 GEMMs (floor)" if backward else "1 GEMM (floor)"
        steps, peaks = {}, {}
        for name, fn in variants(device, with_compile):
            step = make_step(fn, hidden, weight, targets, backward)
            if only and not any(o in name for o in only):
                continue
            try:  # warm-up (compilation happens here), then one run for peak memory
                step()
                with PeakMemory(device) as mem:
                    step()
                peak = mem.peak_bytes
            except Exception as exc:  # e.g. torch.compile unavailable, out of memory: the others still run
                print(f"  {name} {mode}: failed ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
                rows.append(stream.row(dict(shape=shape, mode=mode, variant=name,
                                            error=f"{type(exc).__name__}: {exc}"[:300])))
                continue
            steps[name], peaks[name] = step, peak
        steps[floor_name] = lambda: floor_gemms(hidden, weight, backward)
        steps[floor_name]()
        medians = interleaved_medians(steps, device, repeats)
        floor = medians[floor_name]
        base = medians.get("naive")
        for name, seconds in medians.items():
            is_floor = name == floor_name
            row = dict(shape=shape, mode=mode, variant=name, seconds=seconds,
                       gflops=((6 if backward else 2) * n * h * v if is_floor else flops) / seconds / 1e9,
                       time_vs_floor=seconds / floor)
            if not is_floor:
                row["peak_extra_mib"] = peaks[name] / 2**20
            if base:
                row["time_vs_naive"] = seconds / base
                if not is_floor and peaks.get("naive"):
                    row["memory_vs_naive"] = peaks[name] / peaks["naive"]
            rows.append(stream.row(row))
            print(f"  {shape} {mode:8s} {name:26s} {seconds * 1e3:9.1f} ms  {seconds / floor:5.2f}x floor  "
                  f"{peaks.get(name, 0) / 2**20:8.0f} MiB", file=sys.stderr)
    return rows


def cpu_checks(rows):
    """CHECK rows: on CPU, backend="auto" picks cpp, so cpp must not be slower than naive in the same run."""
    checks = []
    for r in rows:
        if r["variant"] == "fastalign[cpp]" and "time_vs_naive" in r:
            ok = r["time_vs_naive"] <= 1.0
            checks.append(dict(shape=r["shape"], mode=r["mode"], variant="CHECK cpp <= naive",
                               status="PASS" if ok else "FAIL", time_vs_naive=r["time_vs_naive"]))
    return checks


def peaked_case(n, h, v, logit_std, seed=0):
    """hidden, weight, targets whose logits have standard deviation ~logit_std and a Zipf-like bias (a few
    frequent tokens), targets drawn from the model's own softmax: a peaked, trained-looking distribution."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (logit_std / h ** 0.5)
    bias = -torch.log1p(torch.arange(v, dtype=torch.float32))  # Zipf: p ~ 1 / rank before the hidden term
    probs = torch.softmax(hidden[:256] @ weight.t() + bias, -1)
    targets = torch.multinomial(probs, 1, generator=gen).squeeze(1).repeat(-(-n // 256))[:n]
    return hidden, weight, bias, targets


def grad_filter_study(repeats, epsilons=(None, 1e-8, 1e-6, 2 ** -12), logit_std=6.0):
    """grad_filter_eps on the cpp backend: fwd+bwd time vs unfiltered (same run, interleaved) at
    N=1024 H=512 V=32000, and the max gradient errors vs the float64 reference at N=256 H=256 V=32000."""
    from tests.reference import reference_linear_logprobs
    rows = []
    hidden, weight, bias, targets = peaked_case(256, 256, 32000, logit_std)
    grad = torch.randn(256, generator=torch.Generator().manual_seed(1))

    def grads(fn, dtype, **kw):
        h = hidden.to(dtype).detach().clone().requires_grad_()  # fresh leaves: no grad accumulates across runs
        w = weight.to(dtype).detach().clone().requires_grad_()
        b = bias.to(dtype).detach().clone().requires_grad_()
        (fn(h, w, targets, b, **kw).double() * grad.double()).sum().backward()
        return h.grad.double(), w.grad.double(), b.grad.double()

    ref = grads(reference_linear_logprobs, torch.float64)
    p_top = torch.softmax(hidden.double() @ weight.double().t() + bias.double(), -1).max(-1).values
    errors = {}
    for eps in epsilons:
        got = grads(lambda *a, **k: fa.linear_logprobs(*a, **k, backend="cpp", grad_filter_eps=eps), torch.float32)
        errors[eps] = [(g - r).abs().max().item() / r.abs().max().item() for g, r in zip(got, ref)]
    hidden, weight, bias, targets = peaked_case(1024, 512, 32000, logit_std)

    def step(eps):
        def run():
            h = hidden.detach().requires_grad_()
            w = weight.detach().requires_grad_()
            fa.linear_logprobs(h, w, targets, bias, backend="cpp", grad_filter_eps=eps).sum().backward()
        return run
    steps = {eps: step(eps) for eps in epsilons}
    for s in steps.values():
        s()
    medians = interleaved_medians(steps, torch.device("cpu"), repeats)
    for eps in epsilons:
        rows.append(dict(shape="N=1024 H=512 V=32000 float32", mode="fwd+bwd",
                         variant=f"fastalign[cpp] grad_filter_eps={eps}", seconds=medians[eps],
                         time_vs_unfiltered=medians[eps] / medians[None], logit_std=logit_std,
                         median_top_prob=p_top.median().item(),
                         rel_err_d_hidden=errors[eps][0], rel_err_d_weight=errors[eps][1],
                         rel_err_d_bias=errors[eps][2]))
        print(f"  eps={eps}: {medians[eps] * 1e3:.0f} ms ({medians[eps] / medians[None]:.2f}x), rel. errors "
              f"d_h {errors[eps][0]:.1e} d_w {errors[eps][1]:.1e} d_b {errors[eps][2]:.1e}", file=sys.stderr)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", help="N,H,V (repeatable)")
    p.add_argument("--dtype", choices=DTYPES, action="append", help="repeatable; default fp32 and bf16 on CPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for every variant (default: torch's)")
    p.add_argument("--tag", default="", help="suffix of the result file names (several runs on one day)")
    p.add_argument("--grad-filter", action="store_true",
                   help="instead: grad_filter_eps on cpp, speed-up and gradient error on a peaked distribution")
    p.add_argument("--only", help="comma-separated substrings: run only the variants whose name holds one "
                                   "(naive always runs: it is the baseline)")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [DTYPES[d] for d in (args.dtype or (["bfloat16"] if device.type == "cuda" else ["float32", "bfloat16"]))]
    default = ["16384,4096,128256"] if device.type == "cuda" else ["1024,512,32000", "2048,1024,32000"]
    shapes = [tuple(int(x) for x in s.split(",")) for s in (args.shape or default)]
    if dryrun():  # the plumbing in seconds: tiny shapes, one repeat, no compilation
        shapes, dtypes, args.repeats, args.no_compile = [(64, 32, 256)], [torch.float32], 1, True
    env = environment()
    stream = JsonlStream(args.jsonl, "linear_logprobs", env)
    if args.grad_filter:
        rows = [stream.row(r) for r in grad_filter_study(args.repeats)]
        columns = [("variant", "variant", None), ("seconds_ms", "time (ms)", "{:.0f}"),
                   ("time_vs_unfiltered", "time vs unfiltered", "{:.2f}x"),
                   ("rel_err_d_hidden", "d_hidden rel. err", "{:.1e}"), ("rel_err_d_weight", "d_weight rel. err", "{:.1e}"),
                   ("rel_err_d_bias", "d_bias rel. err", "{:.1e}")]
        for r in rows:
            r["seconds_ms"] = r["seconds"] * 1e3
        table = markdown_table(rows, columns)
        print(table)
        print(write_results("linear_logprobs-grad-filter" + (f"-{args.tag}" if args.tag else ""), env, rows, table,
                            args.out))
        return 0
    rows = []
    for n, h, v in shapes:
        for dtype in dtypes:
            only = None if not args.only else ["naive"] + args.only.split(",")
            rows += bench_shape(n, h, v, dtype, device, args.repeats, not args.no_compile, only, stream)
    checks = [stream.row(c) for c in (cpu_checks(rows) if device.type == "cpu" else [])]
    rows += checks
    env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    columns = [("shape", "shape", None), ("mode", "pass", None), ("variant", "variant", None),
               ("seconds", "time (ms)", None), ("time_vs_naive", "time vs naive", "{:.2f}x"),
               ("time_vs_floor", "time vs floor", "{:.2f}x"), ("gflops", "GFLOP/s", "{:.0f}"),
               ("peak_extra_mib", "peak extra (MiB)", "{:.0f}"), ("memory_vs_naive", "memory vs naive", "{:.3f}x"),
               ("status", "check", None)]
    for r in rows:
        if "seconds" in r:
            r["seconds_ms"] = r["seconds"] * 1e3
    columns[3] = ("seconds_ms", "time (ms)", "{:.1f}")
    table = markdown_table(rows, columns)
    print(f"\nfastalign {env['fastalign']} ({env['git_commit']}), torch {env['torch']}, on {env['device']}, "
          f"{env.get('cpu_model')} [{env.get('cpu_flags')}], load {env.get('load_average')}, {env['date']}\n")
    print(table)
    name = "linear_logprobs" + (f"-{args.tag}" if args.tag else "")
    path = write_results(name, env, rows, table, args.out)
    plot = ratio_plot(name, env, [r for r in rows if r["mode"] == "fwd+bwd" and "seconds" in r],
                      "shape", "variant", [("time_vs_naive", "fwd+bwd time vs naive"),
                                           ("memory_vs_naive", "peak extra memory vs naive")], args.out)
    print(f"\nresults: {path}" + (f"\nplot: {plot}" if plot else ""))
    failed = [c for c in checks if c["status"] == "FAIL"] if not dryrun() else []  # tiny shapes time nothing
    for c in failed:
        print(f"FAIL: cpp is slower than naive at {c['shape']} {c['mode']} ({c['time_vs_naive']:.2f}x)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
