"""The fused op against naive PyTorch on a model-sized CPU problem (`python -m fastalign.opdemo`).

Same values, memory saved, time. Run: python -m fastalign.opdemo [--tokens N --hidden H --vocab V]
"""
import argparse
import sys

import torch

import fastalign as fa
from fastalign.profiling import PeakMemory, median_time


def naive(hidden, weight, targets):
    """What users write: materialize [N, V] logits, log_softmax, gather."""
    logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    return logp.gather(1, targets.unsqueeze(1)).squeeze(1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(n, h) * 0.5
    weight = torch.randn(v, h) * 0.02
    targets = torch.randint(0, v, (n,))
    print(f"fastalign {fa.__version__} | backends here: {', '.join(fa.available_backends())} | "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"problem: N={n} tokens, H={h}, V={v}; naive logits alone are {n * v * 4 / 2**20:.0f} MiB in fp32\n")

    rows = []
    variants = [("naive PyTorch", naive)] + [(f"fastalign[{b}]", (lambda b: lambda x, w, t: fa.linear_logprobs(
        x, w, t, backend=b))(b)) for b in fa.available_backends() if b != "triton"]
    values = {}
    for name, fn in variants:
        def step():
            x = hidden.detach().requires_grad_()
            w = weight.detach().requires_grad_()
            out = fn(x, w, targets)
            out.sum().backward()
            return out.detach()
        with PeakMemory() as mem:
            values[name] = step()
        seconds = median_time(step, warmup=0, repeats=args.repeats)
        rows.append((name, seconds, mem.peak_bytes))
        print(f"  measured {name}", file=sys.stderr)

    base_t, base_m = rows[0][1], rows[0][2]
    print("| forward+backward | time (s) | time vs naive | peak extra memory (MiB) | memory vs naive | "
          "max |diff| vs naive |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds, mem in rows:
        diff = (values[name] - values["naive PyTorch"]).abs().max().item()
        print(f"| {name} | {seconds:.2f} | {seconds / base_t:.2f}x | {mem / 2**20:.0f} | {mem / max(base_m, 1):.2f}x | "
              f"{diff:.1e} |")
    print("\npeak extra memory includes the fp32 d_weight [V, H] every variant must produce "
          f"({v * h * 4 / 2**20:.0f} MiB).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
