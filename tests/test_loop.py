"""The shared loop's run as a TRL user meets it: warmup, evaluation strategy, metrics robust to partial keys (and
the demo's reading of them, ties counted as ties), dropout, fp16 and its gradient scaler (checkpointed and
resumed), the wandb and mlflow trackers, local ranks and devices, and the README's torchrun commands. Constructor
names, config fields, callbacks and early stopping are in test_loop_trl_api.py."""
import json
import math

import pytest
import torch

from fastalign.config import ConfigError
from fastalign.data import default_model_and_tokenizer
from fastalign.trainer import DPOTrainer
from fastalign.trainers.reporting import mean_by_key
from tests.backends import free_port
from tests.loop_cases import EVAL, ROWS, cfg


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    model, tok = default_model_and_tokenizer(seed=0)
    with pytest.raises(ConfigError, match="fp16=True needs a CUDA device.*use bf16=True"):
        DPOTrainer(model, args=cfg(tmp=tmp_path, fp16=True), processing_class=tok, train_dataset=ROWS)


def test_warmup_steps_override_warmup_ratio(tmp_path):
    model, tok = default_model_and_tokenizer(seed=0)
    t = DPOTrainer(model, args=cfg(tmp=tmp_path, max_steps=4, warmup_steps=2, warmup_ratio=0.5,
                                   lr_scheduler_type="constant_with_warmup", report_to="none"),
                   processing_class=tok, train_dataset=ROWS)
    lrs = [h["learning_rate"] for h in t.train()]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])  # linear warmup over 2 steps, then constant


@pytest.mark.parametrize("strategy, eval_steps, expected", [("no", 1, []), ("steps", 0, [2, 4]), ("steps", 3, [3]),
                                                            ("epoch", 0, [2, 4]), (None, 0, []), (None, 4, [4])])
def test_eval_strategy(tmp_path, strategy, eval_steps, expected):
    model, tok = default_model_and_tokenizer(seed=0)
    # 8 rows / batch 2 / accumulation 2 = 2 steps per epoch; eval_steps 0 with "steps" means logging_steps (2)
    t = DPOTrainer(model, args=cfg(tmp=tmp_path, max_steps=4, logging_steps=2, gradient_accumulation_steps=2,
                                   per_device_train_batch_size=2, max_length=64, max_prompt_length=48,
                                   eval_strategy=strategy, eval_steps=eval_steps, report_to="none"),
                   processing_class=tok, train_dataset=ROWS[:8], eval_dataset=EVAL[:2])
    assert [h["step"] for h in t.train() if "eval_loss" in h] == expected


def test_metrics_with_keys_in_some_batches_only(tmp_path):
    """Per-group keys exist only in batches that hold the group: micro-step and window means are per key over
    the rows that have it, never a KeyError and never a zero for a missing key."""
    assert mean_by_key([{"a": 1.0, "g": 4.0}, {"a": 3.0}, {"a": 5.0, "h": 1.0}]) == {"a": 3.0, "g": 4.0, "h": 1.0}
    model, tok = default_model_and_tokenizer(seed=0)
    t = DPOTrainer(model, args=cfg(tmp=tmp_path, max_steps=4, logging_steps=2, gradient_accumulation_steps=2,
                                   report_to="none"), processing_class=tok, train_dataset=ROWS)
    real, calls = t._metrics_of, {"n": 0}

    def partial(out):
        calls["n"] += 1
        m = real(out)
        if calls["n"] in (1, 6):  # micro-step 1 of step 1, micro-step 2 of step 3
            m["groups/rare/accuracy"] = float(calls["n"])
        return m
    t._metrics_of = partial
    history = t.train()
    assert [h["step"] for h in history] == [2, 4]
    assert history[0]["groups/rare/accuracy"] == 1.0 and history[1]["groups/rare/accuracy"] == 6.0


def _dropout_llama(seed=0):
    import transformers
    from fastalign.data import byte_tokenizer, tiny_llama_config
    tok = byte_tokenizer()
    c = tiny_llama_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, attention_dropout=0.5)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(c), tok


def _dropout_gpt2(seed=0):
    import transformers
    from fastalign.data import byte_tokenizer
    tok = byte_tokenizer()
    c = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(c), tok


@pytest.mark.parametrize("make", [_dropout_llama, _dropout_gpt2])
def test_disable_dropout_starts_at_ln2(tmp_path, make):
    """Policy = reference at step 1, so the DPO loss is exactly ln 2, unless the policy trains with dropout on
    (GPT-2 started at 2.20 in the issue): disable_dropout=True (the default, as TRL) removes it."""
    losses = {}
    for disable in (True, False):
        model, tok = make()
        t = DPOTrainer(model, args=cfg(tmp=tmp_path / str(disable), max_steps=1, beta=0.5, report_to="none",
                                       disable_dropout=disable), processing_class=tok, train_dataset=ROWS)
        losses[disable] = t.train()[0]["loss"]
    assert losses[True] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(losses[False] - math.log(2)) > 1e-3


def _readme_torchrun_commands():
    import os
    import re
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    return [line.split("#")[0].strip() for b in blocks for line in b.splitlines() if line.startswith("torchrun ")]


TINY_RUN = ["--max-steps", "2", "--logging-steps", "1", "--max-length", "64", "--max-prompt-length", "48",
            "--disable-tqdm", "true", "--eval-steps", "0"]


def _run_cli(argv, out_dir, port=None):
    import glob
    import os
    import subprocess
    # CPU and gloo on any machine (CUDA hidden): with one GPU, rank 1 would ask for cuda:1
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)),
               CUDA_VISIBLE_DEVICES="")
    if port is not None:
        env["PET_MASTER_PORT"] = str(port)  # torchrun's --master-port, without changing the command
    r = subprocess.run(argv + TINY_RUN + ["--output-dir", str(out_dir)], env=env, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, f"{' '.join(argv)} exited {r.returncode}:\n{r.stderr[-3000:]}"
    rows = [json.loads(line) for path in sorted(glob.glob(os.path.join(out_dir, "metrics*.jsonl")))
            for line in open(path)]
    return [r for r in rows if "eval_loss" in r][-1], os.path.join(out_dir, "final")


@pytest.mark.slow
def test_readme_torchrun_commands_end_cleanly_and_match_one_process(tmp_path):
    """The README's torchrun commands (DDP and FSDP, 2 ranks, gloo on CPU), on a tiny run: exit status 0 (every
    rank joins the final evaluation and save), and the final evaluation and saved model equal a single-process
    run with the same global batch (2 x 2 = 4)."""
    import os
    import shlex
    import sys
    import transformers
    commands = _readme_torchrun_commands()
    assert any("--fsdp true" in c for c in commands) and any("--fsdp" not in c for c in commands), commands
    one_metrics, one_model = _run_cli([sys.executable, "-m", "fastalign.cli", "train", "dpo",
                                       "--per-device-train-batch-size", "4"], tmp_path / "one")
    reference = transformers.AutoModelForCausalLM.from_pretrained(one_model, local_files_only=True)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    for i, command in enumerate(commands):
        argv = shlex.split(command)
        argv[0] = torchrun if os.path.exists(torchrun) else argv[0]
        metrics, model_dir = _run_cli(argv + ["--per-device-train-batch-size", "2"], tmp_path / f"run{i}",
                                      port=free_port())
        for k, v in one_metrics.items():
            if k.startswith("eval_"):
                assert metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (command, k)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
        for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=5e-5, msg=f"{command}: {name}")


@pytest.mark.gpu
def test_fp16_trains_with_a_gradient_scaler_on_cuda(tmp_path):
    # backend="torch": the scaler is under test, not the kernels (triton would autotune on the GPU stage)
    model, tok = default_model_and_tokenizer(seed=0)
    t = DPOTrainer(model, args=cfg(tmp=tmp_path / "a", fp16=True, report_to="none", backend="torch"),
                   processing_class=tok, train_dataset=ROWS)
    fp16 = [h["loss"] for h in t.train()]
    assert t.scaler is not None and all(math.isfinite(x) for x in fp16)
    model, tok = default_model_and_tokenizer(seed=0)
    fp32 = [h["loss"] for h in DPOTrainer(model, args=cfg(tmp=tmp_path / "b", report_to="none", backend="torch"),
                                          processing_class=tok, train_dataset=ROWS).train()]
    assert all(abs(a - b) < 0.05 for a, b in zip(fp16, fp32))


class _FakeScaler:
    """Stands in for torch.amp.GradScaler (CUDA-only here): only its state travels through checkpoints."""

    def __init__(self, state=None):
        self.state = state

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = state


def test_fp16_gradient_scaler_state_is_checkpointed_and_resumed(tmp_path):
    """A checkpoint holds the scaler's state (scaler.pt, transformers' name) and resuming loads it: a resumed fp16
    run keeps its learned loss scale instead of starting again from 65536 and skipping steps."""
    import os
    model, tok = default_model_and_tokenizer(seed=0)
    t = DPOTrainer(model, args=cfg(tmp=tmp_path, max_steps=1, report_to="none"), processing_class=tok,
                   train_dataset=ROWS)
    t.train()
    t.scaler = _FakeScaler({"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                            "_growth_tracker": 7})
    path = t.save_checkpoint()
    assert os.path.isfile(os.path.join(path, "scaler.pt"))
    t.scaler = _FakeScaler()
    t._load_checkpoint(path)
    assert t.scaler.state == {"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                              "_growth_tracker": 7}
    t.scaler = None  # an fp32 run never writes one
    assert not os.path.exists(os.path.join(t.save_checkpoint(), "scaler.pt"))


@pytest.mark.gpu
def test_fp16_resume_keeps_the_loss_scale_on_cuda(tmp_path):
    model, tok = default_model_and_tokenizer(seed=0)
    first = DPOTrainer(model, args=cfg(tmp=tmp_path, fp16=True, max_steps=2, save_steps=2, report_to="none",
                                       backend="torch"), processing_class=tok, train_dataset=ROWS)
    first.train()
    model, tok = default_model_and_tokenizer(seed=0)
    resumed = DPOTrainer(model, args=cfg(tmp=tmp_path, fp16=True, max_steps=2, save_steps=2, report_to="none",
                                         backend="torch", overwrite_output_dir=True),
                         processing_class=tok, train_dataset=ROWS)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.scaler.get_scale() == first.scaler.get_scale()


def test_wandb_and_mlflow_receive_every_logged_row(tmp_path, monkeypatch):
    """The trackers' wiring, with stand-in wandb and mlflow modules (neither is a dependency)."""
    import importlib.machinery
    import sys
    import types
    calls = []

    class Run:
        def log(self, d, step):
            calls.append(("wandb", *d.items(), step))

        def finish(self):
            calls.append(("wandb-finish",))
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    wandb.init = lambda **kw: calls.append(("wandb-init", kw["name"])) or Run()
    mlflow = types.ModuleType("mlflow")
    mlflow.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)
    mlflow.start_run = lambda run_name: calls.append(("mlflow-start", run_name))
    mlflow.log_params = lambda p: None
    mlflow.log_metric = lambda k, v, step: calls.append(("mlflow", (k, v), step))
    mlflow.end_run = lambda: calls.append(("mlflow-end",))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    model, tok = default_model_and_tokenizer(seed=0)
    t = DPOTrainer(model, args=cfg(tmp=tmp_path, max_steps=2, report_to=["wandb", "mlflow"], run_name="trial"),
                   processing_class=tok, train_dataset=ROWS)
    t.train()
    assert ("wandb-init", "trial") in calls and ("mlflow-start", "trial") in calls
    for tracker in ("wandb", "mlflow"):
        logged = {(c[1][0], c[2]) for c in calls if c[0] == tracker}
        assert {("loss", 1), ("learning_rate", 1), ("loss", 2), ("rewards/accuracies", 2)} <= logged
    assert calls[-2:] == [("wandb-finish",), ("mlflow-end",)]
    assert (tmp_path / "metrics.jsonl").exists()  # the run's own record is written unless report_to="none"


def test_demo_counts_ties_as_ties_and_reads_both_group_key_forms():
    from fastalign.demo import _behaviours, _group_accuracy, accuracy_with_ties
    acc, ties, margin = accuracy_with_ties([("a", 0.0), ("a", 0.5), ("a", -0.3), ("a", 1e-8)])
    assert (acc, ties) == (0.5, 0.5) and margin == pytest.approx(0.05)  # 1 win, 1 loss, 2 ties
    assert accuracy_with_ties([("a", 0.0)] * 3)[:2] == (0.5, 1.0)  # policy = reference: all tied, not "0.00"
    old, new = {"eval_accuracy/x": 0.75}, {"eval_groups/x/accuracy": 0.75, "eval_groups/x/margin": 1.0}
    assert _behaviours(old) == _behaviours(new) == ["x"] and _group_accuracy(old, "x") == _group_accuracy(new, "x")


def test_more_local_ranks_than_gpus_is_a_clear_error(tmp_path, monkeypatch):
    """torchrun with 2 processes on a 1-GPU machine: a clear error, not set_device(1)'s invalid ordinal."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    model, tok = default_model_and_tokenizer(seed=0)
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=1 but 1 CUDA device\(s\) are visible.*CUDA_VISIBLE_DEVICES="):
        DPOTrainer(model, args=cfg(tmp=tmp_path), processing_class=tok, train_dataset=ROWS)
