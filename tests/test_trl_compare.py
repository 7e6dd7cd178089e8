"""Side by side with TRL's DPOTrainer (optional: skipped when trl is not installed; trl is not a dependency).

The same tiny model, reference and batch (TRL's own tokenization and collation): fastalign's fused DPO loss,
log-probs and gradients equal TRL's logits-based ones. Run with ``pip install trl==1.16.0`` (checked with 1.16.0).
TRL's config turns bf16 on by default, and its accelerator then runs the reference's forward under bf16 autocast
(3e-4 apart in the loss here): the comparison is in fp32 (bf16=False).
"""
import copy

import pytest
import torch

import fastalign as fa
from fastalign.data import DEFAULT_PREFERENCES, default_model_and_tokenizer, load_rows
from fastalign.integrations import head_inputs

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_fused_dpo_equals_trl_dpo_trainer(tmp_path, loss_type):
    torch.manual_seed(0)
    model, tok = default_model_and_tokenizer(seed=0)
    ref = copy.deepcopy(model)
    with torch.no_grad():  # a reference that differs from the policy, so the loss is not ln 2
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_rows(DEFAULT_PREFERENCES, "train")[:4]]
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, beta=0.5, loss_type=[loss_type],
                         max_length=128, report_to="none", use_cpu=True, disable_dropout=True, seed=0, bf16=False)
    trainer = trl.DPOTrainer(model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trl_logps = trainer._metrics["train"]["logps/chosen"][-1], trainer._metrics["train"]["logps/rejected"][-1]
    trainer.model.zero_grad()

    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    pol = head_inputs(trainer.model, inputs["input_ids"], inputs["attention_mask"], labels=labels)
    with torch.no_grad():
        r = head_inputs(ref, inputs["input_ids"], inputs["attention_mask"], labels=labels)
    out = fa.FusedDPOLoss(beta=0.5, loss_type=loss_type, **pol.loss_kwargs())(
        pol.hidden, pol.weight, pol.labels, ref_hidden=r.hidden, ref_weight=r.weight)
    out.loss.backward()
    assert abs(out.loss.item() - trl_loss.item()) < 5e-6, (out.loss.item(), trl_loss.item())
    assert out.chosen_logps.mean().item() == pytest.approx(trl_logps[0], abs=5e-5)
    assert out.rejected_logps.mean().item() == pytest.approx(trl_logps[1], abs=5e-5)
    for n, p in trainer.model.named_parameters():
        if n in trl_grads:
            torch.testing.assert_close(p.grad, trl_grads[n], rtol=1e-4, atol=5e-6, msg=n)
