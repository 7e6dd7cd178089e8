"""What the trainers accept and refuse as input: config values (a bad one is a ConfigError naming it, an unknown
option lists the valid ones), dataset rows (malformed rows reported with their indices, too few rows, SFT
messages, chat-template conversations, a Hugging Face dataset, truncation that keeps the answer), and
`fastalign train` with a YAML config and bad flags."""
import os
import subprocess
import sys

import pytest
import torch

from fastalign.config import ConfigError, DPOConfig, SFTConfig
from fastalign.data import DataError, default_model_and_tokenizer
from fastalign.trainer import DPOTrainer, SFTTrainer
from tests.trainer_cases import ROWS, cfg, dpo


@pytest.mark.parametrize("kw, match", [
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be an integer >= 1, got 0"),
    ({"beta": 0}, "beta must be > 0"),
    ({"beta": -0.1}, "beta must be > 0"),
    ({"loss_type": "kto"}, "unknown loss_type 'kto'; valid: sigmoid, robust, hinge, ipo, simpo, orpo"),
    ({"learning_rate": 0}, "learning_rate must be > 0"),
    ({"max_prompt_length": 200}, r"max_prompt_length \(200\) must be < max_length \(96\)"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer >= 1"),
    ({"lr_scheduler_type": "exp"}, "unknown lr_scheduler_type 'exp'"),
    ({"report_to": "neptune"}, "unknown report_to"),
    ({"label_smoothing": 0.1, "loss_type": "hinge"}, "label_smoothing has no meaning"),
    ({"max_steps": 0}, "max_steps must be a positive number"),
    ({"loss_chunk_rows": 0}, "loss_chunk_rows must be an integer >= 1, got 0"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ConfigError, match=match):
        cfg(**kw)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown option.*betta.*valid:.*beta"):
        DPOConfig.from_dict({"betta": 0.1})


def test_malformed_rows_reported_with_indices(tmp_path):
    rows = [dict(r) for r in ROWS[:6]]
    del rows[1]["chosen"]
    rows[3]["rejected"] = "   "
    rows[4]["rejected"] = rows[4]["chosen"]
    rows[5]["weight"] = -1
    with pytest.raises(DataError) as err:
        dpo(tmp_path, rows=rows)
    msg = str(err.value)
    for expected in ("row 1: field 'chosen': missing", "row 3: field 'rejected': empty answer",
                     "row 4: field 'rejected': identical to 'chosen'",
                     "row 5: field 'weight': expected a finite number >= 0, got -1",
                     "train_dataset: 4 malformed row(s)"):
        assert expected in msg


def test_sft_on_messages_masks_everything_but_the_last_assistant_turn(tmp_path):
    m, tok = default_model_and_tokenizer(seed=0)
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["chosen"].strip()}]} for r in ROWS[:8]]
    t = SFTTrainer(m, tokenizer=tok, train_dataset=rows,
                   config=cfg(SFTConfig, tmp_path, max_steps=2, max_length=192, max_prompt_length=128))
    e = t.train_examples[0]
    answer = [x for x in e["labels"] if x != -100]
    assert tok.decode(answer[:-1]).strip() == rows[0]["messages"][-1]["content"] and answer[-1] == tok.eos_token_id
    assert len(t.train()) == 2
    with pytest.raises(DataError, match="row 0: field 'messages': has no assistant message"):
        SFTTrainer(m, tokenizer=tok, train_dataset=[{"messages": [{"role": "user", "content": "hi"}]}] * 8,
                   config=cfg(SFTConfig, tmp_path))


def test_hugging_face_datasets_input(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    t = dpo(tmp_path, rows=ds, max_steps=2)
    assert len(t.train_examples) == len(ROWS) and len(t.train()) == 2


def test_too_little_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        dpo(tmp_path, rows=ROWS[:2])


def test_conversational_rows_use_the_chat_template(tmp_path):
    m, tok = default_model_and_tokenizer(seed=0)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in ROWS[:8]]
    t = DPOTrainer(m, tokenizer=tok, train_dataset=rows,
                   config=cfg(tmp=tmp_path, max_steps=1, max_length=192, max_prompt_length=128))
    e = t.train_examples[0]
    prompt_len = sum(1 for x in e["chosen_labels"] if x == -100)
    text = tok.decode(e["chosen_ids"][:prompt_len])
    assert text.startswith("<user>Would you say") and text.endswith("<assistant>")
    assert t.train()[0]["loss"] > 0


def test_truncation_keeps_the_answer(tmp_path):
    rows = [dict(r, prompt="x" * 500 + r["prompt"]) for r in ROWS[:8]]
    t = dpo(tmp_path, rows=rows, max_steps=1)
    for e in t.train_examples:
        assert len(e["chosen_ids"]) <= 96
        answer = [x for x in e["chosen_labels"] if x != -100]
        assert len(answer) == len(t.tokenizer(rows[e["index"]]["chosen"], add_special_tokens=False)["input_ids"]) + 1


def test_cli_train_with_yaml_config(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("max_steps: 2\nlogging_steps: 1\nper_device_train_batch_size: 4\ndisable_tqdm: true\n")
    out = subprocess.run([sys.executable, "-m", "fastalign.cli", "train", "dpo", "--config", str(conf),
                          "--output-dir", str(tmp_path / "run"), "--beta", "0.3"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert os.path.isdir(tmp_path / "run" / "final") and "| eval metric | value |" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "fastalign.cli", "train", "dpo", "--beta", "0",
                          "--output-dir", str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode == 2 and "beta must be > 0" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "fastalign.cli", "train", "sft", "--model", "org/some-hub-model"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "never downloads" in missing.stderr


def test_trl_spellings_of_config_values_are_accepted():
    """TRL / transformers users write report_to=None, loss_type=["sigmoid"] (TRL 1.x), and YAML files with 1e-3 (which
    PyYAML reads as text); each means what it means there, or is refused with the reason."""
    assert DPOConfig(report_to=None).reports == ["jsonl"]
    assert DPOConfig(loss_type=["ipo"]).loss_type == "ipo"
    with pytest.raises(ConfigError, match=r"loss_type \['sigmoid', 'ipo'\]: fastalign trains one preference loss"):
        DPOConfig(loss_type=["sigmoid", "ipo"])
    with pytest.raises(ConfigError, match=r"is RPO: here loss_type='sigmoid', rpo_alpha=a"):
        DPOConfig(loss_type=["sigmoid", "sft"])
    import yaml
    cfg = DPOConfig.from_dict(yaml.safe_load("learning_rate: 1e-3\nbeta: 5e-2\nmax_grad_norm: 1e0\n"))
    assert (cfg.learning_rate, cfg.beta, cfg.max_grad_norm) == (1e-3, 5e-2, 1.0)
    with pytest.raises(ConfigError, match="learning_rate must be a number, got 'fast'"):
        DPOConfig.from_dict({"learning_rate": "fast"})


def test_a_model_given_as_a_local_folder_is_loaded_as_trl_loads_a_model_name(tmp_path):
    from fastalign.data import default_model_and_tokenizer
    from fastalign.trainer import RewardTrainer
    from fastalign.config import RewardConfig
    for kind, folder in (("causal-lm", tmp_path / "lm"), ("reward", tmp_path / "rm")):
        model, tok = default_model_and_tokenizer(kind)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    t = DPOTrainer(str(tmp_path / "lm"), ref_model=tmp_path / "lm", train_dataset=ROWS,
                   args=cfg(output_dir=str(tmp_path / "dpo"), max_steps=1))  # the folder's tokenizer too
    assert type(t.model).__name__ == "LlamaForCausalLM" and type(t.ref_model).__name__ == "LlamaForCausalLM"
    assert t.tokenizer is not None and len(t.train()) >= 1
    r = RewardTrainer(str(tmp_path / "rm"), train_dataset=ROWS,
                      args=RewardConfig(output_dir=str(tmp_path / "rmrun"), max_steps=1, per_device_train_batch_size=4,
                                        max_length=64, disable_tqdm=True))
    assert type(r.model).__name__ == "LlamaForSequenceClassification"
    with pytest.raises(FileNotFoundError, match=r"DPOTrainer: model='meta-llama/Llama-3' is not a local folder.*"
                                                r"never downloads"):
        DPOTrainer("meta-llama/Llama-3", train_dataset=ROWS, args=cfg(output_dir=str(tmp_path / "x")))
    with pytest.raises(TypeError, match="DPOTrainer: model must be a transformers model .* got int"):
        DPOTrainer(3, processing_class=t.tokenizer, train_dataset=ROWS, args=cfg(output_dir=str(tmp_path / "y")))


def test_reward_data_margin_column_reaches_the_loss_and_bad_margins_are_refused(tmp_path):
    """TRL's RewardTrainer subtracts a row's ``margin`` inside the sigmoid; it used to be silently ignored here."""
    from fastalign.config import RewardConfig
    from fastalign.trainer import RewardTrainer
    model, tok = default_model_and_tokenizer("reward", seed=0)
    with_margin = [dict(r, margin=2.0 + i % 3) for i, r in enumerate(ROWS[:8])]
    t = RewardTrainer(model, processing_class=tok, train_dataset=with_margin,
                      args=cfg(RewardConfig, tmp_path, max_steps=1, per_device_train_batch_size=8))
    batch = t._collate(t.train_examples[:8])
    assert batch.margins.tolist() == [2.0 + i % 3 for i in range(8)]
    plain = t._collate([dict(e, margin=0.0) for e in t.train_examples[:8]])
    assert plain.margins is None
    # rows without a margin give the examples they gave before it existed (so checkpoints' data fingerprints hold)
    from fastalign.data import byte_tokenizer, prepare_examples
    assert "margin" not in prepare_examples(ROWS[:2], "preference", byte_tokenizer(), None)[0]
    with torch.no_grad():
        assert t._loss(t.model, batch, None).loss > t._loss(t.model, plain, None).loss  # a margin raises the loss
    for bad, found in (("2", "str '2'"), (float("nan"), "nan"), (None, "null")):
        with pytest.raises(DataError, match=rf"row 1.*margin.*expected a finite number, got {found}"):
            RewardTrainer(model, processing_class=tok, train_dataset=[ROWS[0], dict(ROWS[1], margin=bad)],
                          args=cfg(RewardConfig, tmp_path, max_steps=1, per_device_train_batch_size=1))


def test_reward_trainer_logs_trls_reward_keys_too(tmp_path):
    from fastalign.config import RewardConfig
    from fastalign.trainer import RewardTrainer
    model, tok = default_model_and_tokenizer("reward", seed=0)
    row = RewardTrainer(model, processing_class=tok, train_dataset=ROWS,
                        args=cfg(RewardConfig, tmp_path, max_steps=1, report_to="none")).train()[0]
    assert row["accuracy"] == row["rewards/accuracies"] and row["margin"] == row["rewards/margins"]
    assert row["min_reward"] <= row["mean_reward"] <= row["max_reward"] and row["num_tokens"] > 0


def test_an_output_dir_that_cannot_be_written_is_refused_at_construction(tmp_path):
    from fastalign.checkpoint import RunStateError
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunStateError, match=r"output_dir .*afile/out: .*afile is a file, so the folder cannot be "
                                            r"created there"):
        dpo(tmp_path / "afile" / "out")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(RunStateError, match="is not writable by this user"):
            dpo(locked / "out")


def test_trainer_speaks_trls_attribute_names_and_train_returns_a_train_output(tmp_path):
    t = dpo(tmp_path, max_steps=2)
    assert t.args is t.config and t.processing_class is t.tokenizer
    result = t.train()
    assert isinstance(result, list) and [r["step"] for r in result] == [1, 2]  # the rows, as before
    assert result.global_step == 2 and result.metrics == result[-1]
    assert result.training_loss == pytest.approx((result[0]["loss"] + result[1]["loss"]) / 2)


def test_fsdp_on_a_torch_known_not_to_run_it_is_a_clear_config_error(monkeypatch):
    import torch.distributed.fsdp as fsdp
    from fastalign.trainers.models import fsdp2_fully_shard
    assert fsdp2_fully_shard(torch.device("cpu")) is fsdp.fully_shard
    monkeypatch.setattr(torch, "__version__", "2.6.0+cpu")
    with pytest.raises(ConfigError, match=r"fsdp=True on CPU fails with torch 2.6.0\+cpu .*record_event"):
        fsdp2_fully_shard(torch.device("cpu"))
    assert fsdp2_fully_shard(torch.device("cuda")) is fsdp.fully_shard  # 2.6 on a GPU: not known to fail
    monkeypatch.delattr(fsdp, "fully_shard")  # torch 2.4: no public FSDP2
    with pytest.raises(ConfigError, match=r"needs FSDP2's torch.distributed.fsdp.fully_shard \(torch >= 2.6\)"):
        fsdp2_fully_shard(torch.device("cuda"))
