"""grad_filter_eps (Cut Cross-Entropy's gradient filter) on a trained tiny model's logits: speed-up and gradient
error against the float64 reference, per eps, same run (interleaved medians).

The model: a 2-layer Llama-style transformer (hidden 128) with a 32000-entry vocabulary, built from a config and
trained here for a few hundred steps on synthetic text from a sparse Markov chain (each token has a handful of
likely successors, Zipf-weighted, plus a uniform floor): after training its next-token distributions are
peaked where the data is predictable and flat where it is not, as a language model's are. Then, on held-out
rows, ``linear_logprobs(..., backend="cpp", grad_filter_eps=eps)`` forward+backward against eps=None.

  python bench/grad_filter_trained.py                 # ~2-4 minutes on a 2-core CPU
  python bench/grad_filter_trained.py --steps 50 --rows 512 --repeats 3  # quicker
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import fastalign as fa  # noqa: E402
from bench.common import environment, markdown_table, write_results  # noqa: E402
from tests.reference import reference_linear_logprobs  # noqa: E402

V, H, T = 32000, 128, 64


def markov_chain(seed, successors=8, floor=0.02):
    """A sparse transition rule: each token's successors (ids drawn from a Zipf law over the vocabulary, so that
    frequent tokens are frequent everywhere) and their Zipf weights."""
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 1.1
    nxt = torch.multinomial(zipf / zipf.sum(), V * successors, replacement=True, generator=g).view(V, successors)
    w = 1.0 / torch.arange(1, successors + 1, dtype=torch.float64)
    return nxt, w / w.sum() * (1 - floor), g, floor


def sample(chain, batch):
    nxt, w, g, floor = chain
    x = torch.empty(batch, T, dtype=torch.long)
    x[:, 0] = nxt[torch.randint(0, V, (batch,), generator=g), 0]
    for t in range(1, T):
        uniform = torch.rand(batch, generator=g) < floor
        k = torch.multinomial(w.float(), batch, replacement=True, generator=g)
        x[:, t] = torch.where(uniform, nxt[torch.randint(0, V, (batch,), generator=g), 0], nxt[x[:, t - 1], k])
    return x


def train(steps, batch, seed=0):
    from fastalign.data import tiny_llama_config
    import transformers
    torch.manual_seed(seed)
    cfg = tiny_llama_config(V, hidden_size=H, intermediate_size=4 * H, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    chain = markov_chain(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in tqdm(range(steps), desc="training the tiny model", file=sys.stderr):
        x = sample(chain, batch)
        h = model.model(input_ids=x).last_hidden_state[:, :-1].reshape(-1, H)
        loss = fa.fused_linear_nll_loss(h, model.lm_head.weight, x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, chain, losses


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rows", type=int, default=2048, help="held-out rows for the measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--eps", default="1e-8,1e-6,1e-4,1e-3")
    args = p.parse_args()
    model, chain, losses = train(args.steps, args.batch)
    with torch.no_grad():
        x = sample(chain, max(1, args.rows // (T - 1) + 1))
        hid = model.model(input_ids=x).last_hidden_state[:, :-1].reshape(-1, H)[:args.rows].contiguous()
        tgt = x[:, 1:].reshape(-1)[:args.rows].contiguous()
    weight = model.lm_head.weight.detach().contiguous()
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(hid.shape[0], generator=g)  # a generic upstream gradient, not only ones

    hr, wr = hid.double().requires_grad_(), weight.double().requires_grad_()
    lp_ref = reference_linear_logprobs(hr, wr, tgt)
    (lp_ref * upstream.double()).sum().backward()
    probs = torch.softmax(hr.detach() @ wr.detach().t(), -1)
    epsilons = [None] + [float(e) for e in args.eps.split(",")]

    def step(eps):
        h, w = hid.clone().requires_grad_(), weight.clone().requires_grad_()
        (fa.linear_logprobs(h, w, tgt, backend="cpp", grad_filter_eps=eps) * upstream).sum().backward()
        return h.grad, w.grad

    errors = {}
    for eps in epsilons:
        dh, dw = step(eps)
        errors[eps] = {name: ((got.double() - ref).norm() / ref.norm()).item()
                       for name, got, ref in (("d_hidden", dh, hr.grad), ("d_weight", dw, wr.grad))}
    times = {eps: [] for eps in epsilons}
    for _ in tqdm(range(args.repeats), desc="timing", file=sys.stderr):
        for eps in epsilons:
            t0 = time.perf_counter()
            step(eps)
            times[eps].append(time.perf_counter() - t0)
    base = statistics.median(times[None])
    rows = []
    for eps in epsilons:
        med = statistics.median(times[eps])
        rows.append(dict(eps=eps, seconds=med, time_vs_exact=med / base,
                         below_eps=None if eps is None else (probs < eps).double().mean().item(),
                         rel_err_d_hidden=errors[eps]["d_hidden"], rel_err_d_weight=errors[eps]["d_weight"]))
    env = environment()
    env.update(model=f"2-layer Llama, H={H}, V={V}, trained {args.steps} steps x {args.batch}x{T} tokens",
               final_train_loss=sum(losses[-10:]) / max(1, len(losses[-10:])), rows=int(hid.shape[0]),
               load_average=os.getloadavg())
    table = markdown_table(rows, [("eps", "grad_filter_eps", None), ("seconds", "fwd+bwd (s)", "{:.3f}"),
                                  ("time_vs_exact", "time vs exact", "{:.2f}x"),
                                  ("below_eps", "share of p below eps", "{:.3f}"),
                                  ("rel_err_d_hidden", "rel. error d_hidden", "{:.1e}"),
                                  ("rel_err_d_weight", "rel. error d_weight", "{:.1e}")])
    print(f"train loss {losses[0]:.2f} -> {env['final_train_loss']:.2f} (uniform: {torch.log(torch.tensor(V)):.2f})")
    print(table)
    print(write_results("grad_filter_trained", env, rows, table))


if __name__ == "__main__":
    main()
