"""Which heads already ground: ``python -m raysal.heads [hydra overrides]`` scores every (layer, head) of the base
model (no adapters, no training) on validation samples and writes a ranked table and a picture.

python -m raysal.heads experiment=demo                      # the tiny model on the synthetic data
python -m raysal.heads finder.samples=256                   # LLaVA-1.5-7B on the COCONut hold-out (the defaults)
python -m raysal.heads model=llava-v1.6-mistral-7b

Output: ``<finder.out>/<model>/heads.json`` (every head's AMR, pointing, image-attention mass and entropy, best
AMR first: `raysal.attention.head_scores`) and ``heads.png`` (AMR, layer × head). The validation samples are the
run's (``data.val_split``, or the fixed hold-out of ``data.train_split``), the query rows and θ the evaluation
protocol's (``trainer.eval``).
"""

from __future__ import annotations

import logging
import sys

from raysal.orchestration.train.compose import compose_cfg
from raysal.orchestration.train.errors import print_user_error
from raysal.orchestration.train.head_finder import find_heads
from raysal.orchestration.train.spec import spec_from_cfg


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        find_heads(spec_from_cfg(compose_cfg(args)))
    except Exception as e:
        return print_user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
