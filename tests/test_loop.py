"""The shared loop as a TRL user meets it: constructor names, config fields and their metadata, callbacks and
early stopping, TRL metric keys, warmup, evaluation strategy, dropout, and metrics robust to partial keys."""
import builtins
import dataclasses
import json
import math

import pytest
import torch

from fastalign.config import CONFIGS, ConfigError, DPOConfig, RewardConfig, SFTConfig, TrainConfig
from fastalign.data import DEFAULT_PREFERENCES, default_model_and_tokenizer, load_rows
from fastalign.trainer import DPOTrainer, RewardTrainer, SFTTrainer
from fastalign.trainers.callbacks import EarlyStoppingCallback, TrainerCallback, TrainerControl, TrainerState
from fastalign.trainers.reporting import mean_by_key
from tests.backends import free_port

ROWS = load_rows(DEFAULT_PREFERENCES, "train")[:16]
EVAL = load_rows(DEFAULT_PREFERENCES, "test")[:8]


def cfg(cls=DPOConfig, tmp=None, **kw):
    base = dict(output_dir=str(tmp or "runs/test"), learning_rate=1e-3, max_steps=3, per_device_train_batch_size=4,
                max_length=96, max_prompt_length=64, logging_steps=1, disable_tqdm=True, seed=1)
    base.update(kw)
    return cls(**base)


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, args, state, control, **kw):
        self.events.append(("train_begin", state.global_step))

    def on_step_end(self, args, state, control, **kw):
        self.events.append(("step_end", state.global_step))

    def on_log(self, args, state, control, logs=None, **kw):
        self.events.append(("log", state.global_step, dict(logs)))

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.events.append(("evaluate", state.global_step, dict(metrics)))

    def on_save(self, args, state, control, **kw):
        self.events.append(("save", state.global_step))

    def on_train_end(self, args, state, control, **kw):
        self.events.append(("train_end", state.global_step))


def test_trl_constructor_names_and_callback_events(tmp_path):
    """DPOTrainer(model, ref_model=None, args=..., train_dataset=, eval_dataset=, processing_class=, callbacks=)."""
    model, tok = default_model_and_tokenizer(seed=0)
    rec = Recorder()
    t = DPOTrainer(model, ref_model=None, args=cfg(tmp=tmp_path, eval_strategy="steps", eval_steps=2, save_steps=2),
                   train_dataset=ROWS, eval_dataset=EVAL, processing_class=tok, callbacks=[rec])
    assert t.tokenizer is tok and t.config.eval_steps == 2
    history = t.train()
    kinds = [e[0] for e in rec.events]
    # saves at step 2 (save_steps) and at the last step (save_strategy="steps" always leaves the final state)
    assert kinds == ["train_begin", "step_end", "log", "step_end", "log", "log", "evaluate", "save", "step_end", "log",
                     "save", "train_end"]
    logs = [e[2] for e in rec.events if e[0] == "log"]
    assert logs[0]["step"] == 1 and "learning_rate" in logs[0] and "lr" not in logs[0]
    for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "epoch", "step"):
        assert key in logs[0], key
    ev = next(e for e in rec.events if e[0] == "evaluate")
    assert ev[1] == 2 and all(k.startswith("eval_") for k in ev[2]) and "eval_loss" in ev[2]
    # the eval row is also a logged row (metrics file, history), with its step
    assert [h for h in history if "eval_loss" in h][0]["step"] == 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in rows) and not any(k.startswith("eval/") for r in rows for k in r)


def test_both_names_for_one_thing_and_unsupported_trl_options_are_errors(tmp_path):
    model, tok = default_model_and_tokenizer(seed=0)
    with pytest.raises(TypeError, match="as args= \\(TRL\\) or config=, not both"):
        DPOTrainer(model, args=cfg(tmp=tmp_path), config=cfg(tmp=tmp_path), processing_class=tok, train_dataset=ROWS)
    with pytest.raises(TypeError, match="processing_class= \\(TRL\\) or tokenizer=, not both"):
        DPOTrainer(model, args=cfg(tmp=tmp_path), processing_class=tok, tokenizer=tok, train_dataset=ROWS)
    with pytest.raises(NotImplementedError, match="data_collator is not supported"):
        DPOTrainer(model, args=cfg(tmp=tmp_path), processing_class=tok, train_dataset=ROWS, data_collator=lambda b: b)
    with pytest.raises(ValueError, match="a tokenizer is required"):
        DPOTrainer(model, args=cfg(tmp=tmp_path), train_dataset=ROWS)
    # RewardTrainer and SFTTrainer take TRL's names too (and keep tokenizer=/config=)
    rm, _ = default_model_and_tokenizer("reward", seed=0)
    RewardTrainer(rm, args=cfg(RewardConfig, tmp_path / "rm"), train_dataset=ROWS, processing_class=tok)
    RewardTrainer(rm, config=cfg(RewardConfig, tmp_path / "rm"), train_dataset=ROWS, tokenizer=tok)
    SFTTrainer(model, args=cfg(SFTConfig, tmp_path / "sft"), train_dataset=ROWS, processing_class=tok)
    with pytest.raises(NotImplementedError, match="formatting_func is not supported"):
        SFTTrainer(model, args=cfg(SFTConfig, tmp_path / "sft"), train_dataset=ROWS, processing_class=tok,
                   formatting_func=str)


def test_peft_config_wraps_the_model(tmp_path, monkeypatch):
    model, tok = default_model_and_tokenizer(seed=0)
    real_import = builtins.__import__

    def no_peft(name, *a, **kw):
        if name == "peft":
            raise ImportError("no peft here")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(ImportError, match="peft_config was given but peft is not installed: pip install peft"):
        DPOTrainer(model, args=cfg(tmp=tmp_path), processing_class=tok, train_dataset=ROWS, peft_config=object())
    monkeypatch.undo()
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    t = DPOTrainer(model, args=cfg(tmp=tmp_path, max_steps=2), processing_class=tok, train_dataset=ROWS,
                   peft_config=lora)
    assert isinstance(t.model, peft.PeftModel) and t.ref_model is None  # reference: the adapters disabled
    assert len(t.train()) == 2
    with pytest.raises(ValueError, match="already a peft model"):
        DPOTrainer(t.model, args=cfg(tmp=tmp_path), processing_class=tok, train_dataset=ROWS, peft_config=lora)


@pytest.mark.parametrize("cls", [DPOConfig, RewardConfig, SFTConfig])
def test_every_config_field_is_documented(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
        if "choices" in f.metadata:
            assert f.default is None or f.default in f.metadata["choices"] or f.name == "report_to", f.name
    assert dataclasses.fields(DPOConfig)[0].name == "output_dir" and set(CONFIGS) == {"dpo", "rm", "sft"}


@pytest.mark.parametrize("kw, match", [
    ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
    ({"max_completion_length": 0}, "max_completion_length must be an integer >= 1"),
    ({"truncation_mode": "middle"}, "unknown truncation_mode 'middle'; valid: keep_start, keep_end"),
    ({"eval_strategy": "often"}, "unknown eval_strategy 'often'; valid: no, steps, epoch"),
    ({"bf16": True, "fp16": True}, "bf16 and fp16 are both true"),
    ({"report_to": "neptune"}, "unknown report_to"),
])
def test_bad_new_fields(kw, match):
    with pytest.raises(ConfigError, match=match):
        cfg(**kw)


def test_trackers_that_are_not_installed_are_refused(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "mlflow")
                        else real(name, *a))
    for tracker in ("wandb", "mlflow"):
        with pytest.raises(ConfigError, match=f"report_to includes '{tracker}' but {tracker} is not installed"):
            TrainConfig(report_to=["jsonl", tracker])


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


def test_early_stopping_on_an_eval_metric(tmp_path):
    model, tok = default_model_and_tokenizer(seed=0)
    # no evaluation improves on the first by more than the threshold: patience 2 stops after the third one
    stop = EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=100.0)
    t = DPOTrainer(model, args=cfg(tmp=tmp_path, max_steps=10, eval_strategy="steps", eval_steps=1,
                                   metric_for_best_model="loss", report_to="none"),
                   processing_class=tok, train_dataset=ROWS, eval_dataset=EVAL[:4], callbacks=[stop])
    t.train()
    assert t.global_step == 3 and t.state.best_metric is not None


def test_early_stopping_rule():
    cb = EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=0.01)
    args = TrainConfig(metric_for_best_model="eval_rewards/accuracies")
    state, control = TrainerState(), TrainerControl()
    for value, stops in [(0.5, False), (0.505, False), (0.6, False), (0.6, False), (0.605, True)]:
        cb.on_evaluate(args, state, control, metrics={"eval_rewards/accuracies": value, "eval_loss": 1.0})
        assert control.should_training_stop is stops, value
    assert state.best_metric == 0.6
    lower = EarlyStoppingCallback(early_stopping_patience=1)  # eval_loss by default: lower is better
    state, control = TrainerState(), TrainerControl()
    for value, stops in [(1.0, False), (0.9, False), (0.95, True)]:
        lower.on_evaluate(TrainConfig(), state, control, metrics={"eval_loss": value})
        assert control.should_training_stop is stops
    with pytest.raises(KeyError, match="'eval_nope' is not among the evaluation metrics: eval_loss"):
        EarlyStoppingCallback(metric_for_best_model="eval_nope").on_evaluate(
            TrainConfig(), TrainerState(), TrainerControl(), metrics={"eval_loss": 1.0})


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
    import sys
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


def test_a_transformers_trainer_callback_works_unchanged():
    """A transformers TrainerCallback (a class, instantiated as transformers does) receives fastalign's events."""
    import transformers
    from fastalign.trainers.callbacks import CallbackHandler
    seen = []

    class Stopper(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(logs["loss"])
            control.should_training_stop = logs["loss"] < 0.5
            return control
    handler = CallbackHandler([Stopper])
    control = handler.call("on_log", TrainConfig(), TrainerState(), TrainerControl(), logs={"loss": 0.7})
    assert not control.should_training_stop
    control = handler.call("on_log", TrainConfig(), TrainerState(), control, logs={"loss": 0.4})
    assert control.should_training_stop and seen == [0.7, 0.4]
    handler.call("on_save", TrainConfig(), TrainerState(), control)  # an event it does not override
    with pytest.raises(TypeError, match="has none of the events"):
        CallbackHandler([object()])


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
