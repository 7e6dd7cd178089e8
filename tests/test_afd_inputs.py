"""AfD commands on bad input: every file checked up front with file:line, field, found vs expected; conflicting
options refused; output paths checked before sampling; a reward model without its head refused; the demo reruns."""
import json
import os

import pytest
import torch

from fastalign import afd
from fastalign.cli import build_parser, main
from fastalign.data import DataError, default_model_and_tokenizer, locations


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    d = tmp_path_factory.mktemp("afd_inputs")
    lm, tok = default_model_and_tokenizer(seed=0)
    lm.save_pretrained(d / "init")
    tok.save_pretrained(d / "init")
    rm, _ = default_model_and_tokenizer("reward", seed=0)
    rm.save_pretrained(d / "rm")
    tok.save_pretrained(d / "rm")
    rows = [{"prompt": f"{c}b:", "completion": "ab"} for c in "abcdefgh"]
    _write(d / "demos.jsonl", rows)
    _write(d / "init.jsonl", [{**r, "completion": "zz"} for r in rows])
    _write(d / "sft.jsonl", rows)
    _write(d / "prompts.jsonl", [{"prompt": "xy:"}, {"prompt": "zw:"}])
    return d


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _bad(d, name, line, row, src="demos.jsonl"):
    """A copy of src with its 1-based `line` replaced by `row`."""
    lines = open(d / src).read().splitlines()
    lines[line - 1] = row if isinstance(row, str) else json.dumps(row)
    return _write(d / name, lines)


def _err(capsys, argv, rc=2):
    assert main(argv) == rc
    return capsys.readouterr().err


def test_afd_rm_checks_samples_files(fx, tmp_path, capsys):  # bug 1, bug 3 (file:line of the combined rows)
    base = ["afd-rm", "--model", str(fx / "init"), "--rm-kind", "init-sft", "--output-dir", str(tmp_path / "o"),
            "--max-steps", "1", "--sft-samples", str(fx / "sft.jsonl")]
    bad = _bad(fx, "init_bad.jsonl", 3, {"prompt": "cb:", "completon": "zz"}, "init.jsonl")
    err = _err(capsys, base + ["--init-samples", bad])
    assert "init_bad.jsonl:3: field 'completion': missing" in err and "'completon'" in err
    bad = _bad(fx, "init_int.jsonl", 6, {"prompt": "fb:", "completion": 7}, "init.jsonl")
    assert "init_int.jsonl:6: field 'completion': must be text, got int" in _err(capsys, base + ["--init-samples", bad])
    assert not os.path.exists(tmp_path / "o")
    # the combined positives + negatives (and both sides of the split) keep each row's file and line
    rows = afd.reward_rows("init-sft", init_samples=afd.load_samples(str(fx / "init.jsonl")),
                           sft_samples=afd.load_samples(str(fx / "sft.jsonl")))
    assert locations(rows)[0].endswith("sft.jsonl:1") and locations(rows)[9].endswith("init.jsonl:2")
    train, held = afd.split_by_prompt(rows, 0.25)
    assert all(w.endswith(f".jsonl:{'abcdefgh'.index(r['prompt'][0]) + 1}")
               for part in (train, held) for r, w in zip(part, locations(part)))
    # in memory: 0-based rows, as elsewhere in the project
    with pytest.raises(DataError, match=r"row 1: field 'completion': must be text, got null"):
        afd.reward_rows("init-sft", sft_samples=[{"prompt": "a", "completion": "y"}],
                        init_samples=[{"prompt": "a", "completion": "x"}, {"prompt": "b", "completion": None}])


def test_afd_rm_data_errors_name_file_and_line(fx, tmp_path, capsys):  # bug 3
    rows = [{"prompt": f"{c}:", "answer": "ab", "label": k % 2} for k, c in enumerate("abcd")]
    path = _write(tmp_path / "rows.jsonl", rows[:2] + [{**rows[2], "label": 2}] + rows[3:])
    err = _err(capsys, ["afd-rm", "--model", str(fx / "init"), "--data", path, "--output-dir", str(tmp_path / "o")])
    assert "rows.jsonl:3: label must be 0 or 1, got 2" in err and "row 2" not in err


@pytest.mark.parametrize("row, found", [({"prompt": "cb:", "completion": 5}, "must be text, got int"),
                                        ({"prompt": "cb:", "completion": None}, "must be text, got null"),
                                        ({"prompt": "cb:", "completion": ["x"]}, "must be text, got list"),
                                        ({"prompt": "cb:", "completion": ""}, "must be non-empty text")])
@pytest.mark.parametrize("kind", ["init-demo", "init-sft"])
def test_afd_checks_demonstrations_before_any_stage(fx, tmp_path, capsys, row, found, kind):  # bug 2
    demos = _bad(fx, "demos_bad.jsonl", 3, row)
    out = tmp_path / "out"
    err = _err(capsys, ["afd", "--init-model", str(fx / "init"), "--sft-model", str(fx / "init"), "--demos", demos,
                        "--rm-kind", kind, "--n", "2", "--max-new-tokens", "2", "--output-dir", str(out)])
    assert f"demos_bad.jsonl:3: field 'completion': {found}" in err
    assert not os.path.exists(out / "stages")


def test_prompt_and_load_messages(fx, tmp_path, capsys):  # bug 3
    base = ["sample", "--model", str(fx / "init"), "--output", str(tmp_path / "s.jsonl")]
    p = _write(tmp_path / "p_int.jsonl", ['{"prompt": "ab:"}', '{"prompt": 7}'])
    assert "p_int.jsonl:2: field 'prompt': must be text, got int" in _err(capsys, base + ["--prompts", p])
    p = _write(tmp_path / "p_typo.jsonl", ['{"prompt": "ab:"}', '{"promt": "x"}'])
    assert "p_typo.jsonl:2: field 'prompt': missing" in _err(capsys, base + ["--prompts", p])
    p = _write(tmp_path / "p_empty.jsonl", [])
    err = _err(capsys, base + ["--prompts", p])
    assert "p_empty.jsonl: the file is empty; expected one JSON object per line" in err and err.count("expected") == 1
    bad = _bad(fx, "demos_malformed.jsonl", 2, '{"prompt": "x"')
    with pytest.raises(DataError) as info:
        afd.load_demos(bad)
    assert str(info.value).count(bad) == 2 and str(info.value).startswith(f"demonstrations: {bad}: 1 unreadable")


def test_afd_demo_reruns_in_the_same_folder(tmp_path):  # bug 4
    from fastalign import afd_demo
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(2):  # the second run used to stop: "output_dir .../afd_init holds the output of another run"
            afd_demo.run(str(tmp_path), rm_steps=1, sft_steps=1, pretrain_steps=1, samples_per_prompt=1, limit=24,
                         log=lambda m: None)
    finally:
        torch.set_num_threads(threads)


def test_afd_rm_option_conflicts_and_resume(fx, tmp_path, capsys):  # bug 5
    base = ["afd-rm", "--model", str(fx / "init"), "--output-dir", str(tmp_path / "o")]
    rows = _write(tmp_path / "rows.jsonl", [{"prompt": "a:", "answer": "x", "label": 1}])
    err = _err(capsys, base + ["--data", rows, "--init-samples", str(fx / "init.jsonl"), "--rm-kind", "init-sft"])
    assert "--data (labelled rows) cannot be combined with --init-samples, --rm-kind" in err
    err = _err(capsys, base + ["--rm-kind", "init-sft", "--init-samples", str(fx / "init.jsonl"),
                               "--sft-samples", str(fx / "sft.jsonl"), "--demos", str(fx / "demos.jsonl")])
    assert "--rm-kind init-sft does not use --demos" in err
    assert "--sft-samples missing" in _err(capsys, base + ["--init-samples", str(fx / "init.jsonl")])
    args = build_parser().parse_args(base + ["--data", rows, "--resume"])
    assert args.resume_from_checkpoint == "latest"  # the spelling the "holds another run" message advises


def test_load_reward_model_refuses_a_missing_head(fx, tmp_path, capsys):  # bug 6
    with pytest.raises(ValueError, match=r"holds a LlamaForCausalLM without the reward head \(score.weight\)"):
        afd.load_reward_model(str(fx / "init"))
    model, _ = afd.load_reward_model(str(fx / "init"), new_head=True)  # the start of reward-model training
    assert model.score.out_features == 1
    assert afd.load_reward_model(str(fx / "rm"))[0].score.out_features == 1
    with pytest.raises(FileNotFoundError, match="'nope' does not exist"):
        afd.load_reward_model("nope")
    err = _err(capsys, ["best-of-n", "--policy", str(fx / "init"), "--reward-model", str(fx / "init"), "--prompts",
                        str(fx / "prompts.jsonl"), "--n", "2", "--output", str(tmp_path / "bon.jsonl")])
    assert "without the reward head" in err and not os.path.exists(tmp_path / "bon.jsonl")


def test_afd_rm_help(capsys):  # bug 7
    with pytest.raises(SystemExit):
        build_parser().parse_args(["afd-rm", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--rm-kind {init-sft,init-demo,sft-demo}" in out and "SFT samples vs initial-model samples" in out
    assert "share of the prompts held out" in out and "--resume [CHECKPOINT]" in out


def test_sample_output_path(fx, tmp_path, capsys, monkeypatch):  # bug 8
    from fastalign import generation
    base = ["sample", "--model", str(fx / "init"), "--prompts", str(fx / "prompts.jsonl"), "--max-new-tokens", "1"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "f").write_text("x")
    (tmp_path / "old.jsonl").write_text("keep\n")
    with monkeypatch.context() as m:
        m.setattr(generation, "sample", lambda *a, **k: pytest.fail("sampled before checking --output"))
        assert "--output 'adir' is a directory" in _err(capsys, base + ["--output", "adir"])
        assert "is a file" in _err(capsys, base + ["--output", "f/sub/s.jsonl"])
        assert "exists; choose a new file or pass --overwrite" in _err(capsys, base + ["--output", "old.jsonl"])
    assert open(tmp_path / "old.jsonl").read() == "keep\n"
    assert main(base + ["--output", "old.jsonl", "--overwrite"]) == 0
    assert len(open(tmp_path / "old.jsonl").readlines()) == 2


def test_failed_write_leaves_no_temporary_file(tmp_path):  # bug 8
    from fastalign.generation import write_jsonl
    with pytest.raises(TypeError):
        write_jsonl(str(tmp_path / "w.jsonl"), [{"ok": 1}, {"bad": object()}])
    assert os.listdir(tmp_path) == []
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        write_jsonl(str(tmp_path / "d.jsonl"), [{"ok": 1}])
    assert os.listdir(tmp_path) == ["d.jsonl"]


def test_score_batch_size_checked_at_parsing(fx, capsys):  # bug 9
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["best-of-n", "--policy", "p", "--reward-model", "r", "--prompts", "x.jsonl",
                                   "--output", "o.jsonl", "--score-batch-size", "0"])
    assert info.value.code == 2
    assert "argument --score-batch-size: expected an integer >= 1, got '0'" in capsys.readouterr().err
