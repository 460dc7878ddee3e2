"""Optuna parameter names and values for search-space keys, and the way back to Hydra overrides.

A key inside an option's sub-space is named after the option path that enables it
(`criterion@criteria.align=kl|criteria.align.weight`), because Optuna forbids one name with two distributions and
sub-spaces of different options often reuse a key. Names never contain '/': Ray's OptunaSearch `unflatten_dict`s the
suggested params on '/', which would nest group keys such as `model/lora` (and fail on `a` next to `a/b`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from raysal.search.override_text import format_value

_SEP = "|"
_ESCAPES = {"%": "%25", "/": "%2F", _SEP: "%7C"}
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}
_JSON_PREFIX = "json:"


def _escape(segment: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in segment)


def _unescape(segment: str) -> str:
    # One pass, so an escaped '%' is never decoded twice.
    return re.sub(r"%(?:25|2F|7C)", lambda m: _UNESCAPES[m.group(0)], segment)


def param_name(requires: tuple[tuple[str, Any], ...], key: str) -> str:
    """The Optuna name of `key` under the choices `requires` ((choice key, option), ... from the top down)."""
    segments = [f"{k}={format_value(v)}" for k, v in requires] + [key]
    return _SEP.join(_escape(s) for s in segments)


def key_of(name: str) -> str:
    """The override key an Optuna name stands for."""
    return _unescape(name.rsplit(_SEP, 1)[-1])


def encode_option(value: Any) -> Any:
    """A categorical choice as Optuna stores it: None/bool/int/float/str as they are, anything else as JSON text
    (and strings that happen to start with the JSON marker too, so decoding is unambiguous)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str) and not value.startswith(_JSON_PREFIX):
        return value
    return _JSON_PREFIX + json.dumps(value)


def decode_option(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_JSON_PREFIX):
        return json.loads(value[len(_JSON_PREFIX) :])
    return value


CONTROL_KEY = "raysal_control"  # Optuna user attr of the enqueued control trial, and its Tune config


def params_to_overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna trial params (or the config Tune hands the trainable) → {override key: value}."""
    out: dict[str, Any] = {}
    if params.get(CONTROL_KEY):
        return out
    for name, value in _flat_items(params, ""):
        key = key_of(name)
        if key in out:
            raise ValueError(f"params {name!r} and another both set override {key!r}")
        out[key] = decode_option(value)
    return out


def _flat_items(params: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    # Our names hold no '/', so Tune's unflatten_dict leaves them flat; a nested mapping can only come from names
    # with '/', which Ray split, so join them back the same way.
    for k, v in params.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            yield from _flat_items(v, name)
        else:
            yield name, v
