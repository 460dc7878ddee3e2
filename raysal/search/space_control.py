"""A space file's ``control`` (the LM-only control, its LM tolerance, its guards' margins and the search's
screening margins) and ``finalists`` (how many are confirmed, over how many seeds), read and checked with the key
named (`raysal.search.space_file`'s parser, ``parser``)."""

from __future__ import annotations

from typing import Any

from raysal.search.guards import Guard, direction
from raysal.search.space import Control, Finalists


def parse_control(parser: Any, raw: Any) -> Control | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise parser.fail("control", "expected a mapping {overrides, lm_tolerance, guards} or null (no control)")
    top = parser.mapping(raw, "control", ("overrides", "lm_tolerance", "guards", "screening"))
    default = Control()
    overrides = default.overrides
    if "overrides" in top:
        overrides = parser.base_overrides(top["overrides"], "control.overrides")
    tolerance = parser.number(top.get("lm_tolerance", default.lm_tolerance), "control.lm_tolerance", 0.0)
    guards = parse_guards(parser, top.get("guards"))
    screening = None
    if top.get("screening") is not None:
        screening = parse_guards(parser, top["screening"], "control.screening")
        extra = sorted({g.metric for g in screening} - {g.metric for g in guards})
        if extra:
            raise parser.fail(f"control.screening.{extra[0]}", "screens a metric control.guards does not guard")
        narrower = [s for s in screening for g in guards if s.metric == g.metric and s.max_loss < g.max_loss]
        if narrower:
            raise parser.fail(f"control.screening.{narrower[0].metric}", "a screening margin narrower than the "
                            "guard's: the search would exclude trials the confirmation would accept")  # fmt: skip
    return Control(overrides, float(tolerance), guards, screening)


def parse_finalists(parser: Any, raw: Any, control: Control | None) -> Finalists | None:
    if raw is None:
        return None
    top = parser.mapping(raw, "finalists", ("top_k", "seeds"))
    default = Finalists()
    if control is None:
        raise parser.fail("finalists", "finalists are confirmed against matched controls: the file needs a control "
                        "(or finalists: null)")  # fmt: skip
    top_k = parser.integer(top.get("top_k", default.top_k), "finalists.top_k", 1)
    # one seed puts seed variance in no interval: a finalist is confirmed over two seeds at least
    seeds = parser.integer(top.get("seeds", default.seeds), "finalists.seeds", 2)
    return Finalists(top_k, seeds)


def parse_guards(parser: Any, raw: Any, key: str = "control.guards") -> tuple[Guard, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise parser.fail(key, "expected a mapping {metric: largest allowed loss against the control}")
    out = []
    for metric, loss in raw.items():
        where = f"{key}.{metric}"
        try:
            direction(str(metric))
        except ValueError as e:
            raise parser.fail(where, str(e)) from None
        out.append(Guard(str(metric), float(parser.number(loss, where, 0.0))))
    return tuple(out)
