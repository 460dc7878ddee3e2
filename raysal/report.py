"""The report of a finished search: ``python -m raysal.report SEARCH_DIR [--wandb]``.

SEARCH_DIR is the search's folder on its storage: a local path or a URI (``s3://bucket/raysal/criteria``); the
folder alone is the search, so this runs on any machine that can read it. Writes ``SEARCH_DIR/report.html``
(self-contained: opens offline) and ``SEARCH_DIR/report/*.png``: the trials with
replay commands and failure reasons, grounding vs language against the LM-only control, which parameters mattered,
the optimisation history, parallel coordinates, and the best trial's probe heatmaps beside the control's.
``python -m raysal.tune`` writes it at the end of every search; run this to rebuild it, or with ``--wandb`` to log
the figures again as the search's "summary" W&B run (W&B settings from the search's config defaults).
"""

from __future__ import annotations

import sys
import tempfile

from raysal import storage
from raysal.orchestration.train.compose import compose_cfg
from raysal.orchestration.train.wandb_run import log_search_summary, resolve_mode
from raysal.search.report_html import ReportError, build_report


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or len(args) > 2 or (len(args) == 2 and args[1] != "--wandb"):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2

    args[0] = storage.absolute(args[0])  # once: a relative folder is the working directory's
    try:
        report = build_report(args[0])
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folder = args[0].rstrip("/")
    print(f"raysal: report {report.html} ({len(report.figures)} figures in {storage.join(folder, 'report')})")
    if "--wandb" in args:
        search = storage.read_json(storage.join(folder, "summary.json"))["search"]
        w = compose_cfg([]).wandb
        with tempfile.TemporaryDirectory(prefix="raysal-wandb-") as tmp:  # W&B writes a local folder first
            log_search_summary(report.figures, project=w.project, entity=w.get("entity"), group=search,
                               mode=resolve_mode(w.mode), directory=storage.local_path(folder) or tmp,
                               mirror_to=folder)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
