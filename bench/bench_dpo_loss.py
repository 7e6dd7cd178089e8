"""DPO loss from hidden states, side by side in one run: naive PyTorch DPO (materialized logits, as TRL's
logits path computes it), fastalign's FusedDPOLoss on every backend, and Liger-Kernel's LigerFusedLinearDPOLoss
(optional peer, `pip install 'fastalign[bench]'`; missing, it is a row saying so). Same shapes, same inputs,
reference log-probs from ref_hidden/ref_weight; forward+backward median time (repeats interleaved across
variants) and peak extra memory, as ratios against naive measured in the same run; "loss err" checks each
variant's loss against naive's.

  python bench/bench_dpo_loss.py                   # CPU shape, or a Llama-3-8B-like shape on CUDA
  python bench/bench_dpo_loss.py --pairs 4 --seq 512 --hidden 1024 --vocab 32000 --jsonl rows.jsonl
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fastalign as fa  # noqa: E402
from bench import peers  # noqa: E402
from bench.common import (JsonlStream, add_common_args, dryrun, environment, interleaved_medians,  # noqa: E402
                          markdown_table, publish)
from fastalign.profiling import PeakMemory  # noqa: E402
from tests.reference import naive_linear_logprobs  # noqa: E402

BETA = 0.1
DEFAULTS = {"cuda": dict(pairs=4, seq=1024, hidden=4096, vocab=128256),
            "cpu": dict(pairs=4, seq=256, hidden=1024, vocab=32000),
            "dryrun": dict(pairs=2, seq=16, hidden=32, vocab=256)}


def naive_dpo(hidden, weight, labels, ref_hidden, ref_weight, beta=BETA):
    """Plain PyTorch DPO as TRL computes it: full logits for policy and reference."""
    b2, t, h = hidden.shape

    def seq(hd, w):
        return naive_linear_logprobs(hd.reshape(b2 * t, h), w, labels.reshape(-1)).view(b2, t).sum(-1)

    pol = seq(hidden, weight)
    with torch.no_grad():
        ref = seq(ref_hidden, ref_weight)
    b = b2 // 2
    return fa.dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:], beta=beta).mean()


# ---- the variants: each entry maps (device, compiled) to [(name, fn or why-not string)] ------------------------
# fn(hidden [2B, T, H], weight [V, H], labels [2B, T], ref_hidden, ref_weight) -> scalar loss (chosen rows first).
# Adding a row is adding one entry to VARIANTS.

def _naive(device, compiled):
    return [("naive DPO", naive_dpo)]


def _fused(device, compiled):
    out = []
    for backend in fa.available_backends():
        if (backend == "cpp" and device.type != "cpu") or (backend == "triton" and device.type != "cuda"):
            continue
        fn = fa.FusedDPOLoss(beta=BETA, backend=backend)
        out.append((f"FusedDPOLoss[{backend}]", (lambda fn: lambda h, w, l, rh, rw: fn(
            h, w, l, ref_hidden=rh, ref_weight=rw).loss)(fn)))
        if backend != "triton":  # the gradient computed in forward (fastalign.fused_grad; the trainers' CPU path)
            fn = fa.FusedDPOLoss(beta=BETA, backend=backend, grad_in_forward=True)
            out.append((f"FusedDPOLoss[{backend}] grad-in-fwd", (lambda fn: lambda h, w, l, rh, rw: fn(
                h, w, l, ref_hidden=rh, ref_weight=rw).loss)(fn)))
    return out


def _liger(device, compiled):
    return [("Liger FusedLinearDPOLoss" + ("" if compiled else " (compiled=False)"),
             peers.liger_dpo(BETA, compiled=compiled))]


VARIANTS = [_naive, _fused, _liger]


def bench_shape(b, t, h, v, dtype, device, repeats, compiled, stream):
    torch.manual_seed(0)
    hidden = (torch.randn(2 * b, t, h, device=device) * 0.5).to(dtype)
    ref_hidden = (hidden.float() + 0.05 * torch.randn_like(hidden.float())).to(dtype)
    weight = (torch.randn(v, h, device=device) * 0.02).to(dtype)
    ref_weight = weight.clone()
    labels = torch.randint(0, v, (2 * b, t), device=device)
    labels[:, : t // 4] = -100  # prompt tokens, as in real preference data
    fields = dict(shape=f"B={b} pairs T={t} H={h} V={v} {str(dtype).split('.')[-1]}", pairs=b, seq=t, h=h, v=v,
                  dtype=str(dtype).split(".")[-1])
    steps, peaks, losses, not_run = {}, {}, {}, []
    for name, fn in [v for factory in VARIANTS for v in factory(device, compiled)]:
        if isinstance(fn, str):
            not_run.append(stream.row(dict(fields, variant=name, skipped=fn)))
            continue

        def step(fn=fn):
            hh = hidden.detach().requires_grad_()
            ww = weight.detach().requires_grad_()
            loss = fn(hh, ww, labels, ref_hidden, ref_weight)
            loss.backward()
            return loss.detach()
        try:  # warm-up (compilation happens here), then one run for peak memory
            losses[name] = step().item()
            with PeakMemory(device) as mem:
                step()
        except Exception as exc:  # out of memory, a peer's failure: the others still run
            print(f"  {name}: failed ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
            not_run.append(stream.row(dict(fields, variant=name, error=f"{type(exc).__name__}: {exc}"[:300])))
            continue
        steps[name], peaks[name] = step, mem.peak_bytes
    medians = interleaved_medians(steps, device, repeats)
    rows, base = [], "naive DPO"
    for name, seconds in medians.items():
        row = dict(fields, variant=name, seconds_ms=seconds * 1e3, peak_extra_mib=peaks[name] / 2**20,
                   loss=losses[name])
        if base in medians:
            row["time_vs_naive"] = seconds / medians[base]
            row["memory_vs_naive"] = peaks[name] / max(peaks[base], 1)
            row["loss_abs_err"] = abs(losses[name] - losses[base])
        rows.append(stream.row(row))
        print(f"  {name:36s} {seconds * 1e3:9.1f} ms {peaks[name] / 2**20:8.0f} MiB", file=sys.stderr)
    return rows + not_run


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for k in ("pairs", "seq", "hidden", "vocab"):
        p.add_argument(f"--{k}", type=int, help=f"default: {DEFAULTS['cpu'][k]} on CPU, {DEFAULTS['cuda'][k]} on CUDA")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="Liger without its torch.compile (compiled=False)")
    add_common_args(p)
    return p


COLUMNS = [("shape", "shape", None), ("variant", "variant", None), ("seconds_ms", "fwd+bwd (ms)", "{:.1f}"),
           ("time_vs_naive", "time vs naive", "{:.2f}x"), ("peak_extra_mib", "peak extra (MiB)", "{:.0f}"),
           ("memory_vs_naive", "memory vs naive", "{:.3f}x"), ("loss_abs_err", "loss err", "{:.0e}"),
           ("note", "note", None)]


def run(args):
    """Measure what args ask for; returns (env, rows, table, exit status). Used by `fastalign bench` too."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = DEFAULTS["dryrun" if dryrun() else device.type]
    if dryrun():  # the plumbing in seconds: tiny shapes, one repeat, Liger uncompiled
        args.repeats, args.no_compile = 1, True
    b, t, h, v = (getattr(args, k) or d[k] for k in ("pairs", "seq", "hidden", "vocab"))
    for k, x in zip(("pairs", "seq", "hidden", "vocab"), (b, t, h, v)):
        if x < 1:
            raise ValueError(f"--{k} must be a positive integer, got {x}")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = environment()
    stream = JsonlStream(args.jsonl, "dpo_loss", env)
    rows = bench_shape(b, t, h, v, dtype, device, args.repeats, not args.no_compile, stream)
    stream.close()
    for r in rows:
        r["note"] = r.get("skipped") or r.get("error") or ""
    return env, rows, markdown_table(rows, COLUMNS), 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    env, rows, table, status = run(args)
    publish("dpo_loss", env, rows, table, args.out, [r for r in rows if "time_vs_naive" in r],
            [("time_vs_naive", "fwd+bwd time vs naive DPO"), ("memory_vs_naive", "peak extra memory vs naive")])
    return status


if __name__ == "__main__":
    sys.exit(main())
