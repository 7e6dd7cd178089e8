"""Microbenchmark of the fused op, side by side with its peers in one run: naive PyTorch (materialized
logits), naive under torch.compile, every fastalign backend, Liger-Kernel's LigerFusedLinearCrossEntropyLoss,
Cut Cross-Entropy's linear_cross_entropy (peers optional: `pip install 'fastalign[bench]'`; a missing peer is a
row saying so), and the plain GEMMs of the same shapes (the floor, on CUDA the cuBLAS roofline: 1 GEMM for
forward, 3 for forward+backward).

Forward and forward+backward, median time and peak extra memory, as ratios against naive and against the floor
measured in the same run (repeats interleaved across variants, so load on a shared machine hits all of them
alike), GFLOP/s and the fraction of the GEMM roofline for every row. The fastalign and naive rows compute
per-token log-probs (backward of their sum); the Liger and CCE rows compute the per-token NLL sum = -sum logp
(its backward has the same cost): the "value err" column checks each row against naive's sum.
On CPU a CHECK row fails (exit status 1) when what backend="auto" runs there (see CHECKED) is slower than naive
PyTorch.

  python bench/bench_linear_logprobs.py                  # CPU goal shapes (fp32, bf16), or the named heads on CUDA
  python bench/bench_linear_logprobs.py --heads          # the named heads (scaled down on CPU, see HEADS)
  python bench/bench_linear_logprobs.py --heads llama3-8b --n 4096 --repeats 10
  python bench/bench_linear_logprobs.py --shape 4096,2048,32000 --dtype float32 --repeats 5 --jsonl rows.jsonl
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fastalign as fa  # noqa: E402
from bench.common import (JsonlStream, add_common_args, add_cpu_isa_arg, dryrun, environment,  # noqa: E402
                          interleaved_medians, interleaved_times, markdown_table, medians_of, paired_ratio, publish,
                          rerun_with_cpu_isa, write_results)
from bench.linear_logprobs_variants import Ctx, variants  # noqa: E402
from fastalign.profiling import PeakMemory  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Output heads of real models: (H, V, final-logit softcap). On CUDA N in {4096, 16384}; on CPU the shape is
# scaled so that a run takes seconds: V and the softcap stay, H becomes CPU_HEAD_H and N CPU_HEAD_N.
HEADS = {"llama3-8b": (4096, 128256, None), "qwen2.5-0.5b": (896, 151936, None), "gemma2-2b": (2304, 256000, 30.0)}
GPU_HEAD_NS = (4096, 16384)
CPU_HEAD_H, CPU_HEAD_N = 256, 256
CPU_GOAL_SHAPES = ("1024,512,32000", "2048,1024,32000")  # the cpp goal (issue 10 part 4), fp32 and bf16


def floor_gemms(hidden, weight, backward):
    """The unfused floor: logits (forward), then d_hidden and d_weight, as plain matmuls of the same shapes."""
    logits = hidden @ weight.t()
    if backward:
        d_logits = logits  # same shape and dtype; the values do not matter for time
        _ = d_logits @ weight
        _ = d_logits.t() @ hidden


def make_step(fn, hidden, weight, targets, backward):
    """One call of the variant; returns its output (for the value check)."""
    def step():
        if backward:
            h = hidden.detach().requires_grad_()
            w = weight.detach().requires_grad_()
            out = fn(h, w, targets)
            out.sum().backward()
            return out.detach()
        with torch.no_grad():
            return fn(hidden, weight, targets)
    return step


def bench_shape(n, h, v, dtype, device, repeats, with_compile, only=None, stream=None, softcap=None, head=None,
                chunk_rows=()):
    """Rows of one shape, fwd and fwd+bwd, every variant (measured interleaved), streamed as measured."""
    stream = stream or JsonlStream(None, "", {})
    torch.manual_seed(0)
    hidden = (torch.randn(n, h, device=device) * 0.5).to(dtype)
    weight = (torch.randn(v, h, device=device) * 0.02).to(dtype)
    targets = torch.randint(0, v, (n,), device=device)
    rows = []
    shape = (f"{head} " if head else "") + f"N={n} H={h} V={v} {str(dtype).split('.')[-1]}" + \
        (f" softcap={softcap:g}" if softcap else "")
    base_fields = dict(shape=shape, head=head, n=n, h=h, v=v, dtype=str(dtype).split(".")[-1], softcap=softcap)
    roofline = "GEMM roofline (cuBLAS)" if device.type == "cuda" else "GEMM floor (BLAS)"
    ctx = Ctx(device, dtype, softcap, with_compile, chunk_rows)
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        flops = (8 if backward else 2) * n * h * v  # with the logits recompute in backward
        floor_name = f"3 GEMMs ({'roofline' if device.type == 'cuda' else 'floor'})" if backward else \
            f"1 GEMM ({'roofline' if device.type == 'cuda' else 'floor'})"
        steps, peaks, values, not_run = {}, {}, {}, []
        for name, fn, sign in variants(ctx):
            if only and not any(o in name for o in only):
                continue
            if isinstance(fn, str):  # a peer not installed, or not for this device: a row saying so
                not_run.append(stream.row(dict(base_fields, mode=mode, variant=name, skipped=fn)))
                continue
            step = make_step(fn, hidden, weight, targets, backward)
            try:  # warm-up (compilation happens here), then one run for peak memory
                values[name] = sign * step().double().sum().item()
                with PeakMemory(device) as mem:
                    step()
                peak = mem.peak_bytes
            except Exception as exc:  # e.g. torch.compile unavailable, out of memory: the others still run
                print(f"  {name} {mode}: failed ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
                not_run.append(stream.row(dict(base_fields, mode=mode, variant=name,
                                               error=f"{type(exc).__name__}: {exc}"[:300])))
                peak = None
            if peak is None:  # outside the except block: its traceback no longer holds the failed step's tensors
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            steps[name], peaks[name] = step, peak
        steps[floor_name] = lambda: floor_gemms(hidden, weight, backward)
        steps[floor_name]()
        times = interleaved_times(steps, device, repeats)
        medians = medians_of(times)
        floor = medians[floor_name]
        base = medians.get("naive")
        for name, seconds in medians.items():
            is_floor = name == floor_name
            row = dict(base_fields, mode=mode, variant=name, seconds=seconds, seconds_ms=seconds * 1e3,
                       gflops=((6 if backward else 2) * n * h * v if is_floor else flops) / seconds / 1e9,
                       time_vs_floor=seconds / floor, roofline_fraction=floor / seconds, roofline=roofline,
                       seconds_each_round=times[name], time_vs_floor_paired=paired_ratio(times, name, floor_name))
            if not is_floor:
                row["peak_extra_mib"] = peaks[name] / 2**20
            if name in values and "naive" in values:
                row["value_rel_err"] = abs(values[name] - values["naive"]) / max(abs(values["naive"]), 1e-30)
            if base:
                row["time_vs_naive"] = seconds / base
                if not is_floor and peaks.get("naive"):
                    row["memory_vs_naive"] = peaks[name] / peaks["naive"]
            rows.append(stream.row(row))
            print(f"  {shape} {mode:8s} {name:26s} {seconds * 1e3:9.1f} ms  {seconds / floor:5.2f}x floor  "
                  f"{peaks.get(name, 0) / 2**20:8.0f} MiB", file=sys.stderr)
        rows += not_run  # after the measured rows in the table (streamed when found)
    return rows


# The rows a CPU CHECK holds to naive's time, and in which modes: what backend="auto" runs (forward-only: the cpp
# forward; with gradients: the kept tile), and the loss path the trainers use on CPU (fastalign.fused_grad). The
# cpp row's fwd+bwd is the recompute path, 4 GEMMs in O(chunk) memory: a trade the user asks for by name, reported
# but not held to naive's time (at GEMM-bound fp32 shapes the fourth GEMM costs more than naive's passes).
CHECKED = {("fastalign[cpp]", "fwd"): "CHECK cpp <= naive",
           ("fastalign[auto]", "fwd"): "CHECK auto <= naive",
           ("fastalign[auto]", "fwd+bwd"): "CHECK auto <= naive",
           ("fastalign NLL[cpp] grad-in-fwd", "fwd+bwd"): "CHECK cpp grad-in-fwd <= naive"}


def cpu_checks(rows):
    """CHECK rows: on CPU, what backend="auto" runs must not be slower than naive in the same run (see CHECKED).
    In a dry run the shapes are too small to time anything: the status says so and the exit status ignores it."""
    checks = []
    for r in rows:
        label = CHECKED.get((r["variant"], r.get("mode")))
        if label and "time_vs_naive" in r:
            ok = r["time_vs_naive"] <= 1.0
            checks.append(dict(shape=r["shape"], mode=r["mode"], variant=label, checked_variant=r["variant"],
                               status=("PASS" if ok else "FAIL") + (" (dry run: not enforced)" if dryrun() else ""),
                               time_vs_naive=r["time_vs_naive"]))
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


def plan(args, device):
    """[(n, h, v, dtype, softcap, head)] to run: --shape, else --heads, else the device's defaults."""
    dtypes = [DTYPES[d] for d in (args.dtype or (["bfloat16"] if device.type == "cuda" else ["float32", "bfloat16"]))]
    if dryrun():  # the plumbing in seconds: tiny shapes (one with a softcap, as Gemma's head), one repeat
        return [(64, 32, 256, torch.float32, None, None), (64, 32, 512, torch.float32, 30.0, "gemma2-2b (dry run)")]
    if args.shape:
        return [(*s, dt, args.softcap, None) for s in args.shape for dt in dtypes]
    heads = args.heads if args.heads is not None else (list(HEADS) if device.type == "cuda" else None)
    if heads is None:
        return [(*(int(x) for x in s.split(",")), dt, None, None) for s in CPU_GOAL_SHAPES for dt in dtypes]
    out = []
    for name in heads or HEADS:
        h, v, softcap = HEADS[name]
        if device.type == "cuda":
            out += [(n, h, v, dt, softcap, name) for n in (args.n or GPU_HEAD_NS) for dt in dtypes]
        else:  # scaled: V and softcap as the model's, H and N small so one shape takes seconds
            out += [(n, CPU_HEAD_H, v, dt, softcap, f"{name} (H {h}->{CPU_HEAD_H})")
                    for n in (args.n or (CPU_HEAD_N,)) for dt in dtypes]
    return out


def _shape_arg(text):
    try:
        n, h, v = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants N,H,V (three integers), got {text!r}") from None
    if min(n, h, v) < 1:
        raise argparse.ArgumentTypeError(f"--shape wants positive sizes, got {text!r}")
    return n, h, v


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", type=_shape_arg, help="N,H,V (repeatable)")
    p.add_argument("--softcap", type=float, help="final-logit softcap for --shape (Gemma-2: 30)")
    p.add_argument("--heads", nargs="*", choices=list(HEADS),
                   help="named model heads (no names: all); on CPU scaled to H=%d, N=%d" % (CPU_HEAD_H, CPU_HEAD_N))
    p.add_argument("--n", type=int, action="append", help="token counts N for --heads (repeatable)")
    p.add_argument("--dtype", choices=DTYPES, action="append", help="repeatable; default fp32 and bf16 on CPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--chunk-rows", type=int, action="append",
                   help="also the gradient-in-forward cpp path with this chunk_rows (repeatable): its time / memory "
                        "trade")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for every variant (default: torch's)")
    p.add_argument("--tag", default="", help="suffix of the result file names (several runs on one day)")
    p.add_argument("--grad-filter", action="store_true",
                   help="instead: grad_filter_eps on cpp, speed-up and gradient error on a peaked distribution")
    p.add_argument("--only", help="comma-separated substrings: run only the variants whose name holds one "
                                   "(naive always runs: it is the baseline)")
    add_cpu_isa_arg(p)
    add_common_args(p)
    return p


COLUMNS = [("shape", "shape", None), ("mode", "pass", None), ("variant", "variant", None),
           ("seconds_ms", "time (ms)", "{:.1f}"), ("time_vs_naive", "time vs naive", "{:.2f}x"),
           ("time_vs_floor", "time vs floor", "{:.2f}x"),
           ("time_vs_floor_paired", "vs floor, paired by round", "{:.2f}x"),
           ("roofline_fraction", "of GEMM roofline", "{:.0%}"),
           ("gflops", "GFLOP/s", "{:.0f}"), ("peak_extra_mib", "peak extra (MiB)", "{:.0f}"),
           ("memory_vs_naive", "memory vs naive", "{:.3f}x"), ("value_rel_err", "value err", "{:.0e}"),
           ("status", "check / note", None)]


def run(args):
    """Measure what args ask for; returns (env, rows, table, exit status). Used by `fastalign bench` too."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dryrun():
        args.repeats, args.no_compile = 1, True
    env = environment()
    stream = JsonlStream(args.jsonl, "linear_logprobs", env)
    rows = []
    for n, h, v, dtype, softcap, head in plan(args, device):
        only = None if not args.only else ["naive"] + args.only.split(",")
        rows += bench_shape(n, h, v, dtype, device, args.repeats, not args.no_compile, only, stream, softcap, head,
                            getattr(args, "chunk_rows", None))
    checks = [stream.row(c) for c in (cpu_checks(rows) if device.type == "cpu" else [])]
    rows += checks
    stream.close()
    env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    for r in rows:  # one column for the check status, a skipped peer's reason or a failure
        r.setdefault("status", r.get("skipped") or r.get("error") or "")
    columns = [c for c in COLUMNS if device.type == "cuda" or c[0] != "roofline_fraction"]
    table = markdown_table(rows, columns)
    failed = [c for c in checks if c["status"] == "FAIL"]
    return env, rows, table, 1 if failed else 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.cpu_isa:
        rerun_with_cpu_isa(args.cpu_isa, __file__, sys.argv[1:] if argv is None else argv)
    if args.grad_filter:
        env = environment()
        stream = JsonlStream(args.jsonl, "linear_logprobs-grad-filter", env)
        rows = [stream.row(r) for r in grad_filter_study(args.repeats)]
        columns = [("variant", "variant", None), ("seconds_ms", "time (ms)", "{:.0f}"),
                   ("time_vs_unfiltered", "time vs unfiltered", "{:.2f}x"),
                   ("rel_err_d_hidden", "d_hidden rel. err", "{:.1e}"),
                   ("rel_err_d_weight", "d_weight rel. err", "{:.1e}"),
                   ("rel_err_d_bias", "d_bias rel. err", "{:.1e}")]
        for r in rows:
            r["seconds_ms"] = r["seconds"] * 1e3
        table = markdown_table(rows, columns)
        print(table)
        print(write_results("linear_logprobs-grad-filter" + (f"-{args.tag}" if args.tag else ""), env, rows, table,
                            args.out))
        return 0
    env, rows, table, status = run(args)
    publish("linear_logprobs" + (f"-{args.tag}" if args.tag else ""), env, rows, table, args.out,
            [r for r in rows if r.get("mode") == "fwd+bwd" and "seconds" in r],
            [("time_vs_naive", "fwd+bwd time vs naive"), ("memory_vs_naive", "peak extra memory vs naive")])
    for c in rows:
        if str(c.get("variant")).startswith("CHECK ") and c["status"] == "FAIL" and status:
            print(f"FAIL: {c['checked_variant']} is slower than naive at {c['shape']} {c['mode']} "
                  f"({c['time_vs_naive']:.2f}x)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
