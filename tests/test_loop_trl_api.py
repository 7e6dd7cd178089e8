"""The shared loop's surface as a TRL user writes it: DPOTrainer's constructor names (args=, processing_class=,
callbacks=, peft_config=) and the options it refuses, the callback events and TRL's metric keys they carry, every
config field documented and bad values refused, early stopping, and transformers' own TrainerCallback classes
working unchanged. What a run then does (warmup, evaluation, fp16, trackers, torchrun) is in test_loop.py."""
import builtins
import dataclasses
import json

import pytest

from fastalign.config import CONFIGS, ConfigError, DPOConfig, RewardConfig, SFTConfig, TrainConfig
from fastalign.data import default_model_and_tokenizer
from fastalign.trainer import DPOTrainer, RewardTrainer, SFTTrainer
from fastalign.trainers.callbacks import EarlyStoppingCallback, TrainerCallback, TrainerControl, TrainerState
from tests.loop_cases import EVAL, ROWS, cfg


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
