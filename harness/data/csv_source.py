"""Reader for the CSV layout `label,p0,...,p783`, with or without a header row."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.errors import HarnessError


def read_csv(path: Path, num_pixels: int = 784) -> tuple[np.ndarray, np.ndarray]:
    """Return (pixels uint8 [n, num_pixels], labels uint8 [n]); every row is checked."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: file not found")
    lines = path.read_text(encoding="ascii", errors="replace").splitlines()
    first_data_line = 0
    if lines and not lines[0].split(",")[0].strip().lstrip("-").isdigit():
        first_data_line = 1  # a header row such as `label,pixel0,...`
    rows = [(n, line) for n, line in enumerate(lines[first_data_line:], start=first_data_line + 1) if line.strip()]
    if not rows:
        raise HarnessError(f"{path}: no data rows")
    expected_fields = num_pixels + 1
    for line_no, line in rows:
        fields = line.count(",") + 1
        if fields != expected_fields:
            raise HarnessError(
                f"{path}: line {line_no} has {fields} fields; expected {expected_fields} (label and {num_pixels} pixels)"
            )
    try:
        # numpy's C parser: ~2 s for 60,000 rows, where per-field int() takes ~20 s.
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, skiprows=first_data_line, ndmin=2)
    except ValueError as e:
        # numpy counts rows from 0 after the header; name the file line, as the checks above do.
        raise HarnessError(f"{path}: {_first_non_integer(rows) or f'a field is not an integer ({e})'}") from None
    labels, pixels = table[:, 0], table[:, 1:]
    bad = np.flatnonzero((pixels < 0).any(axis=1) | (pixels > 255).any(axis=1))
    if bad.size:
        raise HarnessError(f"{path}: line {rows[bad[0]][0]} has a pixel value outside 0..255")
    return pixels.astype(np.uint8), labels.astype(np.int64)


def _first_non_integer(rows: list[tuple[int, str]]) -> str | None:
    """Where the first non-integer field is (only called once parsing has failed)."""
    for line_no, line in rows:
        for column, text in enumerate(line.split(","), start=1):
            if not text.strip().lstrip("+-").isdigit():
                return f"line {line_no}, field {column} ({text.strip()!r}) is not an integer"
    return None
