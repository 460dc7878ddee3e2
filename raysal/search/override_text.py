"""Hydra override text: `key=value` written so Hydra parses it back to the same value.

Every trial is replayed with `python -m raysal.train <overrides>`, so the text must be lossless: lists `[a,b]`,
None `null`, lower-case bools, shortest round-trip floats, and strings quoted wherever Hydra would read them as
another type or split them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_BARE_STRING = re.compile(r"[A-Za-z_][A-Za-z0-9_\-./]*")
# Bare words that Hydra reads as something other than a string.
_NON_STRING_WORDS = {"true", "false", "null", "inf", "nan"}
DICT_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def _quote(s: str) -> str:
    # Hydra's quoted strings: a quote is escaped with '\', and backslashes only need doubling where they precede
    # a quote or end the string (elsewhere they are literal).
    q = "'" if "'" not in s or '"' in s else '"'
    escaped = re.sub(r"(\\+)(?=" + q + r"|$)", lambda m: m.group(1) * 2, s).replace(q, "\\" + q)
    return q + escaped + q


def format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest text that reads back to the same float (5e-05, 0.1, 2.0)
    if isinstance(value, str):
        if _BARE_STRING.fullmatch(value) and value.lower() not in _NON_STRING_WORDS:
            return value
        return _quote(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = []
        for k, v in value.items():
            if not isinstance(k, str) or not DICT_KEY.fullmatch(k):
                raise ValueError(f"dict key {k!r} cannot be written as a Hydra override")
            items.append(f"{k}:{format_value(v)}")
        return "{" + ",".join(items) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a Hydra override value")


def format_override(key: str, value: Any) -> str:
    """`key=value` as Hydra parses it back: lists `[a,b]`, None `null`, lower-case bools, lossless floats, and
    strings quoted where Hydra would otherwise read them as another type or split them. A config group (`a/b`,
    `group@package`) set to None is removed, `~key` (Hydra accepts no `group=null`): a choice may leave a slot
    empty (`criterion@criteria.vision: {choice: {null: {}, maskembed: {...}}}`)."""
    if value is None and ("@" in key or "/" in key):
        return f"~{key.lstrip('+')}"
    return f"{key}={format_value(value)}"


# the keys of a Hydra override: a value path, or a config group (a/b) with a package (@pkg)
_ID = r"[A-Za-z_][A-Za-z0-9_\-]*"
_DOTTED = rf"{_ID}(?:\.(?:{_ID}|[0-9]+))*"
_KEY = rf"(?:{_ID}(?:/{_ID})+|{_DOTTED})(?:@{_DOTTED})?"  # value path, or config group (a/b) with a package
SPACE_KEY = re.compile(rf"(?:\+\+?)?{_KEY}")
BASE_OVERRIDE = re.compile(rf"(~{_KEY}(?:=.*)?|(?:\+\+?)?{_KEY}=.*)", re.DOTALL)


def is_plain(value: Any) -> bool:
    try:
        format_value(value)
    except (TypeError, ValueError):
        return False
    return True
