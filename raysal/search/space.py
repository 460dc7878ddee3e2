"""Search-space files (`search_spaces/*.yaml`) and their Optuna define-by-run sampler.

Keys are Hydra override paths, so every trial replays with `python -m raysal.train <overrides>`. A `choice` may
map each option to its own sub-space (conditional parameters). Everything is checked at load time with the file and
key named, and `validate_against` checks the keys against the composed Hydra config before any trial starts.

Optuna param names: a key inside an option's sub-space is named after the option path that enables it
(`criterion@criteria.align=kl|criteria.align.weight`), because Optuna forbids one name with two distributions and
sub-spaces of different options often reuse a key. Names never contain '/': Ray's OptunaSearch `unflatten_dict`s the
suggested params on '/', which would nest group keys such as `model/lora` (and fail on `a` next to `a/b`).

This module must not import ray, hydra or wandb: the Tune driver uses it, but it is tested alone.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

if TYPE_CHECKING:
    import optuna


class SearchSpaceError(ValueError):
    """A search-space file is wrong; the message is always `<file>: <key path>: <reason>`."""

    def __init__(self, file: str | Path, key: str, reason: str) -> None:
        # All three go to args so the error survives pickling (Ray ships exceptions between processes).
        super().__init__(str(file), key, reason)
        self.file, self.key, self.reason = str(file), key, reason

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.reason}"


# ---------------------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # "max" | "min"


@dataclass(frozen=True)
class Scheduler:
    type: str  # "asha" | "fifo"
    time_attr: str = "train/step"  # a worker-reported step: Tune's training_iteration restarts on resume
    max_t: int = 100  # Tune's ASHA defaults; a file with `type: asha` must give max_t itself
    grace_period: int = 1
    reduction_factor: int = 3


@dataclass(frozen=True)
class TrialResources:
    num_workers: int = 1
    use_gpu: bool = True
    cpus_per_worker: float = 4
    gpus_per_worker: float = 1


@dataclass(frozen=True)
class Fixed:
    value: Any


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float


@dataclass(frozen=True)
class LogUniform:
    low: float
    high: float


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    step: int = 1
    log: bool = False


@dataclass(frozen=True)
class Option:
    value: Any
    space: Space  # empty for a plain option


@dataclass(frozen=True)
class Choice:
    options: tuple[Option, ...]
    conditional: bool  # written as a mapping option → sub-space


Distribution = Fixed | Uniform | LogUniform | IntRange | Choice


@dataclass(frozen=True)
class Param:
    key: str  # Hydra override key
    dist: Distribution


@dataclass(frozen=True)
class SpaceKey:
    """One override key that a trial can set, the choices that enable it, and its Optuna param name."""

    key: str
    requires: tuple[tuple[str, Any], ...]  # ((choice key, option), ...) from the top down; () = always set
    name: str


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]

    def keys(self) -> tuple[SpaceKey, ...]:
        return tuple(_walk_keys(self, ()))


@dataclass(frozen=True)
class Control:
    """The LM-only control trial: run first, with the search's full budget (never stopped early); the best trial is
    the one with the best objective among trials whose val/lm_loss is within ``lm_tolerance`` of the control's."""

    overrides: tuple[str, ...] = ("~criterion@criteria.align",)
    lm_tolerance: float = 0.02


@dataclass(frozen=True)
class SearchSpec:
    name: str
    path: Path
    objectives: tuple[Objective, ...]
    num_samples: int
    max_concurrent_trials: int | None  # None: derived from cluster resources by the driver
    seed: int | None
    scheduler: Scheduler
    resources: TrialResources
    base_overrides: tuple[str, ...]
    space: Space
    control: Control | None = Control()

    @property
    def metric(self) -> str | list[str]:
        """What OptunaSearch takes: a string for one objective, a list for several."""
        metrics = [o.metric for o in self.objectives]
        return metrics[0] if len(metrics) == 1 else metrics

    @property
    def mode(self) -> str | list[str]:
        modes = [o.mode for o in self.objectives]
        return modes[0] if len(modes) == 1 else modes

    def keys(self) -> tuple[SpaceKey, ...]:
        """Every override key that can appear, with the choice path that enables it (for validation)."""
        return self.space.keys()

    def trial_overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The full Hydra override list of a trial, from the Optuna params Tune hands the trainable."""
        if params.get(CONTROL_KEY) and self.control is not None:
            return [*self.base_overrides, *self.control.overrides]
        return [*self.base_overrides, *(format_override(k, v) for k, v in params_to_overrides(params).items())]


def _walk_keys(space: Space, requires: tuple[tuple[str, Any], ...]) -> Iterator[SpaceKey]:
    for p in space.params:
        yield SpaceKey(p.key, requires, _param_name(requires, p.key))
        if isinstance(p.dist, Choice):
            for opt in p.dist.options:
                yield from _walk_keys(opt.space, (*requires, (p.key, opt.value)))


# ------------------------------------------------------------------------------------------- Hydra override text

_BARE_STRING = re.compile(r"[A-Za-z_][A-Za-z0-9_\-./]*")
# Bare words that Hydra reads as something other than a string.
_NON_STRING_WORDS = {"true", "false", "null", "inf", "nan"}
_DICT_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def _quote(s: str) -> str:
    # Hydra's quoted strings: a quote is escaped with '\', and backslashes only need doubling where they precede
    # a quote or end the string (elsewhere they are literal).
    q = "'" if "'" not in s or '"' in s else '"'
    escaped = re.sub(r"(\\+)(?=" + q + r"|$)", lambda m: m.group(1) * 2, s).replace(q, "\\" + q)
    return q + escaped + q


def _format_value(value: Any) -> str:
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
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = []
        for k, v in value.items():
            if not isinstance(k, str) or not _DICT_KEY.fullmatch(k):
                raise ValueError(f"dict key {k!r} cannot be written as a Hydra override")
            items.append(f"{k}:{_format_value(v)}")
        return "{" + ",".join(items) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a Hydra override value")


def format_override(key: str, value: Any) -> str:
    """`key=value` as Hydra parses it back: lists `[a,b]`, None `null`, lower-case bools, lossless floats, and
    strings quoted where Hydra would otherwise read them as another type or split them."""
    return f"{key}={_format_value(value)}"


# ----------------------------------------------------------------------------------------- Optuna names / values

_SEP = "|"
_ESCAPES = {"%": "%25", "/": "%2F", _SEP: "%7C"}
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}
_JSON_PREFIX = "json:"


def _escape(segment: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in segment)


def _unescape(segment: str) -> str:
    # One pass, so an escaped '%' is never decoded twice.
    return re.sub(r"%(?:25|2F|7C)", lambda m: _UNESCAPES[m.group(0)], segment)


def _param_name(requires: tuple[tuple[str, Any], ...], key: str) -> str:
    segments = [f"{k}={_format_value(v)}" for k, v in requires] + [key]
    return _SEP.join(_escape(s) for s in segments)


def _key_of(name: str) -> str:
    return _unescape(name.rsplit(_SEP, 1)[-1])


def _encode(value: Any) -> Any:
    """A categorical choice as Optuna stores it: None/bool/int/float/str as they are, anything else as JSON text
    (and strings that happen to start with the JSON marker too, so decoding is unambiguous)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str) and not value.startswith(_JSON_PREFIX):
        return value
    return _JSON_PREFIX + json.dumps(value)


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_JSON_PREFIX):
        return json.loads(value[len(_JSON_PREFIX) :])
    return value


# ----------------------------------------------------------------------------------------------------- sampling


def sample(trial: optuna.Trial, spec_or_space: SearchSpec | Space) -> dict[str, Any]:
    """Define-by-run: suggest every active parameter on `trial`; returns {override key: value} for the keys active
    under the chosen options, in file order (a choice's sub-space right after the choice)."""
    space = spec_or_space.space if isinstance(spec_or_space, SearchSpec) else spec_or_space
    out: dict[str, Any] = {}
    _sample_into(trial, space, (), out)
    return out


def _sample_into(trial: Any, space: Space, requires: tuple[tuple[str, Any], ...], out: dict[str, Any]) -> None:
    for p in space.params:
        name = _param_name(requires, p.key)
        d = p.dist
        if isinstance(d, Choice):
            encoded = [_encode(o.value) for o in d.options]
            raw = trial.suggest_categorical(name, encoded)
            option = d.options[encoded.index(raw)]  # options are distinct under ==, checked at load
            out[p.key] = _decode(raw)
            _sample_into(trial, option.space, (*requires, (p.key, option.value)), out)
            continue
        if isinstance(d, Fixed):
            # Recorded as a one-value categorical so the Optuna params (what Tune hands the trainable, and what the
            # storage keeps) are the complete override set; Optuna does not sample single-value distributions.
            value = _decode(trial.suggest_categorical(name, [_encode(d.value)]))
        elif isinstance(d, Uniform):
            value = trial.suggest_float(name, d.low, d.high)
        elif isinstance(d, LogUniform):
            value = trial.suggest_float(name, d.low, d.high, log=True)
        else:
            value = trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
        out[p.key] = value


@dataclass(frozen=True)
class DefineByRun:
    """The `space=` of `ray.tune.search.optuna.OptunaSearch`: picklable (a module-level class holding frozen data).

    Ray 2.60 merges a dict returned by a define-by-run function into the suggested config as constants and then
    `unflatten_dict`s it on '/'; returning the override dict would duplicate every value under a second name and
    nest group keys. So this returns None: the config is exactly the Optuna params, and `params_to_overrides`
    turns it into overrides.
    """

    space: Space

    def __call__(self, trial: optuna.Trial) -> dict[str, bool] | None:
        if trial.user_attrs.get(CONTROL_KEY):  # the enqueued LM-only control: no parameter is sampled
            return {CONTROL_KEY: True}
        sample(trial, self.space)
        return None


def define_by_run(spec: SearchSpec) -> DefineByRun:
    return DefineByRun(spec.space)


CONTROL_KEY = "raysal_control"  # Optuna user attr of the enqueued control trial, and its Tune config


def params_to_overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna trial params (or the config Tune hands the trainable) → {override key: value}."""
    out: dict[str, Any] = {}
    if params.get(CONTROL_KEY):
        return out
    for name, value in _flat_items(params, ""):
        key = _key_of(name)
        if key in out:
            raise ValueError(f"params {name!r} and another both set override {key!r}")
        out[key] = _decode(value)
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


# ------------------------------------------------------------------------------------------------------ loading

_ID = r"[A-Za-z_][A-Za-z0-9_\-]*"
_DOTTED = rf"{_ID}(?:\.(?:{_ID}|[0-9]+))*"
_KEY = rf"(?:{_ID}(?:/{_ID})+|{_DOTTED})(?:@{_DOTTED})?"  # value path, or config group (a/b) with a package
_SPACE_KEY = re.compile(rf"(?:\+\+?)?{_KEY}")
_BASE_OVERRIDE = re.compile(rf"(~{_KEY}(?:=.*)?|(?:\+\+?)?{_KEY}=.*)", re.DOTALL)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_DISTS = ("choice", "uniform", "loguniform", "int")
_TOP_KEYS = (
    "name",
    "control",
    "objectives",
    "num_samples",
    "max_concurrent_trials",
    "seed",
    "scheduler",
    "resources",
    "base_overrides",
    "space",
)
_SCHEDULER_KEYS = ("type", "time_attr", "max_t", "grace_period", "reduction_factor")
_RESOURCE_KEYS = ("num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker")


class _Loader(yaml.SafeLoader):
    """OmegaConf's YAML reading (so values mean what they mean in the Hydra configs): `5e-5` is a float, no
    timestamps; and a duplicate key is an error rather than a silent overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
        |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()
}


_PROFILE_KEYS = ("num_samples", "max_concurrent_trials", "seed", "scheduler", "resources", "base_overrides", "space")


def _apply_profile(path: Path, raw: Any, profile: str | None) -> Any:
    """Merge ``profiles.<profile>`` over the top level: mappings (scheduler, resources, space) key-wise,
    base_overrides appended.

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
        else:
            raw[key] = value
    return raw


def load_search_space(path: str | Path, profile: str | None = None) -> SearchSpec:
    """Read and check a search-space file; every problem is a SearchSpaceError naming the file and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SearchSpaceError(path, "(file)", f"cannot read: {exc}") from exc
    try:
        raw = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(yaml)"
        raise SearchSpaceError(path, where, f"YAML does not parse: {exc}") from exc
    return _Parser(path).spec(_apply_profile(path, raw, profile))


def _where(requires: tuple[tuple[str, Any], ...], key: str) -> str:
    return "space" + "".join(f"[{k}={_format_value(v)}]" for k, v in requires) + f"[{key}]"


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
        )

    def control(self, raw: Any) -> Control | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise self.fail("control", "expected a mapping {overrides, lm_tolerance} or null (no control trial)")
        top = self.mapping(raw, "control", ("overrides", "lm_tolerance"))
        default = Control()
        overrides = default.overrides
        if "overrides" in top:
            overrides = self.base_overrides(top["overrides"], "control.overrides")
        tolerance = self.number(top.get("lm_tolerance", default.lm_tolerance), "control.lm_tolerance", 0.0)
        return Control(overrides, float(tolerance))

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
        return TrialResources(workers, use_gpu, cpus, gpus)

    def base_overrides(self, raw: Any, where: str = "base_overrides") -> tuple[str, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            raise self.fail(where, "expected a list of key=value strings")
        for i, item in enumerate(raw):
            if not isinstance(item, str) or not _BASE_OVERRIDE.fullmatch(item):
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
            kwhere = _where(requires, str(key))
            if not isinstance(key, str) or not _SPACE_KEY.fullmatch(key):
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
            label = _format_value(value) if _is_plain(value) else repr(value)
            owhere = f"{where}[{label}]"
            self.check_value(value, owhere)
            for other in options:
                # Optuna finds a categorical value by ==, so 1, 1.0 and true would be one option.
                if _encode(other.value) == _encode(value):
                    raise self.fail(owhere, f"same option as {_format_value(other.value)} (Optuna compares with ==)")
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
                if not isinstance(k, str) or not _DICT_KEY.fullmatch(k):
                    raise self.fail(where, f"dict key {k!r} cannot be written as a Hydra override")
                self.check_value(v, f"{where}.{k}")
            return
        raise self.fail(where, f"unsupported value type {type(value).__name__}")

    def check_conflicts(self, space: Space, base: tuple[str, ...]) -> None:
        def target(key: str) -> str:
            return key.lstrip("+~").split("=", 1)[0]

        base_targets = {target(o): i for i, o in enumerate(base)}
        seen: dict[str, list[SpaceKey]] = {}
        for sk in _walk_keys(space, ()):
            t = target(sk.key)
            if t in base_targets:
                raise self.fail(_where(sk.requires, sk.key), f"also set by base_overrides[{base_targets[t]}]")
            for other in seen.get(t, []):
                if _compatible(other.requires, sk.requires):
                    raise self.fail(
                        _where(sk.requires, sk.key),
                        f"set twice in one trial (also {_where(other.requires, other.key)})",
                    )
            seen.setdefault(t, []).append(sk)


def _is_plain(value: Any) -> bool:
    try:
        _format_value(value)
    except (TypeError, ValueError):
        return False
    return True


def _compatible(a: tuple[tuple[str, Any], ...], b: tuple[tuple[str, Any], ...]) -> bool:
    """Whether two choice paths can both be active in one trial: they are exclusive only where one choice picks
    different options (equal prefixes mean the same scope, so an equal key there is the same choice)."""
    for (ka, va), (kb, vb) in zip(a, b, strict=False):
        if ka != kb:
            return True
        if _format_value(va) != _format_value(vb):
            return False
    return True


# --------------------------------------------------------------------------------- validation against a config

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
                raise SearchSpaceError(spec.path, _where(requires, p.key), f"{path!r} is not in the config{option}")

    def walk(space: Space, requires: tuple[tuple[str, Any], ...], cfg: DictConfig, enclosing: list) -> None:
        here = enclosing + [(requires, p) for p in space.params]
        check(cfg, [(requires, p) for p in space.params], _with(requires))
        selected = [format_override(k, v) for k, v in requires]
        for p in space.params:
            where = _where(requires, p.key)
            if isinstance(p.dist, Fixed) and _config_path(p.key) is None:
                composed([*base, *selected, format_override(p.key, p.dist.value)], where, f"value {p.dist.value!r}")
            if not isinstance(p.dist, Choice):
                continue
            for opt in p.dist.options:
                sel = (*requires, (p.key, opt.value))
                ocfg = composed(
                    [*base, *(format_override(k, v) for k, v in sel)],
                    where,
                    f"option {_format_value(opt.value)}",
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
