"""The command line: --version, --help generated from the config dataclasses, one-line errors with exit code 2
(traceback only with --debug), model-loading flags, the start banner, `info` with backend and model check."""
import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fastalign.cli import build_parser, main, user_errors
from fastalign.config import CONFIGS, ConfigError
from fastalign.errors import FastalignError, UnsupportedModelError

ROWS = [{"prompt": f"question {i}?", "chosen": f" good answer {i}", "rejected": f" bad {i}"} for i in range(6)]


def subparser(*path):
    p = build_parser()
    for name in path:
        action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        p = action.choices[name]
    return p


def test_version(capsys):
    import fastalign
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastalign {fastalign.__version__}"


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_every_config_field_has_a_flag_with_help_default_and_choices(kind):
    parser = subparser("train", kind)
    by_dest = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(CONFIGS[kind]):
        action = by_dest[f.name]
        assert action.help and "default:" in action.help, f.name
        assert (f.metadata.get("help") or f.name.replace("_", " ")).rstrip(".")[:30] in action.help, f.name
        choices = f.metadata.get("choices")
        if choices:
            assert set(choices) <= set(action.choices or ()), f.name
    if kind == "dpo":
        assert "default: sigmoid" in by_dest["loss_type"].help and "ipo" in by_dest["loss_type"].choices
    assert by_dest["lr_scheduler_type"].choices and "cosine" in by_dest["lr_scheduler_type"].choices
    for flag in ("torch_dtype", "attn_implementation", "debug"):
        assert by_dest[flag].help
    text = parser.format_help()
    assert "--torch-dtype {auto,float32,bfloat16,float16}" in text and "--check-model" in text


def test_bool_flag_alone_means_true():
    args = build_parser().parse_args(["train", "dpo", "--bf16", "--deterministic", "false"])
    assert args.bf16 is True and args.deterministic is False


def test_user_error_is_one_line_and_exit_2(capsys):
    assert main(["train", "dpo", "--beta", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastalign: error: beta must be > 0") and "Traceback" not in err and err.count("\n") == 1


def test_debug_shows_the_exception_anywhere_on_the_line():
    for argv in (["--debug", "train", "dpo", "--beta", "-1"], ["train", "dpo", "--beta", "-1", "--debug"]):
        with pytest.raises(ConfigError):
            main(argv)


def test_missing_and_malformed_data_exit_2(tmp_path, capsys):
    assert main(["train", "dpo", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n')
    assert main(["train", "dpo", "--data", str(bad), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastalign: error:") and "Traceback" not in err


def test_error_types():
    kinds = user_errors()
    assert issubclass(FastalignError, ValueError) and issubclass(UnsupportedModelError, TypeError)
    from fastalign.data import DataError
    assert all(any(issubclass(k, c) for c in kinds) for k in (ConfigError, DataError, FileNotFoundError,
                                                               UnsupportedModelError))
    assert not any(issubclass(RuntimeError, c) for c in kinds) and not any(issubclass(KeyError, c) for c in kinds)


def test_exit_code_and_no_traceback_in_a_real_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "fastalign.cli", "train", "sft", "--max-length", "1"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("fastalign: error: max_length") and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from fastalign.data import default_model_and_tokenizer
    model, tok = default_model_and_tokenizer()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_torch_dtype_and_attn_implementation_reach_the_model(saved_tiny):
    from fastalign.cli.common import load_model
    model, _, embedded = load_model("dpo", saved_tiny, torch_dtype="bfloat16", attn_implementation="eager")
    assert not embedded and next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    model, _, _ = load_model("dpo", None, torch_dtype="float16")
    assert next(model.parameters()).dtype == torch.float16


def test_train_prints_the_banner(tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "run"
    rc = main(["train", "dpo", "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
               "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2", "--max-length", "32",
               "--max-prompt-length", "16", "--disable-tqdm", "--report-to", "none"])
    assert rc == 0
    text = capsys.readouterr().out
    for want in ("model: LlamaForCausalLM, 0.", "M parameters", "data: 6 train rows", "no eval split",
                 "backend: ", "on cpu, float32", "batch: 4 pairs per step = 2 per device x 2 accumulation x 1",
                 "steps: 1", f"output: {out}", "model check: fused log-probs match"):
        assert want in text, want


def test_info_reports_backend_and_checks_a_model(saved_tiny, capsys):
    assert main(["info", "--json", "--model", saved_tiny]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["active_backend"].split()[0] in d["backends"]
    assert d["cpp_extension"].startswith(("prebuilt", "JIT-built", "unavailable: "))
    assert d["model_class"] == "LlamaForCausalLM" and "fused path matches" in d["model_check"]


def test_info_refuses_a_model_whose_logits_it_cannot_reproduce(tmp_path, capsys):
    """A model class with an undeclared logits transform, saved and loaded through the Auto classes."""
    transformers = pytest.importorskip("transformers")
    from fastalign.data import byte_tokenizer, tiny_llama_config

    class ScaledLlamaConfig(transformers.LlamaConfig):
        model_type = "fastalign_test_scaled_llama"

    class ScaledLlamaForCausalLM(transformers.LlamaForCausalLM):
        config_class = ScaledLlamaConfig

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 7.0
            return out

    transformers.AutoConfig.register(ScaledLlamaConfig.model_type, ScaledLlamaConfig, exist_ok=True)
    transformers.AutoModelForCausalLM.register(ScaledLlamaConfig, ScaledLlamaForCausalLM, exist_ok=True)
    tok = byte_tokenizer()
    cfg = ScaledLlamaConfig(**tiny_llama_config(len(tok)).to_dict())
    torch.manual_seed(0)
    ScaledLlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert main(["info", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert ("fastalign: error: ScaledLlamaForCausalLM: the fused log-probs differ from the model's own forward by "
            "up to") in err and "Traceback" not in err


def test_eval_data_alone_is_the_evaluation_set(tmp_path, capsys):
    """--eval-data without --data: train on the embedded data, evaluate on the file (it used to be ignored)."""
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    rc = main(["train", "dpo", "--eval-data", str(data), "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
               "--per-device-train-batch-size", "2", "--disable-tqdm", "--report-to", "none"])
    assert rc == 0 and re.search(r"(?<!\d)3 eval rows", capsys.readouterr().out)


def test_train_banner_says_it_resumes_and_weights(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "dpo", "--output-dir", str(out), "--per-device-train-batch-size", "2", "--disable-tqdm",
            "--report-to", "none", "--lr-scheduler-type", "constant"]
    assert main(base + ["--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main(base + ["--max-steps", "2", "--resume"]) == 0
    assert f"resume: from {out / 'checkpoint-1'}" in capsys.readouterr().out
    weighted = ["train", "dpo", "--output-dir", str(tmp_path / "w"), "--per-device-train-batch-size", "2",
                "--disable-tqdm", "--report-to", "none", "--max-steps", "1", "--clone-robust", "true"]
    assert main(weighted) == 0
    assert "weighting: clone-robust pair weights (encoder model, groups by prompt)" in capsys.readouterr().out
