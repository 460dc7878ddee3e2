"""The Optuna define-by-run sampler of a search space: every active parameter suggested on the trial, a choice's
sub-space only under the option drawn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raysal.search.optuna_params import CONTROL_KEY, decode_option, encode_option, param_name
from raysal.search.space import Choice, Fixed, LogUniform, SearchSpec, Space, Uniform

if TYPE_CHECKING:
    import optuna


def sample(trial: optuna.Trial, spec_or_space: SearchSpec | Space) -> dict[str, Any]:
    """Define-by-run: suggest every active parameter on `trial`; returns {override key: value} for the keys active
    under the chosen options, in file order (a choice's sub-space right after the choice)."""
    space = spec_or_space.space if isinstance(spec_or_space, SearchSpec) else spec_or_space
    out: dict[str, Any] = {}
    _sample_into(trial, space, (), out)
    return out


def _sample_into(trial: Any, space: Space, requires: tuple[tuple[str, Any], ...], out: dict[str, Any]) -> None:
    for p in space.params:
        name = param_name(requires, p.key)
        d = p.dist
        if isinstance(d, Choice):
            encoded = [encode_option(o.value) for o in d.options]
            raw = trial.suggest_categorical(name, encoded)
            option = d.options[encoded.index(raw)]  # options are distinct under ==, checked at load
            out[p.key] = decode_option(raw)
            _sample_into(trial, option.space, (*requires, (p.key, option.value)), out)
            continue
        if isinstance(d, Fixed):
            # Recorded as a one-value categorical so the Optuna params (what Tune hands the trainable, and what the
            # storage keeps) are the complete override set; Optuna does not sample single-value distributions.
            value = decode_option(trial.suggest_categorical(name, [encode_option(d.value)]))
        elif isinstance(d, Uniform):
            value = trial.suggest_float(name, d.low, d.high)
        elif isinstance(d, LogUniform):
            value = trial.suggest_float(name, d.low, d.high, log=True)
        else:
            value = trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
        out[p.key] = value


def _contains(d: Any, value: Any) -> bool:
    if isinstance(d, Choice):
        return encode_option(value) in [encode_option(o.value) for o in d.options]
    if isinstance(d, Fixed):
        return encode_option(value) == encode_option(d.value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(d, Uniform | LogUniform):
        return d.low <= value <= d.high
    return d.low <= value <= d.high and float(value).is_integer() and (value - d.low) % d.step == 0


def fixed_values(space: Space, values: dict[str, Any]) -> dict[str, Any]:
    """{Optuna name: value as Optuna stores it} for the space's top-level parameters whose value in ``values``
    ({override key: value}, e.g. the control's config) their distribution contains: what the LM-only control is
    enqueued with, so that the study's plots and importance evaluators see it among the trials."""
    out: dict[str, Any] = {}
    for p in space.params:
        if p.key in values and values[p.key] is not None and _contains(p.dist, values[p.key]):
            v = values[p.key]
            out[param_name((), p.key)] = encode_option(v) if isinstance(p.dist, Choice | Fixed) else v
    return out


def _suggest_fixed(trial: Any, space: Space, fixed: dict[str, Any]) -> None:
    """Suggest the top-level parameters ``fixed`` names on the control: Optuna returns the enqueued values and
    records them as the trial's parameters."""
    for p in space.params:
        name = param_name((), p.key)
        if name not in fixed:
            continue
        d = p.dist
        if isinstance(d, Choice):
            trial.suggest_categorical(name, [encode_option(o.value) for o in d.options])
        elif isinstance(d, Fixed):
            trial.suggest_categorical(name, [encode_option(d.value)])
        elif isinstance(d, Uniform):
            trial.suggest_float(name, d.low, d.high)
        elif isinstance(d, LogUniform):
            trial.suggest_float(name, d.low, d.high, log=True)
        else:
            trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)


@dataclass(frozen=True)
class DefineByRun:
    """The `space=` of `ray.tune.search.optuna.OptunaSearch`: picklable (a module-level class holding frozen data).

    Ray 2.60 merges a dict returned by a define-by-run function into the suggested config as constants and then
    `unflatten_dict`s it on '/'; returning the override dict would duplicate every value under a second name and
    nest group keys. So this returns None: the config is exactly the Optuna params, and `params_to_overrides`
    turns it into overrides.
    """

    space: Space
    control: tuple[tuple[str, Any], ...] = ()  # the control's fixed parameters (`fixed_values`)

    def __call__(self, trial: optuna.Trial) -> dict[str, bool] | None:
        if trial.user_attrs.get(CONTROL_KEY):  # the enqueued LM-only control: nothing sampled, its values recorded
            _suggest_fixed(trial, self.space, dict(self.control))
            return {CONTROL_KEY: True}
        sample(trial, self.space)
        return None


def define_by_run(spec: SearchSpec, control: dict[str, Any] | None = None) -> DefineByRun:
    """``control``: the control's fixed parameters (`fixed_values`), recorded on it when it runs."""
    return DefineByRun(spec.space, tuple(sorted((control or {}).items())))
