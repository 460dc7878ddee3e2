"""A run's or a search's winner as plain transformers folders: ``python -m raysal.export RUN_OR_SEARCH --out DIR``.

RUN_OR_SEARCH is a run folder (``<storage_path>/<name>``) or a search folder (``<storage_path>/<search>``, with its
``summary.json``), a local path or a URI. A search writes ``DIR/best`` and ``DIR/control`` (the LM-only control:
what the winner must beat downstream); a run writes ``DIR``. Each loads with
``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor.from_pretrained`` alone — a LoRA adapter merged
into its base, the processor and chat template beside it — with ``train_image_ids.txt`` (the training images, for a
contamination check) and ``raysal_export.json``. DIR may be a URI too.
"""

from __future__ import annotations

import argparse
import sys

from raysal import storage
from raysal.orchestration.train.merged_export import ExportError, export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysal.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run folder or a search folder (local path or URI)")
    parser.add_argument("--out", required=True, help="where the merged folder(s) go (local path or URI)")
    args = parser.parse_args(argv)

    try:  # relative paths are the user's working directory's, whatever Ray reads them with
        done = export(storage.absolute(args.source), storage.absolute(args.out))
    except (ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for d in done:
        print(f"raysal: exported {d.name}{f' (trial {d.trial_id})' if d.trial_id else ''} to {d.folder}")
        print(f"raysal: lmms-eval: python -m lmms_eval {d.lmms_eval} --tasks pope")
    return 0


if __name__ == "__main__":
    sys.exit(main())
