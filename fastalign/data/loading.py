"""Reading rows: JSON lines, JSON, CSV and Parquet files, in-memory lists and ``datasets.Dataset`` objects.

Rows come back as ``Rows``: a plain list of dicts that also remembers where each row came from, so that
every later check can say ``prefs.jsonl:17`` (file, 1-based line) or ``row 17`` (0-based index in memory).
"""
import codecs
import csv
import io
import json
import os

from fastalign.data.errors import DataError, Problems, type_name

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
                ".pq": "parquet"}
# Optional columns that Arrow-backed sources (datasets.Dataset, Parquet) fill with null where a row lacks them.
OPTIONAL_COLUMNS = ("weight", "behaviour", "split")


class Rows(list):
    """A list of row dicts; ``where[i]`` says where row i came from ('prefs.jsonl:17', 'row 17')."""

    def __init__(self, rows=(), where=None, source=None):
        super().__init__(rows)
        self.where = list(where) if where is not None else [f"row {i}" for i in range(len(self))]
        self.source = source


def locations(rows):
    """Where each row came from: the loader's record for ``Rows``, else 0-based 'row i'."""
    where = getattr(rows, "where", None)
    if where is not None and len(where) == len(rows):
        return where
    return [f"row {i}" for i in range(len(rows))]


def load_rows(data, split=None):
    """Rows as ``Rows`` (a list of dicts) from a path (.jsonl, .json, .csv, .parquet), a list of dicts, a
    ``datasets.Dataset`` (or any sequence of dicts) or a pandas DataFrame.

    split: keep only rows whose "split" column equals it (the embedded data has train/test).
    Raises DataError naming the file and line of every unreadable row, FileNotFoundError for a missing file.
    """
    if isinstance(data, (str, os.PathLike)):
        rows = _read_file(os.fspath(data))
    elif isinstance(data, Rows):
        rows = data
    else:
        rows = _from_memory(data)
    if split is not None:
        present = sorted({str(r.get("split")) for r in rows if "split" in r})
        keep = [i for i, r in enumerate(rows) if r.get("split", split) == split]
        where = locations(rows)
        rows = Rows([rows[i] for i in keep], [where[i] for i in keep], getattr(rows, "source", None))
        if not rows:
            raise DataError(f"{rows.source or 'data'}: no rows for split {split!r}"
                            + (f" (splits present: {', '.join(present)})" if present else ""))
    if not rows:
        raise DataError(f"{rows.source or 'data'}: no rows (an empty dataset cannot be trained on)")
    return rows


# ---- files ------------------------------------------------------------------------------------------

def _read_file(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; expected a .jsonl, .json, .csv or .parquet file")
    ext = os.path.splitext(path)[1].lower()
    fmt = FILE_FORMATS.get(ext)
    if fmt is None:
        raise DataError(f"{path}: unknown data file type {ext or '(no extension)'!r}; expected one of "
                        f"{', '.join(sorted(FILE_FORMATS))}")
    if fmt == "parquet":
        return _read_parquet(path)
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; expected "
                        + ("one JSON object per line" if fmt == "jsonl" else
                           "a header line and one row per line" if fmt == "csv" else "a JSON array of row objects"))
    if fmt == "jsonl":
        return _parse_jsonl(path, raw)
    text = _decode(path, raw)
    return _parse_json(path, text) if fmt == "json" else _parse_csv(path, text)


def _decode(path, raw):
    """The whole file as text; non-UTF-8 bytes are a DataError naming the line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte column {column}); "
                        "save the file as UTF-8") from None


def _parse_jsonl(path, raw):
    problems = Problems(path)
    rows, where = [], []
    for n, line in enumerate(raw.split(b"\n"), 1):
        if n == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.add(f"{path}:{n}", f"not valid UTF-8 (byte 0x{line[exc.start]:02x} at byte column "
                                        f"{exc.start + 1}); save the file as UTF-8")
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.add(f"{path}:{n}", f"not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            problems.add(f"{path}:{n}", f"expected a JSON object (one row per line), got {type_name(obj)}")
            continue
        rows.append(obj)
        where.append(f"{path}:{n}")
    problems.raise_if_any("unreadable line(s)", partial_rows=Rows(rows, where, path))
    return Rows(rows, where, path)


def _parse_json(path, text):
    """A JSON array of row objects (each located by the line it starts on), {"data": [...]}, or JSON lines
    in a .json file (as `datasets` accepts)."""
    body = text.lstrip()
    if body.startswith("["):
        return _parse_json_array(path, text)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level values: JSON lines
            return _parse_jsonl(path, text.encode("utf-8"))
        raise DataError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        rows = obj["data"]
        bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
        if bad:
            raise DataError(f"{path}: row {bad[0]} of \"data\": expected an object, got {type_name(rows[bad[0]])}")
        return Rows(rows, [f"{path}: row {i}" for i in range(len(rows))], path)
    if isinstance(obj, dict):
        return Rows([obj], [f"{path}:1"], path)
    raise DataError(f"{path}: expected a JSON array of row objects, {{\"data\": [...]}} or JSON lines, "
                    f"got a top-level {type_name(obj)}")


def _parse_json_array(path, text):
    decoder = json.JSONDecoder()
    rows, where = [], []
    pos = text.index("[") + 1
    line, line_pos = 1, 0

    def skip(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_at(i):
        nonlocal line, line_pos
        line += text.count("\n", line_pos, i)
        line_pos = i
        return line

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
            n = line_at(pos)
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object (one row), got {type_name(obj)}")
            rows.append(obj)
            where.append(f"{path}:{n}")
            pos = skip(end)
            if pos < len(text) and text[pos] == ",":
                pos = skip(pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise DataError(f"{path}:{line_at(min(pos, len(text)))}: not valid JSON: expected ',' or ']' after "
                            "a row")
    if skip(pos) != len(text):
        raise DataError(f"{path}:{line_at(pos)}: not valid JSON: extra data after the closing ']'")
    return Rows(rows, where, path)


def _parse_csv(path, text):
    """A header line naming the columns, then one row per line (standard library csv: quoted cells may hold
    commas and newlines). Cells are strings; a non-empty ``weight`` cell is read as a number."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path}: the file is empty; expected a header line and one row per line")
    problems = Problems(path)
    rows, where = [], []
    ended = reader.line_num
    for rec in reader:
        start, ended = ended + 1, reader.line_num  # a quoted cell may span lines: the row starts after the last
        loc = f"{path}:{start}"
        if None in rec:
            problems.add(loc, f"{len(rec[None])} more value(s) than the header has columns "
                              f"({', '.join(reader.fieldnames)})")
            continue
        short = [k for k, v in rec.items() if v is None]
        if short:
            spans = f" (the row runs to line {ended}: an unclosed quote?)" if ended > start else ""
            problems.add(loc, f"{len(reader.fieldnames) - len(short)} value(s) where the header has "
                              f"{len(reader.fieldnames)} columns: none for {', '.join(short)}{spans}")
            continue
        row = {k: v for k, v in rec.items()}
        w = row.get("weight")
        if isinstance(w, str) and w.strip():
            try:
                row["weight"] = float(w)
            except ValueError:
                pass  # validation reports the string
        rows.append(row)
        where.append(loc)
    problems.raise_if_any("unreadable line(s)", partial_rows=Rows(rows, where, path))
    return Rows(rows, where, path)


def _read_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow (it also comes with "
                        "`pip install datasets`)") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError subclasses for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    rows = [_drop_null_optionals(r) for r in table.to_pylist()]
    return Rows(rows, [f"{path}: row {i}" for i in range(len(rows))], path)


# ---- in memory --------------------------------------------------------------------------------------

def _drop_null_optionals(row):
    """Arrow stores a column a row lacks as null: an absent optional column means its default."""
    if any(row.get(k, 0) is None for k in OPTIONAL_COLUMNS):
        return {k: v for k, v in row.items() if not (k in OPTIONAL_COLUMNS and v is None)}
    return row


def _from_memory(data):
    cls = type(data).__name__
    if cls in ("DatasetDict", "IterableDatasetDict"):
        raise DataError(f"got a {cls} with splits {list(data.keys())}; pass one split, e.g. dataset['train']")
    arrow = cls in ("Dataset", "IterableDataset")
    if cls == "DataFrame" and hasattr(data, "to_dict"):
        # pandas marks a missing cell NaN: as None it reads as an absent optional column, as in Arrow
        items, arrow = data.astype(object).where(data.notna(), None).to_dict("records"), True
    elif cls == "Dataset" and hasattr(data, "to_list"):
        items = data.to_list()
    elif isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be a file path, a list of dicts, a datasets.Dataset or a pandas DataFrame, "
                        f"got {cls}")
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        items = [data[i] for i in range(len(data))]
    else:
        items = list(data)
    problems = Problems()
    for i, r in enumerate(items):
        if not isinstance(r, dict):
            problems.add(f"row {i}", f"expected a dict (one row), got {type_name(r)}")
    problems.raise_if_any("row(s) that are not dicts")
    if arrow:
        items = [_drop_null_optionals(r) for r in items]
    return Rows(items, None, None)
