"""Checking JSON from files that may have been crafted: strict parsing, and a JSON Schema
(the `jsonschema` library) whose first violation becomes one line naming the field."""

from __future__ import annotations

import json
import reprlib
from functools import lru_cache
from pathlib import Path

import jsonschema

from harness.errors import HarnessError

MAX_MESSAGE = 200  # a violation quotes the offending value: a crafted one could be megabytes


def one_line(text) -> str:
    """`text` on one line, at most MAX_MESSAGE characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicate_keys(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def strict_json_loads(text: str | bytes):
    """json.loads, refusing what Python accepts but JSON does not (NaN, Infinity), duplicate
    keys (which one would win is a guess) and nesting deep enough to exhaust the stack.
    Every problem is a ValueError."""
    try:
        return json.loads(text, parse_constant=_no_constants, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json_file(path: Path, max_bytes: int, what: str):
    """A small JSON file, parsed strictly; HarnessError naming it if it is unreadable,
    larger than `max_bytes` (checked before reading) or not JSON."""
    try:
        with open(path, "rb") as f:
            payload = f.read(max_bytes + 1)
    except OSError as e:
        raise HarnessError(f"{path}: unreadable {what} ({e.strerror or e})") from None
    if len(payload) > max_bytes:
        raise HarnessError(f"{path}: larger than {max_bytes} bytes; not a {what}")
    try:
        return strict_json_loads(payload)
    except ValueError as e:
        raise HarnessError(f"{path}: not valid JSON ({one_line(e)})") from None


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
