"""Checks a JSON record read back from disk against the fields it may hold: a run dir and a
checkpoint are input like any other (copied from elsewhere, edited, damaged), so what they hold is
checked before it is used, and a bad record is one line that names the file and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

KIND_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list",
              bool: "true or false"}


@dataclass(frozen=True)
class Field:
    """One key of a record: its JSON kind, an inclusive range for numbers, allowed strings."""

    kind: type
    low: float | None = None
    high: float | None = None
    required: bool = True
    choices: tuple[str, ...] = ()


def _kind_ok(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_record(tree: Any, fields: dict[str, Field], where: str, error: type[Exception]) -> dict:
    """`tree` if it is an object with only `fields`, each of its kind and in its range; else
    `error` with one line naming `where` (the file) and the first bad key."""
    if not isinstance(tree, dict):
        raise error(f"{where} holds {KIND_NAMES.get(type(tree), type(tree).__name__)}, not an object; "
                    "it was not written by this program")
    if unknown := sorted(set(tree) - set(fields)):
        raise error(f"{where} has unknown key(s) {', '.join(map(str, unknown))}; it was not written by this version")
    if missing := [k for k, f in fields.items() if f.required and k not in tree]:
        raise error(f"{where} lacks {', '.join(missing)}; it is damaged or from another version")
    for key, value in tree.items():
        field = fields[key]
        if not _kind_ok(value, field.kind):
            raise error(f"{where}: {key}={value!r:.60} is not {KIND_NAMES[field.kind]}")
        if (field.low is not None and value < field.low) or (field.high is not None and value > field.high):
            bounds = f"[{field.low if field.low is not None else '-inf'}, {field.high if field.high is not None else 'inf'}]"
            raise error(f"{where}: {key}={value!r} is outside {bounds}")
        if field.choices and value not in field.choices:
            raise error(f"{where}: {key}={value!r:.60} is not one of {', '.join(field.choices)}")
    return tree
