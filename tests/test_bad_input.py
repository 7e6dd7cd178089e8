"""Bad input gets a specific exception naming what was wrong and what was expected."""
import pytest
import torch

import fastalign as fa

H, V, N = 8, 13, 5


def ok():
    return torch.randn(N, H), torch.randn(V, H), torch.randint(0, V, (N,))


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda h, w, t: (h[:, :4], w, t), ValueError, "disagree on H"),
    (lambda h, w, t: (h[0], w, t), ValueError, r"hidden must be 2-D \[N, H\]"),
    (lambda h, w, t: (h, w[0], t), ValueError, r"weight must be 2-D \[V, H\]"),
    (lambda h, w, t: (h, w, t[:3]), ValueError, r"targets must be 1-D \[N\] with N = hidden.shape\[0\] = 5"),
    (lambda h, w, t: (h, w, t.float()), TypeError, "targets must be an integer tensor"),
    (lambda h, w, t: (h, w, t.bool()), TypeError, "targets must be an integer tensor"),
    (lambda h, w, t: (h, w, torch.full_like(t, V)), ValueError, r"targets\[0\] = 13 is outside \[0, 13\)"),
    (lambda h, w, t: (h, w, torch.full_like(t, -5)), ValueError, r"outside \[0, 13\) and is not ignore_index=-100"),
    (lambda h, w, t: (h.int(), w, t), TypeError, "hidden must be float32, bfloat16, float16"),
    (lambda h, w, t: (h, w.half(), t), TypeError, "weight dtype torch.float16 must match hidden dtype torch.float32"),
    (lambda h, w, t: (h, w[:0], t), ValueError, "empty vocabulary"),
    (lambda h, w, t: (h.numpy(), w, t), TypeError, "hidden must be a torch.Tensor"),
])
def test_bad_tensors(mutate, exc, match):
    h, w, t = mutate(*ok())
    with pytest.raises(exc, match=match):
        fa.linear_logprobs(h, w, t)


@pytest.mark.parametrize("kw, exc, match", [
    ({"temperature": 0.0}, ValueError, "temperature must be a positive number, got 0.0"),
    ({"temperature": -1}, ValueError, "temperature must be a positive number"),
    ({"temperature": float("nan")}, ValueError, "temperature must be a positive number"),
    ({"softcap": 0.0}, ValueError, "softcap must be None or a positive number"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
    ({"bias": torch.randn(V + 1)}, ValueError, r"bias must be 1-D \[V\] with V = weight.shape\[0\] = 13"),
    ({"backend": "cuda"}, ValueError, "unknown backend 'cuda'"),
    ({"backend": None}, TypeError, "backend must be a string"),
])
def test_bad_options(kw, exc, match):
    h, w, t = ok()
    with pytest.raises(exc, match=match):
        fa.linear_logprobs(h, w, t, **kw)


def test_devices_must_match():
    h, w, t = ok()
    with pytest.raises(ValueError, match="one device"):
        fa.linear_logprobs(h, w.to("meta"), t)


def test_forced_backend_unavailable_says_how_to_get_it(monkeypatch):
    from fastalign import _ext
    monkeypatch.setattr(_ext, "C", None)
    monkeypatch.setattr(_ext, "ERROR", "ImportError: simulated")
    h, w, t = ok()
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available.*pip install --no-build-isolation"):
        fa.linear_logprobs(h, w, t, backend="cpp")
    assert "cpp" not in fa.available_backends()
    # auto falls back to torch
    assert fa.linear_logprobs(h, w, t).shape == (N,)


def test_triton_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    h, w, t = ok()
    with pytest.raises(RuntimeError, match="backend 'triton' is not available.*TRITON_INTERPRET=1"):
        fa.linear_logprobs(h, w, t, backend="triton")


@pytest.mark.skipif("triton" not in fa.available_backends(), reason="triton unavailable")
def test_triton_refuses_float64():
    h, w, t = ok()
    with pytest.raises(TypeError, match="float64"):
        fa.linear_logprobs(h.double(), w.double(), t, backend="triton")


def test_sequence_logprobs_shapes():
    w = torch.randn(V, H)
    with pytest.raises(ValueError, match=r"hidden must be a 3-D tensor \[B, T, H\]"):
        fa.sequence_logprobs(torch.randn(4, H), w, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be \[B, T\] = \(2, 3\)"):
        fa.sequence_logprobs(torch.randn(2, 3, H), w, torch.zeros(2, 4, dtype=torch.long))
