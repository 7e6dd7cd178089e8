"""Loading and validation: every problem names the file and line (or row) and the field; every format TRL
documents loads to the same rows."""
import json

import pytest

from fastalign.data import DataError, Rows, extract_prompt, load_rows, validate_rows

PAIR = {"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": "No."}


def _jsonl(path, lines):
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return str(path)


def _problem_lines(exc):
    return [line.strip() for line in str(exc.value).splitlines()[1:]]


# ---- reading files ------------------------------------------------------------------------------------

def test_jsonl_rows_remember_their_lines(tmp_path):
    p = _jsonl(tmp_path / "prefs.jsonl", [json.dumps(PAIR), "", "   ", json.dumps(dict(PAIR, chosen="Sure."))])
    rows = load_rows(p)
    assert isinstance(rows, Rows) and len(rows) == 2
    assert rows.where == [f"{p}:1", f"{p}:4"]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(PAIR).encode() + b"\r\n")
    assert load_rows(str(bom))[0] == PAIR


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_files(tmp_path, content):
    for name in ("e.jsonl", "e.json", "e.csv"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=rf"{name}: the file is empty; expected"):
            load_rows(str(tmp_path / name))


def test_malformed_jsonl_lines_are_all_listed(tmp_path):
    p = _jsonl(tmp_path / "prefs.jsonl", [json.dumps(PAIR), '{"prompt": "a", "chosen": "b" "rejected": "c"}',
                                          json.dumps(PAIR), "[1, 2]", "{'single': 'quotes'}"])
    with pytest.raises(DataError) as err:
        load_rows(p)
    assert str(err.value).startswith(f"{p}: 3 unreadable line(s):")
    lines = _problem_lines(err)
    assert lines[0] == f"{p}:2: not valid JSON: Expecting ',' delimiter (column 31)"
    assert lines[1] == f"{p}:4: expected a JSON object (one row per line), got list"
    assert lines[2].startswith(f"{p}:5: not valid JSON: Expecting property name enclosed in double quotes")


def test_a_training_file_reports_its_unreadable_lines_and_its_bad_rows_at_once(tmp_path):
    from fastalign.data import byte_tokenizer, prepare_examples
    p = _jsonl(tmp_path / "prefs.jsonl", [json.dumps(PAIR), '{"prompt": "a", "chosen": "b" "rejected": "c"}',
                                          json.dumps(dict(PAIR, chosen=3))])
    with pytest.raises(DataError) as err:
        prepare_examples(p, "preference", byte_tokenizer(), None)
    text = str(err.value)
    assert text.startswith(f"train_dataset: {p}: 1 unreadable line(s):\n  {p}:2: not valid JSON")
    assert f"\ntrain_dataset: 1 malformed row(s):\n  {p}:3: field 'chosen': expected a string" in text


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    p = _jsonl(tmp_path / "prefs.jsonl", [json.dumps(PAIR), b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'])
    with pytest.raises(DataError, match=rf"{p}:2: not valid UTF-8 \(byte 0xe9 at byte column 16\)"):
        load_rows(p)
    j = tmp_path / "prefs.json"
    j.write_bytes(b'[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": "\xff"}\n]')
    with pytest.raises(DataError, match=rf"{j}:3: not valid UTF-8 \(byte 0xff"):
        load_rows(str(j))
    c = tmp_path / "prefs.csv"
    c.write_bytes(b"prompt,chosen,rejected\na,b,c\na,\xfe,c\n")
    with pytest.raises(DataError, match=rf"{c}:3: not valid UTF-8"):
        load_rows(str(c))


def test_json_array_rows_are_located_by_line(tmp_path):
    p = tmp_path / "prefs.json"
    p.write_text("[\n" + json.dumps(PAIR) + ",\n\n  " + json.dumps(dict(PAIR, rejected="Maybe.")) + "\n]\n")
    rows = load_rows(str(p))
    assert rows.where == [f"{p}:2", f"{p}:4"] and rows[1]["rejected"] == "Maybe."
    p.write_text("[\n" + json.dumps(PAIR) + ",\n  {\"prompt\": }\n]")
    with pytest.raises(DataError, match=rf"{p}:3: not valid JSON: Expecting value"):
        load_rows(str(p))
    p.write_text(json.dumps({"data": [PAIR, PAIR]}))
    assert load_rows(str(p)).where == [f"{p}: row 0", f"{p}: row 1"]
    p.write_text(json.dumps(PAIR) + "\n" + json.dumps(PAIR) + "\n")  # JSON lines in a .json file
    assert load_rows(str(p)).where == [f"{p}:1", f"{p}:2"]
    p.write_text("[1, 2]")
    with pytest.raises(DataError, match=rf"{p}:1: expected a JSON object \(one row\), got int"):
        load_rows(str(p))


def test_csv_rows(tmp_path):
    p = tmp_path / "prefs.csv"
    p.write_text('prompt,chosen,rejected,weight\n"Hi, you",Yes.,No.,0.5\n"multi\nline",a,b,2\nx,y,z,w,extra\n')
    with pytest.raises(DataError, match=rf"{p}:5: 1 more value\(s\) than the header has columns"):
        load_rows(str(p))
    p.write_text('prompt,chosen,rejected,weight\n"Hi, you",Yes.,No.,0.5\nx,y,z,\n')
    rows = load_rows(str(p))
    assert rows[0] == {"prompt": "Hi, you", "chosen": "Yes.", "rejected": "No.", "weight": 0.5}
    assert rows.where == [f"{p}:2", f"{p}:3"]
    with pytest.raises(DataError, match=rf"{p}:3: field 'weight': expected a finite number >= 0, got str"):
        validate_rows(rows, "preference")


def test_parquet_and_datasets_and_dataframes_give_the_same_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = [PAIR, dict(PAIR, weight=0.25), {"chosen": [{"role": "user", "content": "Q"},
                                                       {"role": "assistant", "content": "A"}],
                                            "rejected": [{"role": "user", "content": "Q"},
                                                         {"role": "assistant", "content": "B"}]}]
    flat = [dict(PAIR, weight=None), dict(PAIR, weight=0.25)]  # how Arrow and pandas store a missing weight
    pq.write_table(pa.Table.from_pylist(flat), str(tmp_path / "prefs.parquet"))
    got = load_rows(str(tmp_path / "prefs.parquet"))
    # Arrow stores the missing weight of row 0 as null: an absent optional column, not a bad weight
    assert got == [PAIR, dict(PAIR, weight=0.25)] and got.where[1] == f"{tmp_path / 'prefs.parquet'}: row 1"
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a readable Parquet file"):
        load_rows(str(tmp_path / "bad.parquet"))
    datasets = pytest.importorskip("datasets")
    assert load_rows(datasets.Dataset.from_list(flat)) == [PAIR, dict(PAIR, weight=0.25)]
    with pytest.raises(DataError, match=r"pass one split, e.g. dataset\['train'\]"):
        load_rows(datasets.DatasetDict({"train": datasets.Dataset.from_list(flat)}))
    pd = pytest.importorskip("pandas")
    assert load_rows(pd.DataFrame(flat)) == [PAIR, dict(PAIR, weight=0.25)]  # pandas: NaN weight in row 0
    norm = validate_rows(load_rows(rows), "preference")
    assert norm[2]["prompt"] == [{"role": "user", "content": "Q"}]


def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kw):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="reading Parquet needs pyarrow: pip install pyarrow"):
        load_rows(str(tmp_path / "p.parquet"))


def test_unknown_extension_missing_file_and_empty_split(tmp_path):
    (tmp_path / "prefs.txt").write_text("x")
    with pytest.raises(DataError, match=r"unknown data file type '\.txt'; expected one of \.csv, \.json"):
        load_rows(str(tmp_path / "prefs.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    p = _jsonl(tmp_path / "s.jsonl", [json.dumps(dict(PAIR, split="train"))])
    with pytest.raises(DataError, match=r"s.jsonl: no rows for split 'test' \(splits present: train\)"):
        load_rows(p, split="test")
    with pytest.raises(DataError, match="no rows"):
        load_rows([])


# ---- validation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, expected", [
    ("chosen", 3, "field 'chosen': expected a string or a list of messages, got int"),
    ("chosen", True, "field 'chosen': expected a string or a list of messages, got bool"),
    ("rejected", 2.5, "field 'rejected': expected a string or a list of messages, got float"),
    ("chosen", ["a", "b"], "field 'chosen': expected a string or a list of messages, got a list of str"),
    ("chosen", [], "field 'chosen': expected a string or a list of messages, got an empty list"),
    ("prompt", None, "field 'prompt': expected a string or a list of messages, got null"),
    ("chosen", "  ", "field 'chosen': empty answer"),
    ("chosen", [{"role": "assistant", "content": None}],
     "field 'chosen': message 0 (assistant): 'content' expected a string, got null"),
    ("chosen", [{"role": "assistant", "content": " "}], "field 'chosen': message 0 (assistant) is empty"),
    ("chosen", [{"role": "user", "content": "hi"}], "field 'chosen': has no assistant message"),
    ("chosen", [{"role": "assistant"}], "field 'chosen': message 0: missing 'content'"),
    ("rejected", "Yes.", "field 'rejected': identical to 'chosen' (no preference signal)"),
    ("weight", -1, "field 'weight': expected a finite number >= 0, got -1"),
    ("weight", float("nan"), "field 'weight': expected a finite number >= 0, got nan"),
    ("weight", float("inf"), "field 'weight': expected a finite number >= 0, got inf"),
    ("weight", True, "field 'weight': expected a finite number >= 0, got bool"),
    ("weight", None, "field 'weight': expected a finite number >= 0, got null"),
])
def test_preference_field_problems(tmp_path, field, value, expected):
    rows = [PAIR, dict(PAIR, **{field: value})]
    with pytest.raises(DataError) as err:
        validate_rows(rows, "preference", name="train_dataset")
    assert _problem_lines(err) == [f"row 1: {expected}"]
    # the same row read from a file names file and line
    p = tmp_path / "prefs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError) as err:
        validate_rows(load_rows(str(p)), "preference")
    assert _problem_lines(err) == [f"{p}:2: {expected}"]


def test_weight_zero_is_legal_and_missing_fields_list_the_keys():
    assert validate_rows([dict(PAIR, weight=0)], "preference")[0]["weight"] == 0.0
    with pytest.raises(DataError, match=r"row 0: field 'rejected': missing \(a preference row needs 'chosen' and "
                                        r"'rejected', with 'prompt' unless both include it; the row has 'prompt', "
                                        r"'chosen', 'rejcted'\)"):
        validate_rows([{"prompt": "a", "chosen": "b", "rejcted": "c"}], "preference")


def test_all_problems_collected_and_the_list_capped():
    rows = [dict(PAIR, chosen=i) for i in range(15)]
    with pytest.raises(DataError) as err:
        validate_rows(rows, "preference", name="train_dataset")
    text = str(err.value)
    assert text.startswith("train_dataset: 15 malformed row(s):")
    assert len(_problem_lines(err)) == 11 and text.endswith("... and 5 more problem(s)")


@pytest.mark.parametrize("row, expected", [
    ({"prompt": None, "completion": "a"}, "row 0: field 'prompt': expected a string or a list of messages, got null"),
    ({"prompt": "q", "completion": 7}, "row 0: field 'completion': expected a string or a list of messages, got int"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
     "row 0: field 'messages': message 0 (user): 'content' expected a string, got null"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     "row 0: field 'messages': message 1 (assistant) is empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""},
                   {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "row 0: field 'messages': message 1 (assistant) is empty"),
    ({"messages": "hello"}, "row 0: field 'messages': expected a list of {role, content} messages, got str"),
    ({"text": "hello"}, "row 0: field 'prompt': missing (an SFT row needs 'messages', or 'prompt' and 'completion'"),
])
def test_sft_problems(row, expected):
    with pytest.raises(DataError) as err:
        validate_rows([row], "sft")
    assert _problem_lines(err)[0].startswith(expected)


def test_implicit_prompt_is_the_shared_start_as_in_trl():
    q = {"role": "user", "content": "What color is the sky?"}
    a, b = {"role": "assistant", "content": "It is blue."}, {"role": "assistant", "content": "It is green."}
    assert extract_prompt([q, a], [q, b]) == ([q], [a], [b])
    # strings: a space just before the first difference stays with the answers (TRL's rule)
    assert extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    row = validate_rows([{"chosen": [q, a], "rejected": [q, b], "weight": 2}], "preference")[0]
    assert row == {"prompt": [q], "chosen": [a], "rejected": [b], "weight": 2.0}
    with pytest.raises(DataError, match="field 'chosen': nothing is left after removing the prompt it shares"):
        validate_rows([{"chosen": "Same", "rejected": "Same, but longer"}], "preference")
    with pytest.raises(DataError, match="field 'rejected': is a list of messages but 'chosen' is a string"):
        validate_rows([{"chosen": "x", "rejected": [q, b]}], "preference")


def test_csv_short_rows_and_unclosed_quotes_are_named_as_such(tmp_path):
    short = tmp_path / "short.csv"
    short.write_text("prompt,chosen,rejected\na,b,c\nx,y\n")
    with pytest.raises(DataError, match=rf"{short}:3: 2 value\(s\) where the header has 3 columns: none for rejected"):
        load_rows(str(short))
    quote = tmp_path / "quote.csv"
    quote.write_text('prompt,chosen,rejected\na,b,c\n"x,y,z\nq,r,s\nt,u,v\n')
    with pytest.raises(DataError, match=rf"{quote}:3: 1 value\(s\) where the header has 3 columns: none for chosen, "
                                        r"rejected \(the row runs to line 5: an unclosed quote\?\)"):
        load_rows(str(quote))
    multi = tmp_path / "multi.csv"  # a quoted cell over two lines: the next row is located by its own first line
    multi.write_text('prompt,chosen,rejected\n"a\nb",c,d\ne,f,g\n')
    assert list(load_rows(str(multi)).where) == [f"{multi}:2", f"{multi}:4"]
