"""Validate a COCONut folder: ``python -m raysal.data.check ROOT [--json] [--strict]``.

Reads every sample of every split (or the ones named) through `raysal.data.reader.read_record` and reports
counts: valid, invalid, and problems by reason, each with its file and a one-line reason. The shard writer uses
the same `scan`, so what this command calls invalid is exactly what training skips (or refuses, in strict mode).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from raysal.data.layout import find_splits
from raysal.data.reader import LayoutError, Problem, Record, TagConfig, index_split, read_record
from raysal.data.sample import Sample

log = logging.getLogger(__name__)


@dataclass
class SplitReport:
    valid: int = 0
    invalid: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class Report:
    root: str
    tags: dict[str, int]
    splits: dict[str, SplitReport]
    problems: list[dict]  # {split, image_id, reason, file, message}
    categories: dict[int, dict] = field(default_factory=dict)  # id → category, merged over splits

    @property
    def valid(self) -> int:
        return sum(s.valid for s in self.splits.values())

    @property
    def invalid(self) -> int:
        return sum(s.invalid for s in self.splits.values())

    @property
    def by_reason(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for s in self.splits.values():
            total.update(s.by_reason)
        return dict(sorted(total.items()))

    def to_json(self) -> dict:
        return {
            "root": self.root,
            "tags": self.tags,
            "valid": self.valid,
            "invalid": self.invalid,
            "by_reason": self.by_reason,
            "splits": {k: asdict(v) for k, v in self.splits.items()},
            "problems": self.problems,
        }

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in self.by_reason.items()) or "none"
        return f"{self.valid} valid, {self.invalid} invalid (problems by reason: {reasons})"


class InvalidDataError(RuntimeError):
    """Strict mode found invalid samples."""


def _read(rec: Record, tags: TagConfig, categories: dict[int, dict]) -> tuple[Sample | None, list[Problem]]:
    return read_record(rec, tags, categories)


def _results(
    records: list[Record], tags: TagConfig, categories: dict[int, dict], workers: int
) -> Iterator[tuple[Record, Sample | None, list[Problem]]]:
    """Read records in order; with workers > 1 in a process pool, in bounded windows so memory stays flat."""
    fn = partial(_read, tags=tags, categories=categories)
    if workers <= 1:
        for rec in records:
            yield (rec, *fn(rec))
        return
    window = workers * 32
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for lo in range(0, len(records), window):
            chunk = records[lo : lo + window]
            for rec, (sample, problems) in zip(chunk, pool.map(fn, chunk, chunksize=8), strict=True):
                yield rec, sample, problems


def scan(
    root: Path | str,
    splits: list[str] | None = None,
    tags: TagConfig | None = None,
    workers: int = 1,
    on_sample: Callable[[Sample], None] | None = None,
) -> Report:
    """Check every sample; call ``on_sample`` on each valid one, in (split, image id) order."""
    root = Path(root)
    tags = tags or TagConfig()
    splits = splits or find_splits(root)
    if not splits:
        raise LayoutError(f"{root}: no annotations/panoptic_<split>.json found (is this a COCONut root?)")
    report = Report(root=str(root), tags=asdict(tags), splits={}, problems=[])
    for split in splits:
        index = index_split(root, split)
        report.categories.update(index.categories)
        counts = SplitReport()
        reasons: Counter[str] = Counter()
        for rec, sample, problems in _results(index.records, tags, index.categories, workers):
            if sample is not None:
                counts.valid += 1
                if on_sample is not None:
                    on_sample(sample)
                continue
            counts.invalid += 1
            for p in problems:
                reasons[p.reason.value] += 1
                report.problems.append(
                    {
                        "split": split,
                        "image_id": rec.image_id,
                        "reason": p.reason.value,
                        "file": p.file,
                        "message": p.message,
                    }
                )
        counts.by_reason = dict(sorted(reasons.items()))
        report.splits[split] = counts
    return report


def enforce(report: Report, strict: bool, what: str = "data") -> None:
    """Strict: raise on any invalid sample. Otherwise: one counted warning, never a silent drop."""
    if not report.invalid:
        return
    msg = f"{what}: {report.invalid} invalid sample(s) in {report.root}: {report.summary()}"
    if strict:
        first = report.problems[0]
        raise InvalidDataError(f"{msg}; first: {first['file']}: {first['reason']}: {first['message']}")
    log.warning("%s — skipped; run `python -m raysal.data.check %s` for the list", msg, report.root)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raysal.data.check", description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="COCONut root folder (images/, annotations/, panoptic_*_masks/, ...)")
    ap.add_argument("--split", action="append", help="split to check (repeatable); default: every split found")
    ap.add_argument("--json", action="store_true", help="print the full report as JSON")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any sample is invalid")
    ap.add_argument("--workers", type=int, default=1, help="processes reading samples (default 1)")
    ap.add_argument("--colon-offset", type=int, default=TagConfig.colon_offset, help="id offset for <ids: phrase>")
    ap.add_argument("--nocolon-offset", type=int, default=TagConfig.nocolon_offset, help="id offset for <ids>phrase>")
    args = ap.parse_args(argv)
    try:
        report = scan(
            args.root,
            args.split,
            TagConfig(colon_offset=args.colon_offset, nocolon_offset=args.nocolon_offset),
            workers=args.workers,
        )
    except LayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for p in report.problems:
            print(f"{p['reason']:<24} {p['file']}: {p['message']}")
        print(report.summary())
    return 1 if args.strict and report.invalid else 0


if __name__ == "__main__":
    sys.exit(main())
