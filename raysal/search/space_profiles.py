"""Profiles of a search-space file: `profiles.<name>` merged over the top level (`experiment=demo` selects
`profiles.demo`, which sizes a GPU-cluster search for a laptop)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raysal.search.space import SearchSpaceError

_PROFILE_KEYS = (
    "num_samples", "max_concurrent_trials", "seed", "scheduler", "resources", "base_overrides", "space", "control",
    "finalists",
)  # fmt: skip


def apply_profile(path: Path, raw: Any, profile: str | None) -> Any:
    """Merge ``profiles.<profile>`` over the top level: mappings (scheduler, resources, space, control, finalists)
    key-wise, base_overrides appended; a space key the profile sets to null leaves the space (the trials take the
    base config's value, as the control does).

    A file is sized for a GPU cluster; its ``profiles.demo`` (selected by ``experiment=demo``) sizes the same
    search for a laptop. A profile the file does not define changes nothing.
    """
    if not isinstance(raw, dict) or "profiles" not in raw:
        return raw
    raw = dict(raw)
    profiles = raw.pop("profiles")
    if not isinstance(profiles, dict):
        raise SearchSpaceError(path, "profiles", "expected a mapping of profile name → settings")
    for name, body in profiles.items():
        if not isinstance(body, dict):
            raise SearchSpaceError(path, f"profiles.{name}", "expected a mapping")
        unknown = [k for k in body if k not in _PROFILE_KEYS]
        if unknown:
            raise SearchSpaceError(
                path, f"profiles.{name}.{unknown[0]}", f"unknown key (known: {', '.join(_PROFILE_KEYS)})"
            )
    for key, value in (profiles.get(profile) or {}).items():
        if key == "base_overrides":  # a profile's override replaces the file's override of the same key
            mine = {str(o).split("=", 1)[0] for o in value}
            raw[key] = [o for o in raw.get(key) or [] if str(o).split("=", 1)[0] not in mine] + list(value)
        elif isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
            if key == "space":  # a profile's `key: null` takes the key out of the space (the base config's value)
                raw[key] = {k: v for k, v in raw[key].items() if not (k in value and value[k] is None)}
        else:
            raw[key] = value
    return raw
