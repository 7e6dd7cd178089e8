"""`fastalign bench`: the benchmarks of bench/ (fastalign vs naive PyTorch, torch.compile, Liger-Kernel, Cut
Cross-Entropy, TRL), one op at a time: prints the markdown table, writes JSON and a PNG.

The harness is bench/bench_<op>.py of the source checkout (bench/ is not in the wheel): this command runs it from
the checkout fastalign is installed from (`pip install -e '.[bench]'`). Peers are optional: a missing one is a
row saying so.
"""
import importlib
import os
import sys

from fastalign.errors import FastalignError

# op -> (bench module, what --shape holds, how many integers, the bench script's flags for them)
OPS = {
    "linear_logprobs": ("bench_linear_logprobs", "N,H,V (tokens, hidden size, vocabulary)", None),
    "dpo_loss": ("bench_dpo_loss", "PAIRS,SEQ,HIDDEN,VOCAB", ("--pairs", "--seq", "--hidden", "--vocab")),
    "e2e": ("bench_e2e_dpo", "BATCH,MAX_LENGTH[,HIDDEN,LAYERS,VOCAB] (pairs per step, tokens; model size)",
            ("--batch", "--max-length", "--hidden", "--layers", "--vocab")),
}
DTYPES = ("float32", "bfloat16", "float16")


def bench_module(op):
    """The bench/bench_<op>.py module of the checkout beside the installed fastalign package."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = os.path.dirname(root)  # fastalign/cli -> fastalign -> the checkout
    name = OPS[op][0]
    if not os.path.isfile(os.path.join(root, "bench", f"{name}.py")):
        raise FastalignError(f"fastalign bench runs the harness in bench/ of the source checkout, and there is no "
                             f"{os.path.join(root, 'bench', name + '.py')} (a wheel install has no bench/): clone "
                             f"the repository and `pip install -e '.[bench]'` there")
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"bench.{name}")


def _ints(text, what, counts):
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise FastalignError(f"--shape {text!r}: expected {what}, integers separated by commas") from None
    if len(values) not in counts:
        raise FastalignError(f"--shape {text!r}: expected {what} ({' or '.join(map(str, counts))} integers), "
                             f"got {len(values)}")
    if min(values) < 1:
        raise FastalignError(f"--shape {text!r}: every size must be a positive integer")
    return values


def script_argv(args):
    """The bench script's own command line for these `fastalign bench` arguments (checked here, so that a bad
    value gets one clear line and exit status 2, never the script's argparse exit)."""
    _, what, flags = OPS[args.op]
    if args.repeats is not None and args.repeats < 1:
        raise FastalignError(f"--repeats must be a positive integer, got {args.repeats}")
    argv = ["--out", args.out]
    if args.jsonl:
        argv += ["--jsonl", args.jsonl]
    if args.op == "linear_logprobs":
        for s in args.shape or []:
            argv += ["--shape", ",".join(map(str, _ints(s, what, (3,))))]
        for d in args.dtype or []:
            argv += ["--dtype", d]
        if args.heads is not None:
            if args.shape:
                raise FastalignError("--heads and --shape both choose the shapes: give one of them")
            argv += ["--heads", *args.heads]
        if args.repeats:
            argv += ["--repeats", str(args.repeats)]
        if args.no_compile:
            argv.append("--no-compile")
        for r in args.chunk_rows or []:
            if r < 1:
                raise FastalignError(f"--chunk-rows must be a positive integer, got {r}")
            argv += ["--chunk-rows", str(r)]
        return argv
    if args.chunk_rows:
        raise FastalignError(f"--chunk-rows applies to linear_logprobs only, not to {args.op}")
    if args.heads is not None:
        raise FastalignError(f"--heads applies to linear_logprobs only, not to {args.op}")
    if args.shape and len(args.shape) > 1:
        raise FastalignError(f"{args.op} takes one --shape, got {len(args.shape)}")
    if args.shape:
        values = _ints(args.shape[0], what, (4,) if args.op == "dpo_loss" else (2, 5))
        for flag, v in zip(flags, values):
            argv += [flag, str(v)]
    if args.op == "dpo_loss":
        if args.dtype:
            if len(args.dtype) > 1 or args.dtype[0] == "float16":
                raise FastalignError(f"dpo_loss takes one --dtype, float32 or bfloat16; got {', '.join(args.dtype)}")
            argv += ["--dtype", args.dtype[0]]
        if args.repeats:
            argv += ["--repeats", str(args.repeats)]
        if args.no_compile:
            argv.append("--no-compile")
        return argv
    if args.dtype:  # e2e
        raise FastalignError("e2e trains in fp32 on CPU and with bf16 autocast on CUDA, as the trainers do: "
                             "--dtype does not apply")
    if args.no_compile:
        raise FastalignError("--no-compile does not apply to e2e (no variant compiles)")
    if args.repeats:
        argv += ["--steps", str(args.repeats + 1)]  # the first step is warm-up
    return argv


def cmd_bench(args):
    argv = script_argv(args)
    module = bench_module(args.op)
    return module.main(argv)


def register(sub):
    p = sub.add_parser("bench", help="benchmark fastalign against naive PyTorch, torch.compile and the peers "
                                     "(Liger-Kernel, Cut Cross-Entropy, TRL)",
                       description="Benchmark one op side by side in one run: fastalign's backends, naive PyTorch, "
                       "naive under torch.compile, and the peers where installed (pip install -e '.[bench]'; a "
                       "missing peer is a row saying so). Prints a markdown table, writes JSON and a PNG to --out. "
                       "Ops: linear_logprobs (the fused op, fwd and fwd+bwd), dpo_loss (DPO from hidden states), "
                       "e2e (one DPO training step, fastalign's trainer vs TRL's). FASTALIGN_GPU_DRYRUN=1 runs tiny "
                       "shapes once (seconds).")
    p.add_argument("op", choices=list(OPS), help="what to benchmark")
    p.add_argument("--shape", action="append",
                   help="linear_logprobs: N,H,V (repeatable); dpo_loss: PAIRS,SEQ,HIDDEN,VOCAB; e2e: "
                        "BATCH,MAX_LENGTH[,HIDDEN,LAYERS,VOCAB] (default: the device's shapes)")
    p.add_argument("--heads", nargs="*", default=None,
                   choices=["llama3-8b", "qwen2.5-0.5b", "gemma2-2b"],
                   help="linear_logprobs: named model heads (none named: all three; scaled down on CPU)")
    p.add_argument("--dtype", action="append", choices=DTYPES,
                   help="linear_logprobs: repeatable (default fp32 and bf16 on CPU, bf16 on CUDA); dpo_loss: one")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats (medians); for e2e, timed training steps (default: the bench's own)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--chunk-rows", type=int, action="append", default=None,
                   help="linear_logprobs: also the gradient-in-forward cpp loss with this chunk_rows (repeatable): "
                        "its time / memory trade")
    p.add_argument("--out", default="fastalign-bench", help="folder for the JSON and PNG (default: ./fastalign-bench)")
    p.add_argument("--jsonl", default=None, help="also append each row to this file as it is measured")
    p.set_defaults(func=cmd_bench)
