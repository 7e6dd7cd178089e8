"""DataError and the collector every data check reports through.

Every problem names where it is: ``prefs.jsonl:17`` (file and 1-based line) for rows read from a JSON lines,
JSON or CSV file, ``prefs.parquet: row 17`` for Parquet, and ``row 17`` (the 0-based index, as in
``dataset[17]``) for an in-memory list or ``datasets.Dataset``; then the field and what was found against
what was expected: ``prefs.jsonl:17: field 'chosen': expected a string or a list of messages, got int``.
"""

MAX_REPORTED = 10


class DataError(ValueError):
    """Malformed or unusable training data, found before any training step. The message lists every
    problem found (up to ``MAX_REPORTED``), each with its file and line (or row) and field. The CLI prints
    it and exits with status 2."""


def type_name(value):
    """JSON's name for what was found: null, bool, int, float, str, list, dict, else the Python type."""
    if value is None:
        return "null"
    return type(value).__name__


class Problems:
    """Collects located problems and raises one DataError with all of them (``max_report`` listed)."""

    def __init__(self, name=None, max_report=MAX_REPORTED):
        self.name, self.max_report, self.items, self.places = name, max_report, [], set()

    def add(self, where, message, field=None):
        field_part = f"field '{field}': " if field is not None else ""
        self.places.add(where)
        self.items.append(f"{where}: {field_part}{message}" if where else f"{field_part}{message}")

    def __bool__(self):
        return bool(self.items)

    def __len__(self):
        return len(self.items)

    def raise_if_any(self, what="row(s) with problems", partial_rows=None):
        """Raise DataError: '<name>: <number of rows or lines> <what>:' then one problem per line. A loader passes
        the rows it could read as ``partial_rows`` (kept on the error), so that a caller can check those too and
        report every problem of the file at once."""
        if not self.items:
            return
        shown = self.items[:self.max_report]
        more = len(self.items) - len(shown)
        head = f"{self.name}: " if self.name else ""
        text = f"{head}{len(self.places)} {what}:\n  " + "\n  ".join(shown)
        if more:
            text += f"\n  ... and {more} more problem(s)"
        error = DataError(text)
        error.partial_rows = partial_rows
        raise error
