"""docs/bad-input.md: every row of its table, run the way a user would (in process, with ``ray.init``
booby-trapped so that every error must come before Ray starts). The page is the source of the expected messages;
this file only knows how to make each input."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from raysal.data.shards import write_shards
from raysal.data.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `([\w-]+)` \| (.*) \| `(.*)` \|$")


def page_cases() -> dict[str, str]:
    text = (ROOT / "docs" / "bad-input.md").read_text()
    return {m.group(1): m.group(3) for ln in text.splitlines() if (m := ROW.match(ln))}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A cache for the demo's tiny model + synthetic data, and single-split COCONut shards (900 small images, ~10 in
    the default 1 % hold-out): broken copies of them, a file to put storage under, an empty folder."""
    base = tmp_path_factory.mktemp("bad_input")
    generate(base / "root", images=900, seed=4, max_side=48, val_fraction=0.0)
    write_shards(base / "root", base / "single")
    generate(base / "root16", images=16, seed=7, max_side=48, val_fraction=0.0)  # PanCap's layout, 16 images
    write_shards(base / "root16", base / "single16")
    trunc = base / "truncated"
    shutil.copytree(base / "single", trunc)
    part = trunc / "train2017" / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:3000])
    deleted = base / "deleted"
    shutil.copytree(base / "single", deleted)
    (deleted / "train2017" / "part-00001.parquet").unlink()
    (base / "a_file").write_text("not a folder")
    (base / "empty_model").mkdir()
    (base / "not_shards").mkdir()
    (base / "not_shards" / "keep.txt").write_text("someone's data")
    space = base / "space.yaml"
    space.write_text(
        "name: bad\nobjectives: [{metric: val/amr, mode: max}]\nnum_samples: 2\n"
        "resources: {num_workers: 1, use_gpu: false, cpus_per_worker: 1, gpus_per_worker: 0}\n"
        "space:\n  optim.lr: {loguniform: [1.0e-3, 1.0e-2]}\n"
    )
    for name, line in (("unknown_key", "  optim.lrr: {loguniform: [1.0e-3, 1.0e-2]}"),
                       ("low_high", "  optim.lr: {loguniform: [1.0, 0.1]}")):  # fmt: skip
        (base / f"{name}.yaml").write_text(space.read_text().rsplit("  optim.lr", 1)[0] + line + "\n")
    return {"base": base, "cache": base / "cache", "space": space}


def _train(*args: str, data: tuple[str, ...] = ("data.synthetic.images=24", "data.confirm_holdout=0")) -> Callable:
    return lambda w: ("train", ["experiment=demo", f"storage_path={w['base']}/runs",
                                *(a.format(**w) for a in (*data, *args))])  # fmt: skip


def _coconut(*args: str) -> Callable:
    """The data=coconut defaults on the single-split shards (the last data.shards given wins)."""
    return _train(*args, data=("data=coconut", "data.shards={base}/single"))


def _tune(space: str, *args: str) -> Callable:
    return lambda w: ("tune", [space.format(**w), "experiment=demo", "data.synthetic.images=24",
                               "data.confirm_holdout=0", f"storage_path={w['base']}/runs",
                               *(a.format(**w) for a in args)])  # fmt: skip


CASES: dict[str, Callable[[dict], tuple[str, list[str]]]] = {
    "unknown-key": _train("trainer.max_stpes=10"),
    "unknown-key-tune": _tune(str(ROOT / "search_spaces" / "criteria.yaml"), "trainer.max_stpes=10"),
    "unknown-option": _train("criterion@criteria.align=foo"),
    "override-syntax": _train("trainer.max_steps=[1"),
    "wrong-type": _train("trainer.max_steps=abc"),
    "negative-rank": _train("lora.rank=-4"),
    "zero-lr": _train("optim.lr=0"),
    "lora-targets": _train("lora.targets=[q_proj,fc1]"),
    "objective-typo": _train("trainer.objective.metric=val/arm"),
    "lm-and-cal": _train("criterion@criteria.base=cal", "+criterion@criteria.extra=lm"),
    "layer-out-of-range": _train("criteria.align.layers=[99]"),
    "maskembed-on-qwen": _train("model=tiny-qwen2.5-vl", "+criterion@criteria.extra=maskembed", "lora.vision=true"),
    "connector-on-qwen": _train("model=tiny-qwen3-vl", "model.connector=align"),
    "gpu-without-gpu-share": _train("scaling.use_gpu=true", "scaling.gpus_per_worker=0"),
    "no-manifest": _coconut("data.shards=/nowhere"),
    "missing-split": _coconut("data.val_split=val2017"),
    "empty-holdout": _coconut("data.val_holdout=0.001"),
    "no-holdout": _coconut("data.val_holdout=0"),
    "empty-confirmation": _coconut("data.shards={base}/single16", "data.val_holdout=0.5", "data.val_min_images=4"),
    "empty-confirmation-tune": lambda w: (
        "tune",
        [
            str(w["space"]),
            "data=coconut",
            f"data.shards={w['base']}/single16",
            "data.val_holdout=0.5",
            "data.val_min_images=4",
            "model=tiny",
            f"storage_path={w['base']}/runs",
        ],
    ),
    "small-confirmation": _coconut(),
    "truncated-shard": _coconut("data.shards={base}/truncated"),
    "deleted-shard": _coconut("data.shards={base}/deleted"),
    "missing-model": _train("model.name_or_path=/no/such/dir", "model.tiny=null"),
    "not-a-model": _train("model.name_or_path={base}/empty_model", "model.tiny=null"),
    "storage": _train("storage_path={base}/a_file/runs"),
    "storage-tune": _tune("{space}", "storage_path={base}/a_file/runs"),
    "space-unknown-key": _tune("{base}/unknown_key.yaml"),
    "space-low-high": _tune("{base}/low_high.yaml"),
    "space-missing": _tune("{base}/nope.yaml"),
    "resume-value": _tune("{space}", "resume=maybe"),
    "optuna-storage-url": _tune("{space}", "optuna_storage=optuna.db"),
    "optuna-storage-down": _tune("{space}", "optuna_storage=postgresql+psycopg2://raysal:pw@127.0.0.1:1/optuna"),
    "check-not-a-root": lambda w: ("check", [str(w["base"] / "empty_model")]),
    "shards-overwrite": lambda w: ("shards", [str(w["base"] / "root"), str(w["base"] / "not_shards")]),
}
EXIT = {"check": 2, "shards": 1}


def test_every_readme_row_has_a_case_and_every_case_a_row():
    assert len(page_cases()) >= 20
    assert set(page_cases()) == set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line_before_ray_starts(case, world, monkeypatch, capsys):
    import ray

    from raysal import train, tune
    from raysal.data import check, shards

    monkeypatch.setenv("RAYSAL_CACHE", str(world["cache"]))

    def no_ray(*a, **k):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr(ray, "init", no_ray)
    entry, argv = CASES[case](world)
    main = {"train": train.main, "tune": tune.main, "check": check.main, "shards": shards.main}[entry]
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == EXIT.get(entry, 2), err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert page_cases()[case] in errors[0], errors[0]


def test_unknown_key_on_tune_is_the_whole_output_of_the_process(world):
    """A real process: Hydra's composition error arrives as one line on stderr, exit 2, nothing else."""
    res = subprocess.run(
        [sys.executable, "-m", "raysal.tune", str(ROOT / "search_spaces" / "criteria.yaml"), "experiment=demo",
         "trainer.max_stpes=10"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: trainer.max_stpes: no such config key"), res.stderr
