"""Reading and writing JSON and JSON Lines files with errors that name the file and line.

Every annotation reader in `data/` goes through these helpers, so a broken file always reports where it
is broken instead of a bare `json.JSONDecodeError`.
"""

import json
from pathlib import Path


class DataFormatError(ValueError):
    """An annotation file that cannot be parsed or lacks a required field."""


def read_json(path) -> object:
    """Parse a whole JSON file; a syntax error names the file, line and column."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from None


def read_jsonl(path) -> list[dict]:
    """Parse a JSON Lines file (LF or CRLF line endings, blank lines ignored) into a list of objects.

    A line that is not valid JSON, or not a JSON object, raises `DataFormatError` naming the file and line.
    """
    path = Path(path)
    records = []
    with open(path, encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(
                    f"{path}:{line_number}: invalid JSON: {error.msg} (column {error.colno})") from None
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def read_json_records(path) -> list[dict]:
    """A list of objects from either a JSON array file or a JSON Lines file (told apart by the first character)."""
    path = Path(path)
    with open(path, encoding="utf-8-sig") as handle:
        first = handle.read(4096).lstrip()[:1]
    if first != "[":
        return read_jsonl(path)
    records = read_json(path)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}: item {index} is a {type(record).__name__}, expected a JSON object")
    return records


def write_jsonl(path, records, line_ending: str = "\n"):
    """Write one compact JSON object per line (`json.dumps` defaults, as the official POPE files use)."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        for record in records:
            handle.write(json.dumps(record) + line_ending)


def write_json(path, data):
    """Write a JSON file deterministically (same data, same bytes)."""
    Path(path).write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")


def require(record: dict, field: str, source: str, types=None):
    """`record[field]`, or a `DataFormatError` naming `source` (file and line/item) and the missing field."""
    if field not in record:
        raise DataFormatError(f"{source}: missing field {field!r}")
    value = record[field]
    if types is not None and not isinstance(value, types):
        expected = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise DataFormatError(f"{source}: field {field!r} should be {expected}, got {type(value).__name__}")
    return value
