"""Shared by the loss tests (test_losses.py, test_fused_grad.py, test_chunk_gemms.py): a ragged DPO batch, a naive
DPO written out in float64 from the reference log-probs, and gradient helpers."""
import torch

from tests.reference import reference_sequence_logprobs


def logsig(x):  # written out, not F.logsigmoid, so the test does not share code with the library
    return -torch.log1p(torch.exp(-x))


def batch(b=3, t=9, h=16, v=101, seed=0, dtype=torch.float32):
    """hidden [2B, T, H], labels [2B, T] with prompt masking, padding and a single-token chosen answer."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * b, t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5 * 2).to(dtype)
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    labels[:, :3] = -100          # prompt
    labels[1, 6:] = -100          # chosen padding
    labels[b + 2, 5:] = -100      # rejected padding
    labels[0, 4:] = -100          # chosen answer of pair 0 is a single token
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=g).to(dtype)
    ref_weight = weight + 0.05 * torch.randn(weight.shape, generator=g).to(dtype)
    return hidden, weight, labels, ref_hidden, ref_weight


def naive_pair_logps(hidden, weight, labels):
    seq, n = reference_sequence_logprobs(hidden, weight, labels)
    b = seq.shape[0] // 2
    return seq[:b], seq[b:], n[:b].double(), n[b:].double()


def naive_dpo(hidden, weight, labels, ref_hidden, ref_weight, beta, loss_type, eps, rpo_alpha, w=None):
    pc, pr, nc, nr = naive_pair_logps(hidden, weight, labels)
    rc, rr, _, _ = naive_pair_logps(ref_hidden, ref_weight, labels)
    if loss_type == "ipo":
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    h = (pc - rc) - (pr - rr)
    losses = {"sigmoid": lambda: -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h),
              "robust": lambda: (-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps),
              "hinge": lambda: torch.clamp(1 - beta * h, min=0),
              "ipo": lambda: (h - 1 / (2 * beta)) ** 2}[loss_type]()
    if rpo_alpha:
        losses = losses + rpo_alpha * (-naive_pair_logps(hidden, weight, labels)[0] / nc)
    return losses.mean() if w is None else (w * losses).sum() / w.sum()


def grads(fn, hidden, weight):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w)
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


def assert_grads_close(got, want, tol=2e-5):
    for name, g, r in zip(("loss", "d_hidden", "d_weight"), got, want):
        err = (g - r).abs().max().item()
        assert err <= tol * max(1.0, r.abs().max().item()), f"{name}: {err:.2e}"
