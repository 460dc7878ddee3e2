"""A search space checked against the composed Hydra config before any trial starts: every key a trial can set
exists under the options that enable it, and every option composes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from raysal.search.override_text import format_override, format_value
from raysal.search.space import Choice, Fixed, Param, SearchSpaceError, SearchSpec, Space, key_where

_ABSENT = object()


def _config_path(key: str) -> str | None:
    """The config node a value override sets, or None where composing is the only proof: `+` adds a key that need
    not exist (`++` adds or overrides), and a config group (`criterion@criteria.align`, `model/lora`) is proven by
    composing each of its values (an option may be null, or the group may be absent from the defaults)."""
    if key.startswith("+") or "@" in key or "/" in key:
        return None
    return key


def _exists(cfg: DictConfig, path: str) -> bool:
    # Not `select(...) is not default`: select returns the default for ??? values and broken interpolations too,
    # and those keys do exist.
    parent_path, _, last = path.rpartition(".")
    parent = (
        OmegaConf.select(cfg, parent_path, default=_ABSENT, throw_on_missing=False, throw_on_resolution_failure=False)
        if parent_path
        else cfg
    )
    if isinstance(parent, DictConfig):
        return last in parent.keys()  # noqa: SIM118 - `in` on a DictConfig is False for ??? values
    if isinstance(parent, ListConfig):
        return last.isdigit() and int(last) < len(parent)
    return False


def validate_against(spec: SearchSpec, compose: Callable[[list[str]], Any]) -> None:
    """Check the space against the real config before any trial starts.

    `compose(overrides)` returns the composed DictConfig or raises. For the base overrides and for every choice
    option (with the options above it), compose and check that each key enabled there exists; group keys
    (`criterion@criteria.align`) are checked by composing each option. Raises SearchSpaceError naming key and option.
    """
    base = list(spec.base_overrides)

    def composed(overrides: list[str], where: str, what: str) -> DictConfig:
        try:
            cfg = compose(overrides)
        except Exception as exc:  # whatever Hydra raises, the user needs the key and option
            raise SearchSpaceError(spec.path, where, f"{what} does not compose: {type(exc).__name__}: {exc}") from exc
        return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)

    def check(cfg: DictConfig, params: list[tuple[tuple[tuple[str, Any], ...], Param]], option: str) -> None:
        for requires, p in params:
            path = _config_path(p.key)
            if path is not None and not _exists(cfg, path):
                raise SearchSpaceError(spec.path, key_where(requires, p.key), f"{path!r} is not in the config{option}")

    def walk(space: Space, requires: tuple[tuple[str, Any], ...], cfg: DictConfig, enclosing: list) -> None:
        here = enclosing + [(requires, p) for p in space.params]
        check(cfg, [(requires, p) for p in space.params], _with(requires))
        selected = [format_override(k, v) for k, v in requires]
        for p in space.params:
            where = key_where(requires, p.key)
            if isinstance(p.dist, Fixed) and _config_path(p.key) is None:
                composed([*base, *selected, format_override(p.key, p.dist.value)], where, f"value {p.dist.value!r}")
            if not isinstance(p.dist, Choice):
                continue
            for opt in p.dist.options:
                sel = (*requires, (p.key, opt.value))
                ocfg = composed(
                    [*base, *(format_override(k, v) for k, v in sel)],
                    where,
                    f"option {format_value(opt.value)}",
                )
                # The keys set around this choice must survive each option (a group option replaces a node); the
                # selected choice keys themselves are proven by composing (an option may be null: group removed).
                chosen = {k for k, _ in sel}
                check(ocfg, [(r, q) for r, q in here if q.key not in chosen], _with(sel))
                walk(opt.space, sel, ocfg, here)

    walk(spec.space, (), composed(base, "base_overrides", "the base overrides"), [])


def _with(requires: tuple[tuple[str, Any], ...]) -> str:
    if not requires:
        return ""
    return " composed with " + " ".join(format_override(k, v) for k, v in requires)
