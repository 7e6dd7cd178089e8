"""Trainers end to end on the embedded tiny model and data (CPU, a few steps each): every DPO loss type, the reward
and SFT trainers, the fused loss against naive logits DPO, checkpoints and exact resuming, packing, the
precomputed reference, gradient checkpointing, LoRA, DDP and FSDP under torchrun, tensorboard and loss_chunk_rows.
What the trainers accept and refuse as config and data is in test_trainer_inputs.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastalign import checkpoint as ckpt
from fastalign.config import DPOConfig, RewardConfig, SFTConfig
from fastalign.data import default_model_and_tokenizer
from fastalign.trainer import DPOTrainer, RewardTrainer, SFTTrainer
from tests.backends import free_port
from tests.trainer_cases import EVAL, ROWS, cfg, dpo


@pytest.mark.parametrize("loss_type, extra", [("sigmoid", {}), ("robust", {"label_smoothing": 0.1}), ("hinge", {}),
                                              ("ipo", {}), ("sigmoid", {"rpo_alpha": 0.5}), ("simpo", {}),
                                              ("orpo", {})])
def test_dpo_trainer_runs_every_loss_type(tmp_path, loss_type, extra):
    t = dpo(tmp_path, loss_type=loss_type, **extra)
    history = t.train()
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert "rewards/accuracies" in history[-1]
    assert "learning_rate" in history[-1] and "lr" not in history[-1]
    metrics = t.evaluate()
    assert 0.0 <= metrics["eval_rewards/accuracies"] <= 1.0 and any(k.startswith("eval_accuracy/") for k in metrics)
    assert all(k.startswith("eval_") for k in metrics)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[2]["step"] == 3 and "loss" in rows[2]
    assert rows[-1]["step"] == 3 and rows[-1]["eval_loss"] == metrics["eval_loss"]  # the evaluation is logged


def test_reward_and_sft_trainers_run(tmp_path):
    m, tok = default_model_and_tokenizer("reward", seed=0)
    rows = [dict(r, weight=0.5 if i % 3 else 1.0) for i, r in enumerate(ROWS)]  # the weighted MLE path
    t = RewardTrainer(m, tokenizer=tok, train_dataset=rows, eval_dataset=EVAL,
                      config=cfg(RewardConfig, tmp_path / "rm"))
    history = t.train()
    assert len(history) == 3 and history[-1]["loss"] > 0
    metrics = t.evaluate()
    assert 0 <= metrics["eval_rewards/accuracies"] <= 1 and any(k.startswith("eval_accuracy/") for k in metrics)
    scores_moved = [h["rewards/margins"] for h in history if "loss" in h]  # not the eval row evaluate() logged
    assert scores_moved[-1] != scores_moved[0]
    m, tok = default_model_and_tokenizer(seed=0)
    t = SFTTrainer(m, tokenizer=tok, train_dataset=ROWS, config=cfg(SFTConfig, tmp_path / "sft", max_steps=8))
    losses = [h["loss"] for h in t.train()]
    assert losses[-1] < losses[0]


def _naive_dpo_loss(policy, ref, batch, beta):
    """Logits-based DPO exactly as a user would write it from the full models."""
    def seq_logps(model):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].double()
        labels = batch.labels[:, 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return torch.where(labels != -100, lp, 0).sum(-1)
    pol = seq_logps(policy)
    with torch.no_grad():
        r = seq_logps(ref)
    b = pol.shape[0] // 2
    h = (pol[:b] - r[:b]) - (pol[b:] - r[b:])
    return -torch.nn.functional.logsigmoid(beta * h).mean()


def test_fused_trainer_loss_equals_naive_logits_dpo(tmp_path):
    t = dpo(tmp_path)
    with torch.no_grad():  # make policy and reference differ
        for p in t.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = t._collate(t.train_examples[:4])
    out = t.step_module(batch, t._extra(batch))
    out.loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in t.model.named_parameters()}
    t.model.zero_grad()
    naive = _naive_dpo_loss(t.model, t.ref_model, batch, 0.5)
    naive.backward()
    assert abs(out.loss.item() - naive.item()) < 1e-5
    for n, p in t.model.named_parameters():
        torch.testing.assert_close(fused_grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("precompute", [False, True])
def test_resume_continues_exactly(tmp_path, precompute):
    """Also with precomputed reference log-probs: the reference must stay the initial model's, not the
    checkpoint's trained weights."""
    a = dpo(tmp_path / "a", max_steps=6, save_steps=3, precompute_ref_log_probs=precompute)
    full = [h["loss"] for h in a.train()]
    assert os.path.isdir(tmp_path / "a" / "checkpoint-3") and os.path.isdir(tmp_path / "a" / "checkpoint-6")
    b = dpo(tmp_path / "b", max_steps=6, precompute_ref_log_probs=precompute)
    resumed = [h["loss"] for h in b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))]
    assert len(resumed) == 3
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[3:]), rtol=0, atol=1e-6)
    for (_, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    t = dpo(tmp_path, max_steps=2, save_steps=1)
    calls = {"n": 0}
    real = t._checkpoint_payload

    def flaky(tmp, full=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save dies half-way, after the model is written
            t.model.save_pretrained(tmp, safe_serialization=True)
            raise KeyboardInterrupt("simulated kill during save")
        real(tmp, full)
    monkeypatch.setattr(t, "_checkpoint_payload", flaky)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("checkpoint-1")
    assert not any(n.startswith(".tmp-") for n in os.listdir(tmp_path))  # partial folder cleaned up
    assert not os.path.exists(tmp_path / "checkpoint-2")
    fresh = dpo(tmp_path / "r", max_steps=2)
    fresh.train(resume_from_checkpoint=ckpt.latest_checkpoint(str(tmp_path)))  # loadable
    assert fresh.global_step == 2


def test_resume_refuses_a_different_reference(tmp_path):
    a = dpo(tmp_path / "a", max_steps=2, save_steps=2, precompute_ref_log_probs=True)
    a.train()
    m, _ = default_model_and_tokenizer(seed=5)  # another initial model: another reference
    b = dpo(tmp_path / "b", model=m, max_steps=4, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="reference log-probs were computed from another model"):
        b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    with pytest.raises(RuntimeError, match=r"needs train\(\) to have started"):
        dpo(tmp_path / "c").save_checkpoint()


def test_save_total_limit_and_save_model(tmp_path):
    t = dpo(tmp_path, max_steps=4, save_steps=1, save_total_limit=2)
    t.train()
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [3, 4]
    out = t.save_model()
    import transformers
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert len(tok) == reloaded.config.vocab_size
    torch.testing.assert_close(reloaded.lm_head.weight, t.model.lm_head.weight)


def test_disable_tqdm_also_quiets_transformers_save_bars(tmp_path, capfd):
    """save_pretrained's own "Writing model shards" bar follows disable_tqdm, and the global setting is restored."""
    from transformers.utils import logging as hf_logging
    t = dpo(tmp_path, max_steps=1, save_steps=1)
    t.train()
    t.save_model()
    assert "Writing model shards" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()


def test_padding_free_equals_padded_and_isolates_sequences(tmp_path):
    padded = dpo(tmp_path / "p")
    packed = dpo(tmp_path / "f", padding_free=True)
    examples = padded.train_examples[:4]
    bp = padded._collate(examples)
    with pytest.warns(UserWarning, match="padding_free=True without flash-attn's varlen attention.*block-diagonal"):
        bf = packed._collate(examples)
    assert bf.input_ids.shape[0] == 1 and bf.attention_mask.dim() == 4
    lp = padded.step_module(bp, padded._extra(bp))
    lf = packed.step_module(bf, packed._extra(bf))
    torch.testing.assert_close(lf.loss, lp.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lf.chosen_logps, lp.chosen_logps, rtol=1e-5, atol=1e-4)
    # no token of one sequence attends to another: each packed sequence's hidden states equal its own run
    hidden_packed, _ = packed._hidden(packed.model, bf)
    seq = bf.sequence_index[0]
    for k in range(bf.n_sequences):
        ids = bf.input_ids[0, seq == k][None]
        alone = packed.model.model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(hidden_packed[0, seq == k], alone[0], rtol=1e-4, atol=1e-5)


def test_packed_training_matches_padded(tmp_path):
    a = [h["loss"] for h in dpo(tmp_path / "p").train()]
    b = [h["loss"] for h in dpo(tmp_path / "f", padding_free=True).train()]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)


def test_precomputed_reference_matches_frozen_copy_and_is_cached(tmp_path):
    a = [h["loss"] for h in dpo(tmp_path / "a").train()]
    t = dpo(tmp_path / "b", precompute_ref_log_probs=True)
    assert t.ref_model is None  # no reference model is held while training
    b = [h["loss"] for h in t.train()]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    files = os.listdir(tmp_path / "b" / "ref_cache")
    assert len(files) == 1 and files[0].endswith(".safetensors")
    t2 = dpo(tmp_path / "b", precompute_ref_log_probs=True)
    t2._before_training()
    assert os.listdir(tmp_path / "b" / "ref_cache") == files and t2.ref_cache is not None


def test_gradient_checkpointing_and_bf16_run(tmp_path):
    a = [h["loss"] for h in dpo(tmp_path / "a").train()]
    b = [h["loss"] for h in dpo(tmp_path / "b", gradient_checkpointing=True).train()]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    c = [h["loss"] for h in dpo(tmp_path / "c", bf16=True).train()]
    assert all(abs(x - y) < 0.05 for x, y in zip(a, c))


def test_lora_uses_disabled_adapters_as_reference_and_skips_frozen_head(tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = default_model_and_tokenizer(seed=0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    t = DPOTrainer(model, tokenizer=tok, train_dataset=ROWS, config=cfg(tmp=tmp_path, max_steps=4, learning_rate=5e-3))
    assert t.ref_model is None
    assert not model.get_base_model().lm_head.weight.requires_grad
    history = t.train()
    assert history[-1]["rewards/margins"] != 0.0  # the adapters moved away from the disabled-adapter reference
    batch = t._collate(t.train_examples[:4])
    with model.disable_adapter():
        out = t.step_module(batch, t._extra(batch))
    # fp32 rounding only: the policy's and the reference's log-probs come from different passes (with and without
    # gradients), whose GEMMs may round differently (1.5e-5 on a 2-core AMD EPYC's MKL); the trained adapters' own
    # rewards are far above this bound (0.06-0.12 on the same batch)
    torch.testing.assert_close(out.chosen_rewards, torch.zeros_like(out.chosen_rewards), atol=1e-4, rtol=0)
    assert t.step_module(batch, t._extra(batch)).chosen_rewards.abs().min() > 1e-2
    path = t.save_checkpoint()
    assert os.path.isfile(os.path.join(path, "adapter_model.safetensors"))
    # resuming loads the adapters back into a fresh LoRA model: same rewards on the same batch
    m2, _ = default_model_and_tokenizer(seed=0)
    m2 = peft.get_peft_model(m2, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ckpt.load_model_weights(m2, path)
    t2 = DPOTrainer(m2, tokenizer=tok, train_dataset=ROWS, config=cfg(tmp=tmp_path / "2"))
    out2 = t2.step_module(batch, t2._extra(batch))
    out1 = t.step_module(batch, t._extra(batch))
    torch.testing.assert_close(out2.chosen_rewards, out1.chosen_rewards, rtol=1e-5, atol=1e-6)


def _torchrun(tmp_path, name, *args, nproc=2, cuda=False):
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    if not cuda:  # CPU and gloo on any machine: with one GPU, rank 1 would ask for cuda:1
        env["CUDA_VISIBLE_DEVICES"] = ""
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, worker] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
         worker]
    r = subprocess.run(cmd + [str(out), "4", str(tmp_path / name), *args], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_ddp_and_fsdp_two_processes_equal_single_process(tmp_path):
    """torchrun --nproc_per_node=2 on gloo, same global batch: DDP and FSDP2 give the single-process losses,
    and the full model FSDP2 saves (gathered from shards) equals the single-process one."""
    import transformers
    one = _torchrun(tmp_path, "one", nproc=1)
    ddp = _torchrun(tmp_path, "ddp", "ddp")
    fsdp = _torchrun(tmp_path, "fsdp", "fsdp")
    assert one["world"] == 1 and ddp["world"] == 2 and fsdp["world"] == 2
    for run in (ddp, fsdp):
        torch.testing.assert_close(torch.tensor(run["loss"]), torch.tensor(one["loss"]), rtol=1e-5, atol=1e-6)
    a = transformers.AutoModelForCausalLM.from_pretrained(one["final"], local_files_only=True)
    b = transformers.AutoModelForCausalLM.from_pretrained(fsdp["final"], local_files_only=True)
    # after 4 Adam steps, reduction order (reduce-scatter vs one process) moves weights by ~1e-5 (seen: 1.1e-5)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=5e-5, msg=na)
    # an FSDP2 checkpoint resumes (sharded again on load) and continues exactly
    resumed = _torchrun(tmp_path, "fsdp_resumed", "fsdp", str(tmp_path / "fsdp" / "checkpoint-2"))
    torch.testing.assert_close(torch.tensor(resumed["loss"]), torch.tensor(one["loss"][2:]), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu(count=2)
def test_ddp_on_two_gpus_equals_one_gpu(tmp_path):
    """nccl on 2 GPUs, same global batch: the 1-GPU losses (triton's atomic backward is not bitwise
    reproducible, hence the tolerance). Skips with fewer than 2 GPUs."""
    one = _torchrun(tmp_path, "one", nproc=1, cuda=True)
    ddp = _torchrun(tmp_path, "ddp", "ddp", cuda=True)
    assert one["world"] == 1 and ddp["world"] == 2
    torch.testing.assert_close(torch.tensor(ddp["loss"]), torch.tensor(one["loss"]), rtol=1e-4, atol=1e-5)


def test_public_names_and_tensorboard_option(tmp_path):
    import fastalign as fa
    assert fa.DPOTrainer is DPOTrainer and fa.DPOConfig is DPOConfig and fa.SFTTrainer is SFTTrainer
    t = dpo(tmp_path, max_steps=2, report_to=["jsonl", "tensorboard"])
    try:
        import torch.utils.tensorboard  # noqa: F401
        t.train()
        assert os.path.isdir(tmp_path / "tensorboard") and os.listdir(tmp_path / "tensorboard")
    except ImportError:
        with pytest.warns(UserWarning, match="tensorboard is not installed"):
            t.train()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_reward_and_sft_packed_equal_padded(tmp_path):
    m, tok = default_model_and_tokenizer("reward", seed=0)
    rm_pad = RewardTrainer(m, tokenizer=tok, train_dataset=ROWS, config=cfg(RewardConfig, tmp_path / "a"))
    rm_pack = RewardTrainer(m, tokenizer=tok, train_dataset=ROWS, config=cfg(RewardConfig, tmp_path / "b",
                                                                                padding_free=True))
    ex = rm_pad.train_examples[:4]
    a = rm_pad.step_module(rm_pad._collate(ex), None)
    b = rm_pack.step_module(rm_pack._collate(ex), None)
    torch.testing.assert_close(b.chosen_rewards, a.chosen_rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    m, tok = default_model_and_tokenizer(seed=0)
    sft_pad = SFTTrainer(m, tokenizer=tok, train_dataset=ROWS, config=cfg(SFTConfig, tmp_path / "c"))
    sft_pack = SFTTrainer(m, tokenizer=tok, train_dataset=ROWS, config=cfg(SFTConfig, tmp_path / "d",
                                                                           padding_free=True))
    ex = sft_pad.train_examples[:5]
    torch.testing.assert_close(sft_pack.step_module(sft_pack._collate(ex), None).loss,
                               sft_pad.step_module(sft_pad._collate(ex), None).loss, rtol=1e-5, atol=1e-6)


def test_loss_chunk_rows_reaches_the_loss_and_changes_nothing_but_chunking(tmp_path):
    """loss_chunk_rows (the gradient-in-forward loss's chunk size) reaches the loss module; a tiny chunk gives the
    same first-step loss as the default (the chunks hold whole pairs either way)."""
    small = dpo(tmp_path / "small", grad_in_forward="on", loss_chunk_rows=8, max_steps=1)
    default = dpo(tmp_path / "default", grad_in_forward="on", max_steps=1)
    small._setup()
    default._setup()
    assert small.loss_module.chunk_rows == 8 and default.loss_module.chunk_rows is None
    a, b = small.train()[0]["loss"], default.train()[0]["loss"]
    assert abs(a - b) < 1e-5, (a, b)
