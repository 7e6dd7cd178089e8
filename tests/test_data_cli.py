"""Every data problem through the CLI: exit status 2, one message naming file:line and field, no traceback."""
import json
import subprocess
import sys

import pytest

from fastalign.cli import main
from fastalign.data import DEFAULT_PREFERENCES, load_rows

GOOD = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_rows(DEFAULT_PREFERENCES, "train")[:8]]


def _write(path, rows):
    path.write_bytes(b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n")
    return str(path)


def _train(capsys, tmp_path, kind, data, *extra):
    rc = main(["train", kind, "--data", data, "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
               "--per-device-train-batch-size", "2", "--disable-tqdm", "true", *extra])
    err = capsys.readouterr().err
    return rc, err




CASES = {
    "empty file": ("dpo", [], "{p}: the file is empty; expected one JSON object per line"),
    "malformed line": ("dpo", [GOOD[0], b'{"prompt": "a", "chosen": }'] + GOOD[1:3],
                       "{p}:2: not valid JSON: Expecting value (column 27)"),
    "not utf-8": ("dpo", GOOD[:2] + [b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}'],
                  "{p}:3: not valid UTF-8 (byte 0xff at byte column 13)"),
    "one row": ("dpo", GOOD[:1], "train_dataset has 1 usable row(s), fewer than one global batch (2 per device"),
    "int answer": ("dpo", [GOOD[0], dict(GOOD[1], chosen=3), GOOD[2]],
                   "{p}:2: field 'chosen': expected a string or a list of messages, got int"),
    "bool answer": ("rm", [GOOD[0], GOOD[1], dict(GOOD[2], rejected=False)],
                    "{p}:3: field 'rejected': expected a string or a list of messages, got bool"),
    "list answer": ("dpo", [dict(GOOD[0], chosen=["a", "b"]), GOOD[1]],
                    "{p}:1: field 'chosen': expected a string or a list of messages, got a list of str"),
    "null prompt (sft)": ("sft", [{"prompt": None, "completion": "x"}, {"prompt": "q", "completion": "a"}],
                          "{p}:1: field 'prompt': expected a string or a list of messages, got null"),
    "null content (sft)": ("sft", [{"messages": [{"role": "user", "content": None},
                                                 {"role": "assistant", "content": "a"}]}] * 2,
                           "{p}:1: field 'messages': message 0 (user): 'content' expected a string, got null"),
    "empty assistant message": ("sft", [{"messages": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": " "}]}] * 2,
                                "{p}:2: field 'messages': message 1 (assistant) is empty"),
    "negative weight": ("rm", [GOOD[0], dict(GOOD[1], weight=-0.5)],
                        "{p}:2: field 'weight': expected a finite number >= 0, got -0.5"),
    "nan weight": ("rm", [dict(GOOD[0], weight=float("nan")), GOOD[1]],
                   "{p}:1: field 'weight': expected a finite number >= 0, got nan"),
    "infinite weight": ("dpo", [GOOD[0], dict(GOOD[1], weight=float("inf"))],
                        "{p}:2: field 'weight': expected a finite number >= 0, got inf"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_data_problem_exits_2_with_file_line_and_field(capsys, tmp_path, case):
    kind, rows, expected = CASES[case]
    p = _write(tmp_path / "prefs.jsonl", rows)
    rc, err = _train(capsys, tmp_path, kind, p)
    assert rc == 2, err
    assert expected.format(p=p) in err
    assert err.startswith("fastalign: error: ") and "Traceback" not in err


def test_eval_data_problems_are_named_too(capsys, tmp_path):
    train = _write(tmp_path / "train.jsonl", GOOD[:4])
    empty = _write(tmp_path / "eval.jsonl", [])
    rc, err = _train(capsys, tmp_path, "dpo", train, "--eval-data", empty)
    assert rc == 2 and f"{empty}: the file is empty" in err
    bad = _write(tmp_path / "eval2.jsonl", [GOOD[0], dict(GOOD[1], rejected=None)])
    rc, err = _train(capsys, tmp_path, "dpo", train, "--eval-data", bad)
    assert rc == 2 and f"eval_dataset: 1 malformed row(s):\n  {bad}:2: field 'rejected'" in err


def test_identical_after_truncation_is_dropped_with_a_count_and_training_goes_on(capsys, tmp_path):
    same = {"prompt": "Which?", "chosen": "A" * 120 + " first", "rejected": "A" * 120 + " second"}
    p = _write(tmp_path / "prefs.jsonl", GOOD[:4] + [same])
    with pytest.warns(UserWarning, match=r"train_dataset: dropped 1 of 5 pair\(s\): chosen and rejected are identical "
                                         r"after truncation"):
        rc = main(["train", "dpo", "--data", p, "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
                   "--per-device-train-batch-size", "2", "--disable-tqdm", "true", "--max-length", "64",
                   "--max-prompt-length", "32"])
    assert rc == 0, capsys.readouterr().err


def test_real_process_exit_status_and_no_traceback(tmp_path):
    p = _write(tmp_path / "prefs.jsonl", [GOOD[0], dict(GOOD[1], chosen=17)])
    out = subprocess.run([sys.executable, "-m", "fastalign.cli", "train", "dpo", "--data", p, "--output-dir",
                          str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 2
    assert f"{p}:2: field 'chosen': expected a string or a list of messages, got int" in out.stderr
    assert "Traceback" not in out.stderr
