"""A deterministic validation hold-out by image id (PanCap has captions for COCO train2017 only)."""

from __future__ import annotations

from dataclasses import dataclass


def holdout_fraction_of(image_id: int) -> float:
    """Map an image id to [0, 1) with a fixed multiplicative hash: the same on every machine, run and Ray worker."""
    return ((int(image_id) * 2654435761) % 2**32) / 2**32


def in_holdout(image_id: int, fraction: float) -> bool:
    """True for the ~``fraction`` of image ids that form the validation hold-out."""
    return holdout_fraction_of(image_id) < fraction


def validation_holdout(data: dict) -> float:
    """The hold-out fraction a run's ``data`` config validates on: ``data.val_holdout`` when it validates on its
    training split, else 0 (a validation split of its own)."""
    return float(data.get("val_holdout") or 0.0) if data["train_split"] == data["val_split"] else 0.0


@dataclass(frozen=True)
class Holdout:
    """Which image ids of a split one purpose may use: training, selection (the validation metrics a search ranks
    on) or confirmation (the figures a search reports its winner with, on images it never chose on).

    ``select`` > 0: the selection set is the ids in the lowest ``select`` fraction of the hash (the validation part
    of a training split); 0: every id of the validation split. ``confirm`` > 0: the ids in the highest ``confirm``
    fraction are the confirmation hold-out — never trained on, never selected on. Both bands are fixed by the image
    id alone, so every trial, rank, node and resume draws the same lines."""

    select: float = 0.0
    confirm: float = 0.0
    part: str = "select"  # "train" | "select" | "confirm"

    def keeps(self, image_id: int) -> bool:
        h = holdout_fraction_of(image_id)
        confirming = self.confirm > 0 and h >= 1 - self.confirm
        if self.part == "confirm":
            return confirming
        selecting = self.select > 0 and h < self.select
        if self.part == "train":
            return not selecting and not confirming
        return (self.select <= 0 or selecting) and not confirming


def as_holdout(holdout: float | Holdout) -> Holdout:
    """A bare fraction is the selection hold-out of a training split (what callers passed before `Holdout`)."""
    return holdout if isinstance(holdout, Holdout) else Holdout(select=float(holdout))


def holdout_for(data: dict, part: str) -> Holdout:
    """The `Holdout` of ``part`` ("train", "select", "confirm") under a run's ``data`` config: the selection band
    only when validation shares the training split; the confirmation band is taken from the validation split, so
    training avoids it only when the two splits coincide."""
    if part not in ("train", "select", "confirm"):
        raise ValueError(f"part must be train, select or confirm, got {part!r}")
    same = data["train_split"] == data["val_split"]
    confirm = float(data.get("confirm_holdout") or 0.0)
    select = validation_holdout(data)
    if part == "train":
        return Holdout(select, confirm if same else 0.0, "train")
    return Holdout(select, confirm, part)
