"""A deterministic validation hold-out by image id (PanCap has captions for COCO train2017 only)."""

from __future__ import annotations


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
