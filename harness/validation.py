"""Checking JSON from files that may have been crafted: strict parsing, and a JSON Schema
(the `jsonschema` library) whose first violation becomes one line naming the field."""

from __future__ import annotations

import errno
import json
import os
import reprlib
import stat
from functools import lru_cache
from pathlib import Path

import jsonschema

from harness.errors import HarnessError

MAX_MESSAGE = 200  # a violation quotes the offending value: a crafted one could be megabytes
# Plain data from a pickle (a checkpoint's config, loop state, statistics), counted as one per
# value plus one per character of a string: a run's hold a few thousand at most, nested 2 deep.
MAX_PLAIN_SIZE = 100_000
MAX_PLAIN_DEPTH = 20


def one_line(text) -> str:
    """`text` on one line, at most MAX_MESSAGE characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."


def printable(text: str) -> str:
    """`text` with its control characters escaped (\\x1b, \\n): a file's text in a message
    cannot move the cursor or recolour the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicate_keys(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def strict_json_loads(text: str | bytes, nonfinite_ok: bool = False):
    """json.loads, refusing what Python accepts but JSON does not (NaN, Infinity; unless
    `nonfinite_ok`), duplicate keys (which one would win is a guess) and nesting deep
    enough to exhaust the stack. Every problem is a ValueError."""
    try:
        return json.loads(text, parse_constant=float if nonfinite_ok else _no_constants, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json_file(path: Path, max_bytes: int, what: str, nonfinite_ok: bool = False):
    """A small JSON file, parsed strictly (see strict_json_loads); HarnessError naming it if
    it is unreadable, larger than `max_bytes` (checked before reading) or not JSON."""
    try:
        with open_regular_file(path) as f:
            payload = f.read(max_bytes + 1)
    except OSError as e:
        raise HarnessError(f"{path}: unreadable {what} ({e.strerror or e})") from None
    if len(payload) > max_bytes:
        raise HarnessError(f"{path}: larger than {max_bytes} bytes; not a {what}")
    try:
        return strict_json_loads(payload, nonfinite_ok)
    except ValueError as e:
        raise HarnessError(f"{path}: not valid JSON ({one_line(e)})") from None


def existing_directory(path: Path, what: str, hint: str) -> Path:
    """`path`, if it is a directory; else one error: `what` not found, or not a directory
    (with `hint`: what the option names)."""
    if path.exists() and not path.is_dir():
        raise HarnessError(f"{path}: not a directory; {hint}")
    if not path.is_dir():
        raise HarnessError(f"{path}: {what} not found")
    return path


def missing_or_not_a_file(path: Path) -> str:
    """What is wrong with a path where a regular file was wanted and none was found: it is
    missing, or a directory or something else stands there (a user would look for the file)."""
    if not os.path.lexists(path):
        return "is missing"
    return "is a directory, not a file" if os.path.isdir(path) else "is not a regular file"


def open_regular_file(path):
    """`path` opened for reading in binary, if it is a regular file; OSError otherwise. It is
    opened without blocking, then checked: open() of a FIFO would wait for a writer forever,
    and a device could be read without end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def plain_data_problem(value, name: str) -> str | None:
    """Why `value` is not plain data of bounded size, as `field: problem`; None if it is.
    Plain data is what JSON holds: None, bools, ints, floats, strings, and lists, tuples and
    string-keyed dicts of them. From a pickle, a container can hold itself, or one container
    many times over (64 levels of x = [x, x] in a 54 KB file make 2**64 paths): the walk
    counts every value it meets, shared or not, and stops at MAX_PLAIN_SIZE, which bounds
    whatever compares, prints or validates a value that passes."""
    pending, size = [(value, 0, (name,))], 1  # a field's name as (parent's, key): built only for a problem
    while pending:
        item, depth, field = pending.pop()
        kind = type(item)
        size += len(item) if kind in (list, tuple, dict, str) else 0
        if size > MAX_PLAIN_SIZE:
            return f"{_field_name(field)}: more than {MAX_PLAIN_SIZE} values and characters in all (a container inside itself?)"
        if kind in (list, tuple, dict):
            if depth == MAX_PLAIN_DEPTH:
                return f"{_field_name(field)}: nested more than {MAX_PLAIN_DEPTH} deep"
            if kind is dict and not all(type(key) is str for key in item):
                return f"{_field_name(field)}: a mapping with a key that is not a string"
            children = item.items() if kind is dict else enumerate(item)
            pending.extend((child, depth + 1, (field, key)) for key, child in children)
        elif kind not in (type(None), bool, int, float, str):
            return f"{_field_name(field)}: a {kind.__name__}, not plain data"
    return None


def _field_name(field: tuple) -> str:
    """`loop.last_metrics.epoch` from plain_data_problem's (parent, key) chain."""
    parts = []
    while len(field) == 2:
        field, key = field
        parts.append(f"[{key}]" if type(key) is int else f".{key[:50]}")
    return one_line(field[0] + "".join(reversed(parts)))


@lru_cache(maxsize=None)
def _validator(schema_json: str) -> jsonschema.protocols.Validator:
    schema = json.loads(schema_json)
    base = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    base.check_schema(schema)
    # JSON Schema counts 20.0 as an integer; a count or size that is a float would reach
    # range() and numpy shapes, so here an integer is a Python int (and not a bool).
    types = base.TYPE_CHECKER.redefine("integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
    return jsonschema.validators.extend(base, type_checker=types)(schema)


def field_name(path) -> str:
    """A location in a JSON document as `splits.train.shards[0].name`."""
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def first_violation(schema: dict, instance) -> str | None:
    """The most relevant way `instance` breaks `schema`, as `field: problem`; None if it conforms."""
    error = jsonschema.exceptions.best_match(_validator(json.dumps(schema, sort_keys=True)).iter_errors(instance))
    if error is None:
        return None
    # Messages quote the offending value (a crafted one could be megabytes): shorten it.
    message = error.message.replace(repr(error.instance), reprlib.repr(error.instance))
    field = field_name(error.absolute_path)
    return one_line(f"{field}: {message}" if field else message)
