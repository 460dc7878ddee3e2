"""The validation metrics beyond LM loss and attention mass, for a Train worker: POPE (``val/pope/*``, the
hallucination probe) and the localisation readout (``val/rec_acc50``, ``val/rec_miou``), each on a fixed set of
validation images chosen from the data alone (`raysal.data.pope_set`, `raysal.probes.probe_set`), so that every
trial, resume and rank of a search measures the same thing. Rank 0 records what was asked in the run folder."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from raysal import storage
from raysal.attention.capture import CapturePlan
from raysal.data.holdout import Holdout, holdout_for
from raysal.data.pope_set import PopeSet, select_pope
from raysal.loop.fit import ExtraEval
from raysal.loop.pope_eval import pope_scores
from raysal.loop.readout_eval import readout_scores
from raysal.metrics.pope import SETTINGS, yes_no_token_ids
from raysal.metrics.records import ItemRecords
from raysal.orchestration.train.spec import RunSpec
from raysal.probes.probe_set import select_probes
from raysal.probes.readout_items import readout_items

log = logging.getLogger(__name__)

POPE_FILE = "pope.json"  # <run>/pope.json: the questions asked at every evaluation
READOUT_FILE = "readout.json"  # <run>/readout.json: the images whose phrases are read out
ALL_PHRASES = 1_000_000  # every grounded phrase of a readout image


def val_extras(
    spec: RunSpec,
    processor: Any,
    device: torch.device,
    *,
    sharded: bool,
    lockstep: bool,
    write: bool,
    part: str = "select",
    settings: tuple[str, ...] | None = None,
    readout: bool = True,
) -> ExtraEval | None:
    """The hook `raysal.loop.fit.fit` calls after each evaluation, or None when both are off (``trainer.pope.images``
    and ``trainer.readout.images`` 0). ``write``: this rank records the sets in the run folder. ``part``: the
    images asked about, "select" (the validation metrics a search ranks on) or "confirm" (the confirmation
    hold-out, `raysal.orchestration.train.confirm`: up to ``trainer.pope.confirm_images`` POPE images).
    ``settings``: the POPE settings asked (None: ``trainer.pope.settings``); ``readout``: False leaves the readout
    out (a confirmation that decides nothing on it)."""
    d, t = spec.data, spec.config["trainer"]
    run_dir = spec.run_dir
    holdout = holdout_for(d, part)
    images = t["pope"]["confirm_images"] if part == "confirm" else t["pope"]["images"]
    settings = settings or tuple(t["pope"].get("settings") or SETTINGS)
    pope = pope_set(spec, processor, holdout, write, images=images, settings=settings) if images else None
    readout_set = None
    if t["readout"]["images"] and readout:
        readout_set = select_probes(d["shards"], d["val_split"], holdout=holdout, images=t["readout"]["images"],
                                    phrases=ALL_PHRASES)  # fmt: skip
        if not readout_set:
            metric = spec.objective["metric"]
            if metric.startswith("val/rec_"):
                raise ValueError(f"trainer.readout: no validation image has a grounded phrase: "
                                 f"trainer.objective.metric={metric!r} is never reported")  # fmt: skip
            log.warning("trainer.readout: no validation image has a grounded phrase: the run reports no val/rec_*")
        elif write:
            storage.write_json(storage.join(run_dir, READOUT_FILE), {"probes": [p.describe() for p in readout_set]})
    if pope is None and not readout_set:
        return None
    # encoded once here, not at every evaluation: the loop only runs the forwards (every rank holds the whole set)
    padding = spec.model.get("padding_side", "right")
    items = readout_items(readout_set or [], processor, prompt=d["prompt"], padding_side=padding)

    def extra(
        model: torch.nn.Module, protocol: CapturePlan, autocast: contextlib.AbstractContextManager, records: ItemRecords
    ) -> dict:
        out: dict[str, float] = {}
        kw = {"device": device, "autocast": autocast, "sharded": sharded, "lockstep": lockstep, "records": records}
        if pope is not None:
            out.update(pope_scores(model, processor, pope, **kw))
        if items:
            out.update(readout_scores(model, processor, items, protocol, **kw))
        return out

    return extra


def pope_set(spec: RunSpec, processor: Any, holdout: Holdout, write: bool, *, images: int,
             settings: tuple[str, ...] | None = None) -> PopeSet | None:  # fmt: skip
    """The POPE questions of up to ``images`` of ``holdout``'s images (None, said, when no image has 3 distinct
    things), of ``settings`` only (None: all); ``write``: recorded in the run folder."""
    d = spec.data
    try:
        yes_no_token_ids(processor.tokenizer)
    except ValueError as e:
        raise ValueError(f"trainer.pope: {e} (trainer.pope.images=0 turns POPE off)") from None
    pope = select_pope(d["shards"], d["val_split"], holdout=holdout, images=images)
    if settings is not None and set(settings) != set(SETTINGS):
        pope = pope.only(settings)
    if not pope.images:
        why = f"no validation image has 3 distinct things (of {pope.build.n_kept})"
        if spec.objective["metric"].startswith("val/pope/"):  # an objective the run could never report
            raise ValueError(f"trainer.pope: {why}: trainer.objective.metric={spec.objective['metric']!r} "
                             "is never reported")  # fmt: skip
        log.warning("trainer.pope: %s: the run reports no val/pope", why)
        return None
    if write:
        storage.write_json(storage.join(spec.run_dir, POPE_FILE), pope.describe())
    return pope
