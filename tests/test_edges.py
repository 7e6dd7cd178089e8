"""The empty case, defined once: no token, no pair, or all-zero pair weights give loss 0 and zero gradients
(present as zero tensors, never None) on every backend and in every loss; training goes on through a batch
whose weights are all zero. Also: a bias whose dtype differs from the weight's is accepted by every backend."""
import pytest
import torch

import fastalign as fa
from fastalign.losses import (FusedDPOLoss, FusedORPOLoss, FusedSFTLoss, FusedSimPOLoss, sft_loss, weighted_bt_loss,
                              weighted_mean)
from tests.backends import cpu_backends
from tests.reference import reference_linear_logprobs

H, V = 8, 24


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def _assert_zero_grads(*tensors):
    for t in tensors:
        assert t.grad is not None, "gradient missing (None) in the empty case"
        assert t.grad.shape == t.shape and t.grad.dtype == t.dtype
        assert torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("bias", [False, True])
def test_no_tokens_gives_empty_result_and_zero_gradients(backend, bias):
    torch.manual_seed(0)
    h, w = _leaf(0, H), _leaf(V, H)
    b = _leaf(V) if bias else None
    out = fa.linear_logprobs(h, w, torch.zeros(0, dtype=torch.long), b, backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    _assert_zero_grads(h, w, *([b] if bias else []))
    with torch.no_grad():
        assert fa.linear_logprobs(h, w, torch.zeros(0, dtype=torch.long), b, backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", cpu_backends())
def test_every_token_ignored_gives_zeros_and_zero_gradients(backend):
    torch.manual_seed(0)
    h, w, b = _leaf(5, H), _leaf(V, H), _leaf(V)
    out = fa.linear_logprobs(h, w, torch.full((5,), -100), b, backend=backend)
    assert torch.equal(out, torch.zeros(5))
    out.sum().backward()
    _assert_zero_grads(h, w, b)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("make_loss, ref", [
    (lambda be: FusedDPOLoss(beta=0.1, backend=be), True),
    (lambda be: FusedDPOLoss(beta=0.1, rpo_alpha=0.5, backend=be), True),
    (lambda be: FusedDPOLoss(beta=0.1, loss_type="ipo", backend=be), True),
    (lambda be: FusedSimPOLoss(backend=be), False),
    (lambda be: FusedORPOLoss(backend=be), False),
])
def test_preference_losses_on_an_empty_batch(backend, make_loss, ref):
    hidden, weight = _leaf(0, 6, H), _leaf(V, H)
    labels = torch.zeros(0, 6, dtype=torch.long)
    kw = dict(ref_chosen_logps=torch.zeros(0), ref_rejected_logps=torch.zeros(0)) if ref else {}
    out = make_loss(backend)(hidden, weight, labels, **kw)
    assert out.loss.item() == 0.0 and out.losses.shape == (0,)
    if out.nll_loss is not None:
        assert out.nll_loss.item() == 0.0
    out.loss.backward()
    _assert_zero_grads(hidden, weight)


@pytest.mark.parametrize("backend", cpu_backends())
def test_sft_loss_on_an_empty_batch(backend):
    hidden, weight = _leaf(0, 6, H), _leaf(V, H)
    out = FusedSFTLoss(backend=backend)(hidden, weight, torch.zeros(0, 6, dtype=torch.long))
    assert out.loss.item() == 0.0
    out.loss.backward()
    _assert_zero_grads(hidden, weight)
    # a batch whose labels are all ignored is the same empty case
    hidden = _leaf(2, 6, H)
    out = FusedSFTLoss(backend=backend)(hidden, weight, torch.full((2, 6), -100))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0


def test_functional_reductions_follow_the_empty_case():
    losses = torch.tensor([0.5, float("inf"), 2.0], requires_grad=True)
    zero = weighted_mean(losses, torch.zeros(3))
    assert zero.item() == 0.0
    zero.backward()
    assert torch.equal(losses.grad, torch.zeros(3))
    # a weight-0 pair contributes nothing, not even the NaN of 0 * inf
    part = weighted_mean(torch.tensor([1.0, float("inf"), 3.0]), torch.tensor([1.0, 0.0, 3.0]))
    assert part.item() == pytest.approx((1.0 + 9.0) / 4.0)
    empty = torch.zeros(0, requires_grad=True)
    assert weighted_mean(empty).item() == 0.0 and weighted_mean(empty, torch.zeros(0)).item() == 0.0
    assert weighted_bt_loss(torch.zeros(0), torch.zeros(0)).item() == 0.0
    assert sft_loss(torch.zeros(0), torch.zeros(0, dtype=torch.long)).item() == 0.0
    with pytest.raises(ValueError, match="finite and non-negative"):
        weighted_mean(torch.ones(2), torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype, bias_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32),
                                               (torch.float32, torch.bfloat16)])
def test_bias_dtype_may_differ_from_weight(backend, dtype, bias_dtype):
    torch.manual_seed(0)
    n = 7
    h, w = _leaf(n, H, dtype=dtype), _leaf(V, H, dtype=dtype)
    b = torch.randn(V, dtype=bias_dtype).requires_grad_()
    t = torch.randint(0, V, (n,))
    t[2] = -100
    out = fa.linear_logprobs(h, w, t, b, backend=backend)
    ref = reference_linear_logprobs(h, w, t, b)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    g = torch.randn(n)
    out.backward(g)
    ref_grads = torch.autograd.grad(ref, (h, w, b), g.double())
    for got, want in zip((h.grad, w.grad, b.grad), ref_grads):
        assert got.dtype == want.dtype  # each gradient in its own tensor's dtype
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


def test_training_goes_on_through_batches_whose_weights_are_all_zero(tmp_path):
    from fastalign.config import DPOConfig, RewardConfig
    from fastalign.data import DEFAULT_PREFERENCES, default_model_and_tokenizer, load_rows
    from fastalign.trainer import DPOTrainer, RewardTrainer
    rows = [dict(r, weight=0.0) for r in load_rows(DEFAULT_PREFERENCES, "train")[:8]]
    common = dict(learning_rate=1e-2, max_steps=2, per_device_train_batch_size=4, max_length=96,
                  max_prompt_length=64, logging_steps=1, disable_tqdm=True, weight_decay=0.0)
    for kind, trainer_cls, config_cls in (("reward", RewardTrainer, RewardConfig),
                                          ("causal-lm", DPOTrainer, DPOConfig)):
        model, tok = default_model_and_tokenizer(kind, seed=0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        t = trainer_cls(model, tokenizer=tok, train_dataset=rows,
                        config=config_cls(output_dir=str(tmp_path / kind), **common))
        logs = t.train()
        assert [m["loss"] for m in logs] == [0.0, 0.0]
        assert all(m["grad_norm"] == 0.0 for m in logs)
        # zero gradients: AdamW without weight decay leaves every parameter exactly where it was
        for k, v in t.model.state_dict().items():
            assert torch.equal(v, before[k]), k
    # some pairs weighted 0: the others train
    rows[1]["weight"] = rows[6]["weight"] = 2.0
    model, tok = default_model_and_tokenizer("reward", seed=0)
    logs = RewardTrainer(model, tokenizer=tok, train_dataset=rows,
                         config=RewardConfig(output_dir=str(tmp_path / "mixed"), **common)).train()
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in logs)
