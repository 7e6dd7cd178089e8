"""The inputs and checks the linear_logprobs tests share (test_linear_logprobs.py, test_linear_logprobs_triton.py,
test_linear_logprobs_kept_tile.py): the backends the CPU tests run, the tolerance per dtype, a ragged random case,
the value and gradients of one call with fresh leaves, and the comparison against the float64 reference."""
import torch

from tests.backends import cpu_backends

# "auto" on CPU with gradients is its own path (the kept tile, fastalign/kept_tiles.py): every test runs it too
CPU_BACKENDS = cpu_backends() + ["auto"]
ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def make_case(n, h, v, *, dtype=torch.float32, bias=False, ignore_every=4, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=gen) * scale).to(dtype)
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5 * 3).to(dtype)
    b = (torch.randn(v, generator=gen) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    if ignore_every:
        targets[::ignore_every] = -100
    grad = torch.randn(n, generator=gen)
    return hidden, weight, b, targets, grad


def run(fn, hidden, weight, bias, targets, grad, **kw):
    """Value and gradients of sum(grad * fn(...)) with fresh leaves."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = fn(h, w, targets, b, **kw)
    (out.double() * grad.double()).sum().backward()
    return out.detach(), h.grad, w.grad, None if b is None else b.grad


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(got, ref, tol, what=("logp", "d_hidden", "d_weight", "d_bias")):
    for name, g, r in zip(what, got, ref):
        if r is None:
            assert g is None, name
            continue
        err = max_err(g, r)
        scale = max(1.0, r.abs().max().item())
        assert err <= tol * scale, f"{name}: max abs error {err:.3e} > {tol:.1e} * {scale:.2f}"
