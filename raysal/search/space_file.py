"""Reading a search-space file (`search_spaces/*.yaml`): YAML as OmegaConf reads it, the selected profile merged,
every value checked with the file and key named (`SearchSpaceError`)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf._utils import get_yaml_loader

from raysal.search.optuna_params import encode_option
from raysal.search.override_text import BASE_OVERRIDE, DICT_KEY, SPACE_KEY, format_value, is_plain
from raysal.search.space import (
    Choice,
    Control,
    Distribution,
    Finalists,
    Fixed,
    IntRange,
    LogUniform,
    Objective,
    Option,
    Param,
    Scheduler,
    SearchSpaceError,
    SearchSpec,
    Space,
    SpaceKey,
    TrialResources,
    Uniform,
    compatible,
    key_where,
    shared_gpu_reason,
    walk_keys,
)
from raysal.search.space_control import parse_control, parse_finalists
from raysal.search.space_profiles import apply_profile

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_DISTS = ("choice", "uniform", "loguniform", "int")
_TOP_KEYS = ("name", "control", "objectives", "num_samples", "max_concurrent_trials", "seed", "scheduler", "resources",
             "base_overrides", "space", "optuna_storage", "finalists")  # fmt: skip
_SCHEDULER_KEYS = ("type", "time_attr", "max_t", "grace_period", "reduction_factor")
_RESOURCE_KEYS = ("num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker")


def load_search_space(path: str | Path, profile: str | None = None) -> SearchSpec:
    """Read and check a search-space file; every problem is a SearchSpaceError naming the file and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SearchSpaceError(path, "(file)", f"cannot read: {exc}") from exc
    try:
        # OmegaConf's own YAML loader (what OmegaConf.load and so Hydra read configs with), so values mean what
        # they mean in the configs (`5e-5` a float, no timestamps) and a duplicate key is an error. Not
        # OmegaConf.create: its DictConfig refuses null keys, and a null option may hold a sub-space.
        raw = yaml.load(text, Loader=get_yaml_loader())  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(yaml)"
        raise SearchSpaceError(path, where, f"YAML does not parse: {exc}") from exc
    return _Parser(path).spec(apply_profile(path, raw, profile))


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


class _Parser:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, reason: str) -> SearchSpaceError:
        return SearchSpaceError(self.path, where, reason)

    def mapping(self, raw: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.fail(where, f"expected a mapping, got {type(raw).__name__}")
        unknown = [k for k in raw if k not in allowed]
        if unknown:
            raise self.fail(
                f"{where}.{unknown[0]}" if where else str(unknown[0]), f"unknown key (known: {', '.join(allowed)})"
            )
        return raw

    def integer(self, raw: Any, where: str, minimum: int | None = None) -> int:
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise self.fail(where, f"expected an integer, got {raw!r}")
        if minimum is not None and raw < minimum:
            raise self.fail(where, f"must be >= {minimum}, got {raw}")
        return raw

    def number(self, raw: Any, where: str, minimum: float | None = None) -> float:
        if not _is_number(raw):
            raise self.fail(where, f"expected a number, got {raw!r}")
        if minimum is not None and raw < minimum:
            raise self.fail(where, f"must be >= {minimum}, got {raw}")
        return raw

    def string(self, raw: Any, where: str) -> str:
        if not isinstance(raw, str) or not raw:
            raise self.fail(where, f"expected a non-empty string, got {raw!r}")
        return raw

    # -- top level

    def spec(self, raw: Any) -> SearchSpec:
        if not isinstance(raw, dict):
            raise self.fail("(top level)", f"expected a mapping, got {type(raw).__name__}")
        top = self.mapping(raw, "", _TOP_KEYS)
        for required in ("objectives", "num_samples", "space"):
            if required not in top:
                raise self.fail(required, "required")
        name = top.get("name", self.path.stem)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise self.fail("name", f"must be a folder-safe name (letters, digits, _ . -), got {name!r}")
        objectives = self.objectives(top["objectives"])
        num_samples = self.integer(top["num_samples"], "num_samples", 1)
        mct = top.get("max_concurrent_trials")
        max_concurrent = None if mct is None else self.integer(mct, "max_concurrent_trials", 1)
        seed = top.get("seed", 0)
        if seed is not None:
            self.integer(seed, "seed")
        scheduler = self.scheduler(top.get("scheduler"), objectives)
        resources = self.resources(top.get("resources"))
        base = self.base_overrides(top.get("base_overrides"))
        space = self.space(top["space"], (), "space")
        if not space.params:
            raise self.fail("space", "empty: nothing to search")
        self.check_conflicts(space, base)
        control = self.control(top.get("control", {}))
        finalists = self.finalists(top.get("finalists", {} if control is not None else None), control)
        study = top.get("optuna_storage")
        if study is not None:
            study = self.rdb_url(study, "optuna_storage")
        return SearchSpec(
            name=name,
            path=self.path,
            objectives=objectives,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent,
            seed=seed,
            scheduler=scheduler,
            resources=resources,
            base_overrides=base,
            space=space,
            control=control,
            finalists=finalists,
            optuna_storage=study,
        )

    def rdb_url(self, raw: Any, where: str) -> str:
        """A SQLAlchemy database URL for the Optuna study (``postgresql://user:pw@host/db``)."""
        url = self.string(raw, where)
        if not re.match(r"^[a-z][a-z0-9+]*://", url):
            raise self.fail(where, f"must be a database URL such as postgresql://user:password@host:5432/db, got "
                                   f"{url!r}")  # fmt: skip
        return url

    def control(self, raw: Any) -> Control | None:
        return parse_control(self, raw)

    def finalists(self, raw: Any, control: Control | None) -> Finalists | None:
        return parse_finalists(self, raw, control)

    def objectives(self, raw: Any) -> tuple[Objective, ...]:
        if not isinstance(raw, list) or not raw:
            raise self.fail("objectives", "expected a non-empty list of {metric, mode}")
        out = []
        for i, item in enumerate(raw):
            where = f"objectives[{i}]"
            m = self.mapping(item, where, ("metric", "mode"))
            if "metric" not in m or "mode" not in m:
                raise self.fail(where, "needs both metric and mode")
            metric = self.string(m["metric"], f"{where}.metric")
            if m["mode"] not in ("max", "min"):
                raise self.fail(f"{where}.mode", f"must be max or min, got {m['mode']!r}")
            if any(o.metric == metric for o in out):
                raise self.fail(f"{where}.metric", f"{metric!r} is listed twice")
            out.append(Objective(metric, m["mode"]))
        return tuple(out)

    def scheduler(self, raw: Any, objectives: tuple[Objective, ...]) -> Scheduler:
        if raw is None:
            return Scheduler("fifo")
        m = self.mapping(raw, "scheduler", _SCHEDULER_KEYS)
        kind = m.get("type")
        if kind not in ("asha", "fifo"):
            raise self.fail("scheduler.type", f"must be asha or fifo, got {kind!r}")
        if kind == "asha" and len(objectives) > 1:
            raise self.fail("scheduler.type", "asha stops trials on one metric; use fifo with several objectives")
        if kind == "asha" and "max_t" not in m:
            # Tune's default (100) would silently cut every trial short; it must match the trainer's max steps.
            raise self.fail("scheduler.max_t", "required for asha (the time_attr value a full trial reaches)")
        default = Scheduler(kind)
        time_attr = self.string(m.get("time_attr", default.time_attr), "scheduler.time_attr")
        max_t = self.integer(m.get("max_t", default.max_t), "scheduler.max_t", 1)
        grace = self.integer(m.get("grace_period", default.grace_period), "scheduler.grace_period", 1)
        if grace > max_t:
            raise self.fail("scheduler.grace_period", f"{grace} exceeds max_t {max_t}")
        rf = self.integer(m.get("reduction_factor", default.reduction_factor), "scheduler.reduction_factor", 2)
        return Scheduler(kind, time_attr, max_t, grace, rf)

    def resources(self, raw: Any) -> TrialResources:
        if raw is None:
            return TrialResources()
        m = self.mapping(raw, "resources", _RESOURCE_KEYS)
        workers = self.integer(m.get("num_workers", 1), "resources.num_workers", 1)
        use_gpu = m.get("use_gpu", True)
        if not isinstance(use_gpu, bool):
            raise self.fail("resources.use_gpu", f"expected true or false, got {use_gpu!r}")
        cpus = self.number(m.get("cpus_per_worker", 4), "resources.cpus_per_worker", 0)
        gpus = self.number(m.get("gpus_per_worker", 1 if use_gpu else 0), "resources.gpus_per_worker", 0)
        if use_gpu and gpus == 0:
            raise self.fail("resources.gpus_per_worker", "use_gpu is true but no GPU is requested")
        if not use_gpu and gpus > 0:
            raise self.fail("resources.gpus_per_worker", "GPUs requested with use_gpu: false")
        if use_gpu and workers > 1 and gpus <= 0.5:
            raise self.fail("resources.gpus_per_worker", shared_gpu_reason(gpus=gpus, workers=workers))
        return TrialResources(workers, use_gpu, cpus, gpus)

    def base_overrides(self, raw: Any, where: str = "base_overrides") -> tuple[str, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            raise self.fail(where, "expected a list of key=value strings")
        for i, item in enumerate(raw):
            if not isinstance(item, str) or not BASE_OVERRIDE.fullmatch(item):
                raise self.fail(f"{where}[{i}]", f"expected a key=value Hydra override, got {item!r}")
        return tuple(raw)

    # -- space

    def space(self, raw: Any, requires: tuple[tuple[str, Any], ...], where: str) -> Space:
        if raw is None:
            return Space(())
        if not isinstance(raw, dict):
            raise self.fail(where, f"expected a mapping of override keys, got {type(raw).__name__}")
        params = []
        for key, value in raw.items():
            kwhere = key_where(requires, str(key))
            if not isinstance(key, str) or not SPACE_KEY.fullmatch(key):
                raise self.fail(kwhere, "not a Hydra override path (e.g. optim.lr, criterion@criteria.align, +x.y)")
            params.append(Param(key, self.dist(value, key, requires, kwhere)))
        return Space(tuple(params))

    def dist(self, raw: Any, key: str, requires: tuple[tuple[str, Any], ...], where: str) -> Distribution:
        if not isinstance(raw, dict):
            self.check_value(raw, where)
            return Fixed(raw)
        if len(raw) != 1:
            raise self.fail(where, f"expected one of {', '.join(_DISTS)} or a plain value, got keys {list(raw)}")
        ((kind, arg),) = raw.items()
        if kind not in _DISTS:
            raise self.fail(f"{where}.{kind}", f"unknown distribution type (known: {', '.join(_DISTS)})")
        where = f"{where}.{kind}"
        if kind == "choice":
            return self.choice(arg, key, requires, where)
        if kind == "int":
            return self.int_range(arg, where)
        low, high = self.bounds(arg, where, ("low", "high"))
        for name, v in (("low", low), ("high", high)):
            if not _is_number(v) or math.isinf(v):
                raise self.fail(f"{where}.{name}", f"expected a finite number, got {v!r}")
        if low > high:
            raise self.fail(where, f"low {low} > high {high}")
        if kind == "loguniform":
            if low <= 0:
                raise self.fail(f"{where}.low", f"loguniform needs low > 0, got {low}")
            return LogUniform(float(low), float(high))
        return Uniform(float(low), float(high))

    def bounds(self, arg: Any, where: str, allowed: tuple[str, ...]) -> tuple[Any, ...]:
        if isinstance(arg, list):
            if len(arg) != 2:
                raise self.fail(where, f"expected [low, high], got {arg!r}")
            return tuple(arg)
        m = self.mapping(arg, where, allowed)
        for name in ("low", "high"):
            if name not in m:
                raise self.fail(f"{where}.{name}", "required")
        return tuple(m.get(name) for name in allowed)

    def int_range(self, arg: Any, where: str) -> IntRange:
        if isinstance(arg, list):
            low, high = self.bounds(arg, where, ("low", "high"))
            step, log = 1, False
        else:
            low, high, step, log = self.bounds(arg, where, ("low", "high", "step", "log"))
            step = 1 if step is None else self.integer(step, f"{where}.step", 1)
            log = False if log is None else log
            if not isinstance(log, bool):
                raise self.fail(f"{where}.log", f"expected true or false, got {log!r}")
        low = self.integer(low, f"{where}.low")
        high = self.integer(high, f"{where}.high")
        if low > high:
            raise self.fail(where, f"low {low} > high {high}")
        if log and step != 1:
            raise self.fail(where, "Optuna cannot combine log with a step other than 1")
        if log and low < 1:
            raise self.fail(f"{where}.low", f"log needs low >= 1, got {low}")
        if (high - low) % step:
            # Optuna would quietly lower high to the last step; say so instead.
            raise self.fail(where, f"high - low ({high - low}) is not a multiple of step {step}")
        return IntRange(low, high, step, log)

    def choice(self, arg: Any, key: str, requires: tuple[tuple[str, Any], ...], where: str) -> Choice:
        if isinstance(arg, list):
            values, subspaces = list(arg), [None] * len(arg)
        elif isinstance(arg, dict):
            values, subspaces = list(arg), list(arg.values())
        else:
            raise self.fail(where, "expected a list of values or a mapping option → sub-space")
        if not values:
            raise self.fail(where, "empty: needs at least one option")
        options: list[Option] = []
        for value, sub in zip(values, subspaces, strict=True):
            label = format_value(value) if is_plain(value) else repr(value)
            owhere = f"{where}[{label}]"
            self.check_value(value, owhere)
            for other in options:
                # Optuna finds a categorical value by ==, so 1, 1.0 and true would be one option.
                if encode_option(other.value) == encode_option(value):
                    raise self.fail(owhere, f"same option as {format_value(other.value)} (Optuna compares with ==)")
            if isinstance(arg, dict):
                if isinstance(value, list | dict):
                    raise self.fail(owhere, "an option with a sub-space must be a plain value")
                space = self.space(sub, (*requires, (key, value)), owhere)
            else:
                space = Space(())
            options.append(Option(value, space))
        return Choice(tuple(options), isinstance(arg, dict))

    def check_value(self, value: Any, where: str) -> None:
        """Values must survive JSON (how lists reach Optuna) and Hydra override text."""
        if value is None or isinstance(value, bool | int | str):
            return
        if isinstance(value, float):
            if math.isnan(value):
                raise self.fail(where, "nan is not a usable value")
            return
        if isinstance(value, list):
            for i, v in enumerate(value):
                self.check_value(v, f"{where}[{i}]")
            return
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str) or not DICT_KEY.fullmatch(k):
                    raise self.fail(where, f"dict key {k!r} cannot be written as a Hydra override")
                self.check_value(v, f"{where}.{k}")
            return
        raise self.fail(where, f"unsupported value type {type(value).__name__}")

    def check_conflicts(self, space: Space, base: tuple[str, ...]) -> None:
        def target(key: str) -> str:
            return key.lstrip("+~").split("=", 1)[0]

        base_targets = {target(o): i for i, o in enumerate(base)}
        seen: dict[str, list[SpaceKey]] = {}
        for sk in walk_keys(space, ()):
            t = target(sk.key)
            if t in base_targets:
                raise self.fail(key_where(sk.requires, sk.key), f"also set by base_overrides[{base_targets[t]}]")
            for other in seen.get(t, []):
                if compatible(other.requires, sk.requires):
                    raise self.fail(
                        key_where(sk.requires, sk.key),
                        f"set twice in one trial (also {key_where(other.requires, other.key)})",
                    )
            seen.setdefault(t, []).append(sk)
