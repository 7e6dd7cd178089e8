"""Bad input to the research commands (tax, merge, diagnose; weights: test_clone_robust_train.py): refused early,
with the option, file:line or folder named; output folders held by one run and never overwritten by accident."""
import copy
import json
import os

import pytest
import torch
import transformers

import fastalign
from fastalign.cli import build_parser, main
from fastalign.data import byte_tokenizer, tiny_llama_config
from fastalign.trainers.runlog import OutputDirLock

PREFS = [{"prompt": f"Q{i}:", "chosen": " yes", "rejected": " no"} for i in range(4)]
TEXT = [{"text": f"the cat number {i} sat."} for i in range(4)]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """pre and post causal LMs (2 decoder blocks), a reward model, the data files."""
    root = tmp_path_factory.mktemp("models")
    tok = byte_tokenizer()
    cfg = tiny_llama_config(len(tok), num_hidden_layers=2, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    rm_cfg = copy.deepcopy(cfg)
    rm_cfg.num_labels = 1
    out = {}
    for seed, name, model_of in ((0, "pre", lambda: transformers.LlamaForCausalLM(cfg)),
                                 (1, "post", lambda: transformers.LlamaForCausalLM(cfg)),
                                 (2, "rm", lambda: transformers.LlamaForSequenceClassification(rm_cfg))):
        torch.manual_seed(seed)
        model_of().save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    out["prefs"], out["text"] = _write(root / "prefs.jsonl", PREFS), _write(root / "text.jsonl", TEXT)
    return out


def _tax(f, out, *extra, post=None):
    return ["tax", "--pre", f["pre"], "--post", post or f["post"], "--align-data", f["prefs"], "--general-data",
            f["text"], "--grid", "0,1", "--output-dir", str(out), *extra]


@pytest.mark.parametrize("kind, row, message", [
    ("align", {"prompt": "Q:", "chosen": 3, "rejected": " no"}, "field 'chosen': expected a string"),
    ("align", {"prompt": "Q:", "chosen": " no", "rejected": " no"}, "field 'rejected': identical to 'chosen'"),
    ("align", {"prompt": "Q:", "chosen": " ", "rejected": " no"}, "field 'chosen': empty"),
    ("general", {"text": 5}, "field 'text': expected a string, got int"),
    ("general", {"text": ""}, "field 'text': empty"),
    ("general", {"txt": "typo"}, "field 'text': missing"),
])
def test_tax_refuses_malformed_data_naming_file_and_line(folders, tmp_path, capsys, kind, row, message):
    good = PREFS if kind == "align" else TEXT
    path = _write(tmp_path / f"{kind}.jsonl", good[:2] + [row])
    f = dict(folders, **{"prefs" if kind == "align" else "text": path})
    assert main(_tax(f, tmp_path / "tax")) == 2
    err = capsys.readouterr().err
    assert f"{kind} data: 1 malformed row(s)" in err and f"{kind}.jsonl:3: {message}" in err
    assert not os.path.exists(tmp_path / "tax")  # refused before a folder was made


def test_tax_output_dir_is_held_by_one_run_and_not_overwritten(folders, tmp_path, capsys):
    out = tmp_path / "tax"
    assert main(_tax(folders, out)) == 0
    first = (out / "tax.json").read_text()
    assert main(_tax(folders, out)) == 2
    assert "already holds the report of an earlier run (tax.json, tax.png)" in capsys.readouterr().err
    assert (out / "tax.json").read_text() == first
    with OutputDirLock(str(out)):  # another run holds the folder
        assert main(_tax(folders, out, "--overwrite-output-dir")) == 1
        assert "in use by another run" in capsys.readouterr().err
    assert main(_tax(folders, out, "--overwrite-output-dir")) == 0
    assert json.loads((out / "tax.json").read_text())["rows"]


def test_tax_refuses_the_wrong_kind_of_model_folder(folders, tmp_path, capsys):
    cases = [(_tax(folders, tmp_path / "tax", post=folders["rm"]), "--post",
              "holds a LlamaForSequenceClassification (config.json architectures), but a causal language model"),
             (_tax(folders, tmp_path / "tax", "--reward-model", folders["post"]), "--reward-model",
              "holds a LlamaForCausalLM (config.json architectures), but a reward model"),
             (_tax(folders, tmp_path / "tax", "--reward-model", str(tmp_path / "nonexist")), "--reward-model",
              "no such local folder")]
    for argv, option, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {option} " in err and message in err and "huggingface.co" not in err, err
    assert not os.path.exists(tmp_path / "tax")
    from fastalign.model_folders import ModelFolderError, load_model_folder
    # a folder whose config names no architecture: the weights it lacks give it away
    plain = tmp_path / "plain"
    transformers.LlamaForCausalLM.from_pretrained(folders["post"]).save_pretrained(plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg.pop("architectures", None)
    (plain / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match=r"1 weight\(s\) of that model are missing from it.*score.weight"):
        load_model_folder(str(plain), "--reward-model", "reward-model")
    assert load_model_folder(folders["rm"], "--reward-model", "reward-model").config.num_labels == 1


@pytest.mark.parametrize("argv, option", [
    (["tax", "--batch-size", "0"], "--batch-size"), (["tax", "--hma", "0"], "--hma"),
    (["tax", "--beta", "-1"], "--beta"), (["tax", "--grid", "0,0.3,...,1"], "--grid"),
    (["merge", "--hma", "0"], "--hma"), (["merge", "--weight-on-pre", "1.5"], "--weight-on-pre"),
    (["diagnose", "--batch-size", "0"], "--batch-size"), (["diagnose", "--n-bootstrap", "-5"], "--n-bootstrap"),
    (["diagnose", "--flip-steps", "0"], "--flip-steps"), (["diagnose", "--flip-eval-every", "0"], "--flip-eval-every"),
    (["diagnose", "--threshold", "1.5"], "--threshold"), (["weights", "--num-samples", "0"], "--num-samples"),
])
def test_bad_numbers_are_refused_when_the_arguments_are_parsed(capsys, argv, option):
    required = {"tax": ["--pre", "a", "--post", "b", "--align-data", "c", "--general-data", "d"],
                "merge": ["--pre", "a", "--post", "b", "--weight-on-pre", "0.5", "--out", "o"],
                "weights": ["--data", "d", "--out", "o"], "diagnose": []}[argv[0]]
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv[:1] + required + argv[1:])
    assert exc.value.code == 2
    assert f"argument {option}: " in capsys.readouterr().err


def test_merge_checks_its_output_before_fitting(folders, tmp_path, capsys, monkeypatch):
    from fastalign import hma_fit

    def no_fit(*a, **k):
        raise AssertionError("the ratio fit ran before --out was checked")
    monkeypatch.setattr(hma_fit, "fit_hma_ratios", no_fit)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    base = ["merge", "--pre", folders["pre"], "--post", folders["post"], "--weight-on-pre", "0.3", "--hma", "2",
            "--fit-data", folders["prefs"]]
    assert main(base + ["--out", str(taken)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(base + ["--out", folders["post"] + "/../post"]) == 2
    assert "is the --post folder" in capsys.readouterr().err
    assert main(base[:-4] + ["--hma", "5", "--out", str(tmp_path / "m")]) == 2
    assert "at least 5 decoder blocks, but the model has 2" in capsys.readouterr().err


@pytest.fixture
def no_analysis(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the distinguishability pass ran before the options were checked")
    monkeypatch.setattr(fastalign, "distinguishability", refuse)


def test_diagnose_checks_flip_options_before_the_analysis(folders, tmp_path, capsys, no_analysis):
    prefs = _write(tmp_path / "prefs.jsonl", [dict(r, behaviour="honesty") for r in PREFS])
    base = ["diagnose", "--data", prefs, "--output-dir", str(tmp_path / "d"), "--n-bootstrap", "0"]
    assert main(base + ["--flip-group", "honesty"]) == 2
    assert "--flip-group needs the aligned model" in capsys.readouterr().err
    assert main(base + ["--flip-group", "honsety", "--aligned", folders["post"]]) == 2
    assert "no row has behaviour = 'honsety'; groups: honesty" in capsys.readouterr().err
    assert main(base + ["--flip-group", "honesty", "--aligned", folders["post"], "--flip-steps", "2"]) == 2
    assert "--flip-eval-every 5 is more than --flip-steps 2" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "d")


def test_diagnose_default_folder_is_documented_and_a_report_is_not_overwritten(tmp_path, capsys, monkeypatch):
    assert "./diagnose_out/" in " ".join(build_parser()._subparsers._group_actions[0].choices["diagnose"]
                                         .format_help().split())
    monkeypatch.chdir(tmp_path)
    rows = [dict(r, behaviour="ab"[i % 2]) for i, r in enumerate(PREFS)]
    argv = ["diagnose", "--data", _write(tmp_path / "prefs.jsonl", rows), "--n-bootstrap", "0"]
    assert main(argv) == 0
    report = tmp_path / "diagnose_out" / "diagnose.json"
    first = report.read_text()
    (tmp_path / "diagnose_out" / "accuracy_per_group.png").write_bytes(b"old")  # a stale plot of an older run
    assert main(argv) == 2
    assert "already holds the report of an earlier run" in capsys.readouterr().err
    assert report.read_text() == first
    assert main(argv + ["--overwrite-output-dir"]) == 0
    assert report.exists() and not (tmp_path / "diagnose_out" / "accuracy_per_group.png").exists()
