"""Benchmark the nn_count op (clone-robust weights' nearest-neighbour counting): every available backend vs the
torch baseline (chunked cdist + argmin) in the same run; medians; JSON + markdown table + PNG in bench/results/.

    python bench/bench_nn_count.py                       # M in {1k, 10k, 100k}, d in {8, 64, 384}, S = 1e6
    python bench/bench_nn_count.py --m 1000 10000 --d 8 64 --samples 100000 --repeats 3
    python bench/bench_nn_count.py --m 100000 --single-run --tag m100k   # one timed run per row (minutes each)
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import (JsonlStream, add_common_args, dryrun, environment, markdown_table, measure,  # noqa: E402
                          ratio_plot, write_results)
from fastalign.backends import available_backends, get_backend  # noqa: E402
from fastalign.clone_robust import sample_keys  # noqa: E402


def problem(m, d, device):
    g = torch.Generator().manual_seed(0)
    points = torch.randn(m, d, generator=g).to(device)
    return (points, (points.double() ** 2).sum(1).float(), torch.tensor([0, m], device=device),
            sample_keys(0, torch.tensor([0]), d).to(device), torch.full((1, d), 6.0, device=device))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[1000, 10000, 100000], help="alternatives M")
    p.add_argument("--d", type=int, nargs="+", default=[8, 64, 384], help="dimensions d")
    p.add_argument("--samples", type=int, default=1_000_000, help="samples S")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    p.add_argument("--tag", default="", help="suffix of the result file names (several runs on one day)")
    p.add_argument("--single-run", action="store_true",
                   help="one timed run per row, no warm-up (with --repeats 1: rows that take minutes)")
    add_common_args(p)
    args = p.parse_args(argv)
    if dryrun():  # the plumbing in seconds: tiny shapes, one repeat
        args.m, args.d, args.samples, args.repeats = [100], [8], 1000, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = args.backends or [b for b in available_backends() if not (b == "triton" and device.type == "cpu")]
    if "torch" not in names:
        names = ["torch"] + names
    env = environment()
    stream = JsonlStream(args.jsonl, "nn_count", env)
    rows = []
    for m in args.m:
        for d in args.d:
            inputs = problem(m, d, device)
            base = None
            for name in ["torch"] + [n for n in names if n != "torch"]:
                count = get_backend(name, op="nn_count").count
                if args.single_run:  # loading the extension (or a JIT) is not part of the row: a tiny call first
                    count(*problem(64, d, device), 64)
                t, mem = measure(lambda: count(*inputs, args.samples), device, 1 if args.single_run else args.repeats,
                                 f"{name} M={m} d={d}", warmup=not args.single_run)
                if name == "torch":
                    base = t
                row = dict(shape=f"M={m} d={d}", m=m, d=d, samples=args.samples, backend=name, seconds=t,
                           peak_bytes=mem if isinstance(mem, int) else None,
                           speedup=(base / t) if (t and base) else None,
                           samples_per_s=(args.samples / t) if t else None,
                           gflops=(2 * args.samples * m * d / t / 1e9) if t else None,  # the distances' s.x
                           timed_runs=1 if args.single_run else args.repeats, warm_up=not args.single_run)
                rows.append(stream.row(row))
                print(f"M={m:>6} d={d:>3} S={args.samples} {name:>6}: "
                      f"{'failed' if t is None else f'{t:.3f} s'}  x{row['speedup'] or 0:.2f} vs torch", flush=True)
    columns = [("shape", "shape", None), ("backend", "backend", None),
               ("seconds", "s (one run)" if args.single_run else "median s", "{:.3f}"),
               ("samples_per_s", "samples/s", "{:.3g}"), ("gflops", "GFLOP/s", "{:.0f}"),
               ("speedup", "vs torch", "{:.2f}x")]
    table = markdown_table(rows, columns)
    print(table)
    name = "nn_count" + (f"-{args.tag}" if args.tag else "")
    print("wrote", write_results(name, env, rows, table, args.out))
    png = ratio_plot(name, env, [r for r in rows if r["backend"] != "torch"], "shape", "backend",
                     [("speedup", f"speed-up vs torch (cdist + argmin), S = {args.samples}")], args.out)
    if png:
        print("wrote", png)


if __name__ == "__main__":
    sys.exit(main())
