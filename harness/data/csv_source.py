"""Reader for the CSV layout `label,p0,...,p783`, with or without a header row.

The format as read here: an optional UTF-8 byte order mark at the start (dropped; some
spreadsheet programs write one); lines end in "\\n" (a "\\r" before it is dropped), so a
line number in an error is the one an editor shows; an optional header row (the first
line that is not blank, when it has 785 fields and none of them is an integer: a line
of numbers with one bad field is a data line, reported as such); blank lines skipped;
every other line exactly 785 fields, each a decimal integer with an optional sign and
optional spaces or tabs around it. Rows are checked against that before numpy parses
them, so that numpy's own, more lenient reading of whitespace never decides what is
accepted.
"""

from __future__ import annotations

import codecs
import io
import re
from pathlib import Path

import numpy as np

from harness.errors import HarnessError
from harness.validation import MAX_MESSAGE, one_line

INTEGER_FIELD = re.compile(rb"[ \t]*[+-]?[0-9]+[ \t]*")
FIELD_CHARACTERS = b"0123456789+- \t,"


def read_csv(path: Path, num_pixels: int = 784, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Return (pixels uint8 [n, num_pixels], labels int64 [n]); every row is checked, and
    an error names the file line and field."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: file not found")
    expected_fields = num_pixels + 1
    rows = data_rows(path, expected_fields)
    for line_no, line in rows:
        fields = line.count(b",") + 1
        if fields != expected_fields:
            raise HarnessError(
                f"{path}: line {line_no} has {fields} fields; expected {expected_fields} (label and {num_pixels} pixels)"
            )
        if line.translate(None, FIELD_CHARACTERS):  # a character that no integer field holds
            raise HarnessError(f"{path}: {_first_non_integer([(line_no, line)])}")
    try:
        # numpy's C parser: ~2 s for 60,000 rows, where per-field int() takes ~20 s.
        table = np.loadtxt(io.BytesIO(b"\n".join(line for _, line in rows)), delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, OverflowError) as e:
        raise HarnessError(f"{path}: {_first_non_integer(rows) or _too_large(e, rows)}") from None
    for columns, highest, what in ((slice(0, 1), num_classes - 1, "label"), (slice(1, None), 255, "pixel value")):
        outside = (table[:, columns] < 0) | (table[:, columns] > highest)
        if outside.any():
            row, column = np.argwhere(outside)[0]
            field = columns.start + int(column) + 1  # counted from 1, the label's
            raise HarnessError(f"{path}: line {rows[row][0]}, field {field} ({table[row, field - 1]}) is a {what} outside 0..{highest}")
    return table[:, 1:].astype(np.uint8), table[:, 0].astype(np.int64)


def _too_large(error: Exception, rows: list[tuple[int, bytes]]) -> str:
    """numpy's error for an integer field beyond int64, at the file line: numpy counts data
    rows from 0, after the header and blank lines this reader left out."""
    where = re.search(r"at row (\d+), column (\d+)", str(error))
    if where and int(where[1]) < len(rows):
        line_no, line = rows[int(where[1])]
        field = int(where[2])
        shown = _shown(line.split(b",")[field - 1]) if field <= line.count(b",") + 1 else "?"
        return f"line {line_no}, field {field} ({one_line(shown)}) is not a 64-bit integer"
    return f"a field is not a 64-bit integer ({one_line(error)})"


def data_rows(path: Path, expected_fields: int) -> list[tuple[int, bytes]]:
    """(file line number, line) of every data row: the header and blank lines left out."""
    # A byte order mark (some spreadsheet programs write one) is not part of the first
    # field: left there, the first row of a header-less file would fail as not an integer.
    content = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    lines = [line.removesuffix(b"\r") for line in content.split(b"\n")]
    rows = [(n, line) for n, line in enumerate(lines, start=1) if line.strip(b" \t")]
    if rows and _is_header(rows[0][1], expected_fields):
        rows = rows[1:]  # a header row such as `label,pixel0,...`
    if not rows:
        raise HarnessError(f"{path}: no data rows")
    return rows


def _is_header(line: bytes, expected_fields: int) -> bool:
    """Whether a first line is a header: a row's number of fields, none of them an integer.
    Any other first line is data and checked as such: a damaged first row (`garbage,row`, a
    mistyped label) is an error, not an image dropped without a word."""
    fields = line.split(b",")
    return len(fields) == expected_fields and not any(INTEGER_FIELD.fullmatch(field) for field in fields)


def _first_non_integer(rows: list[tuple[int, bytes]]) -> str | None:
    """Where the first field that is not an integer is."""
    for line_no, line in rows:
        for column, text in enumerate(line.split(b","), start=1):
            if not INTEGER_FIELD.fullmatch(text):
                return f"line {line_no}, field {column} ('{_shown(text)}') is not an integer"
    return None


def _shown(field: bytes) -> str:
    """A field's bytes as Python writes them (\\xd9\\xa3 for a non-ASCII digit, escaped once),
    all of them, unstripped: a stray `\\r` or space is what is wrong with a field like `0\\r`.
    Cut at MAX_MESSAGE characters: a field can be megabytes."""
    shown = repr(field)[2:-1]
    return shown if len(shown) <= MAX_MESSAGE else shown[:MAX_MESSAGE] + "..."
