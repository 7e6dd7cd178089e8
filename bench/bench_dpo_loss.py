"""DPO loss from hidden states: FusedDPOLoss vs naive PyTorch DPO (materialized logits) and, where installed
and on CUDA, Liger-Kernel's LigerFusedLinearDPOLoss. Same shapes, reference from ref_hidden/ref_weight,
forward+backward median time and peak extra memory, as ratios against naive measured in the same run.

  python bench/bench_dpo_loss.py                   # CPU shape, or a Llama-3-8B-like shape on CUDA
  python bench/bench_dpo_loss.py --pairs 4 --seq 512 --hidden 1024 --vocab 32000
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fastalign as fa  # noqa: E402
from bench.common import (JsonlStream, add_common_args, dryrun, environment, markdown_table, measure,  # noqa: E402
                          ratio_plot, write_results)
from tests.reference import naive_linear_logprobs  # noqa: E402


def naive_dpo(hidden, weight, labels, ref_hidden, ref_weight, beta=0.1):
    """Plain PyTorch DPO as TRL computes it: full logits for policy and reference."""
    b2, t, h = hidden.shape

    def seq(hd, w):
        return naive_linear_logprobs(hd.reshape(b2 * t, h), w, labels.reshape(-1)).view(b2, t).sum(-1)

    pol = seq(hidden, weight)
    with torch.no_grad():
        ref = seq(ref_hidden, ref_weight)
    b = b2 // 2
    return fa.dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:], beta=beta).mean()


def variants(device):
    out = [("naive DPO", naive_dpo)]
    for backend in fa.available_backends():
        if (backend == "cpp" and device.type != "cpu") or (backend == "triton" and device.type != "cuda"):
            continue
        fn = fa.FusedDPOLoss(beta=0.1, backend=backend)
        out.append((f"FusedDPOLoss[{backend}]", (lambda fn: lambda h, w, l, rh, rw: fn(
            h, w, l, ref_hidden=rh, ref_weight=rw).loss)(fn)))
    if device.type == "cuda":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
            liger = LigerFusedLinearDPOLoss(beta=0.1, compute_nll_loss=False, use_ref_model=True)
            out.append(("Liger LigerFusedLinearDPOLoss",
                        lambda h, w, l, rh, rw: liger(w, h, l, ref_input=rh, ref_weight=rw)[0]))
        except ImportError:
            print("  liger-kernel not installed: Liger column skipped", file=sys.stderr)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--repeats", type=int, default=3)
    add_common_args(p)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    d = dict(pairs=4, seq=1024, hidden=4096, vocab=128256) if device.type == "cuda" else \
        dict(pairs=4, seq=256, hidden=1024, vocab=32000)
    if dryrun():  # the plumbing in seconds: tiny shapes, one repeat
        d, args.repeats = dict(pairs=2, seq=16, hidden=32, vocab=256), 1
    b, t, h, v = (getattr(args, k) or d[k] for k in ("pairs", "seq", "hidden", "vocab"))
    torch.manual_seed(0)
    hidden = (torch.randn(2 * b, t, h, device=device) * 0.5).to(dtype)
    ref_hidden = (hidden.float() + 0.05 * torch.randn_like(hidden.float())).to(dtype)
    weight = (torch.randn(v, h, device=device) * 0.02).to(dtype)
    ref_weight = weight.clone()
    labels = torch.randint(0, v, (2 * b, t), device=device)
    labels[:, : t // 4] = -100  # prompt tokens, as in real preference data
    shape = f"B={b} pairs T={t} H={h} V={v} {str(dtype).split('.')[-1]}"
    env = environment()
    stream = JsonlStream(args.jsonl, "dpo_loss", env)
    rows = []
    for name, fn in variants(device):
        def step():
            hh = hidden.detach().requires_grad_()
            ww = weight.detach().requires_grad_()
            fn(hh, ww, labels, ref_hidden, ref_weight).backward()
        seconds, peak = measure(step, device, args.repeats, name)
        if seconds is None:
            rows.append(stream.row(dict(shape=shape, variant=name, error=peak)))
            continue
        row = dict(shape=shape, variant=name, seconds_ms=seconds * 1e3, peak_extra_mib=peak / 2**20)
        base = rows[0] if rows else row  # naive DPO runs first: the baseline
        if "seconds_ms" in base:
            row["time_vs_naive"] = row["seconds_ms"] / base["seconds_ms"]
            row["memory_vs_naive"] = row["peak_extra_mib"] / max(base["peak_extra_mib"], 1e-9)
        rows.append(stream.row(row))
        print(f"  {name:32s} {seconds * 1e3:9.1f} ms {peak / 2**20:8.0f} MiB", file=sys.stderr)
    table = markdown_table(rows, [("shape", "shape", None), ("variant", "variant", None),
                                  ("seconds_ms", "fwd+bwd (ms)", "{:.1f}"), ("time_vs_naive", "time vs naive", "{:.2f}x"),
                                  ("peak_extra_mib", "peak extra (MiB)", "{:.0f}"),
                                  ("memory_vs_naive", "memory vs naive", "{:.3f}x")])
    print(f"\nfastalign {env['fastalign']}, torch {env['torch']}, on {env['device']}, {env['date']}\n")
    print(table)
    path = write_results("dpo_loss", env, rows, table, args.out)
    plot = ratio_plot("dpo_loss", env, [r for r in rows if "time_vs_naive" in r], "shape", "variant",
                      [("time_vs_naive", "fwd+bwd time vs naive DPO"), ("memory_vs_naive", "peak extra memory vs naive")],
                      args.out)
    print(f"\nresults: {path}" + (f"\nplot: {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
