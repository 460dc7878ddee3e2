"""python -m raysal.train and python -m raysal.tune on a local Ray (integration: a few minutes on 2 CPUs)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_fixture import KEYS
from entrypoint_runs import FAKE_KEY, HOLDOUT, SMALL, files_containing, run, space_file, wandb_runs
from peft import PeftModel
from test_docs import commands, fenced_blocks, python_target

from raysal.model.build import load_model


@pytest.mark.integration
def test_train_run_checkpoints_metrics_and_offline_wandb(tmp_path, cache):
    res = run(["raysal.train", *SMALL, "trainer.max_steps=4", "trainer.eval_every=2", f"storage_path={tmp_path}",
               "name=itrain"], cache)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "raysal: run itrain finished" in res.stdout
    run_dir = tmp_path / "itrain"
    assert len(list(run_dir.glob("checkpoint_[0-9]*"))) == 2  # keep_checkpoints=2, reported at steps 2 and 4
    best = json.loads((run_dir / "best_adapter" / "best.json").read_text())
    assert "val/amr" in best["metrics"] and "train/loss/kl" in best["metrics"]
    base = load_model(str(cache / "tiny" / "llava"), dtype="float32")
    PeftModel.from_pretrained(base, run_dir / "best_adapter")  # loads
    runs = wandb_runs(run_dir)
    assert len(runs) == 1 and [h["val/amr"] for h in runs[0]["history"] if "val/amr" in h]
    assert runs[0]["config"]["trainer"]["max_steps"] == 4
    # the probe heatmaps: W&B images + table at every evaluation, PNGs in the run folder
    media = [h for h in runs[0]["history"] if h.get("probes/scores/_type") == "table-file"]
    assert [h["train/step"] for h in media] == [2, 4]
    assert all(h.get("probes/probe0_0/_type") == "image-file" for h in media)
    assert (run_dir / "probes" / "probes.json").exists()
    assert (run_dir / "probes" / "step_0000004" / "probe0_0.png").stat().st_size > 1000
    # the same name resumes from its last checkpoint instead of starting over
    res = run(["raysal.train", *SMALL, "trainer.max_steps=6", "trainer.eval_every=2", f"storage_path={tmp_path}",
               "name=itrain"], cache)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    first, second = wandb_runs(run_dir)  # offline W&B writes one file per process; online they are one run
    assert [h["train/step"] for h in first["history"]] == [2, 4]
    # resumed at step 4: the checkpoint's rows are re-logged first (W&B keeps the steps a run has), then step 6
    assert [h["train/step"] for h in second["history"]] == [2, 4, 6]


def check_wandb_sweep(runs: list[dict], summary_run: dict, summary: dict) -> None:
    """The trials' W&B runs as one comparable sweep, read back from the offline run files (W&B's own records):
    named and identified by the trial id; the whole run config under override names, the control's too; no Ray
    bookkeeping; train/step every metric's x-axis, the objective's summary its best; the summary run's table."""
    by_id = {r["id"]: r for r in runs if r["history"]}  # the run that logged; its tags once judged: another file
    assert set(by_id) == {r["trial_id"] for r in summary["rows"]}, set(by_id)
    judged = {t: {tag for r in runs if r["id"] == t for tag in r["tags"]} for t in by_id}
    assert "best" in judged[summary["best"]["trial_id"]], judged
    for trial_id, r in by_id.items():
        assert r["name"] == trial_id, r["name"]
        config = r["config"]
        assert {"optim.lr", "lora.rank", "trainer.max_steps", "criterion@criteria.align"} <= set(config), sorted(config)
        assert not {"date", "hostname", "node_ip", "pid", "trial_log_path", "raysal_control"} & set(config)
        assert not [k for k in config if "|" in k], "no Optuna-internal parameter names"
        assert r["metrics"]["*"]["step_metric"] == "train/step" and "max" in r["metrics"]["val/amr"]["summary"]
        assert "min" in r["metrics"]["val/lm_loss"]["summary"]
        control = trial_id == summary["control"]
        assert ("control" in r["tags"]) == control, r["tags"]
        assert (config["criterion@criteria.align"] is None) == control, config["criterion@criteria.align"]
    table = [h for h in summary_run["history"] if h.get("trials/_type") == "table-file"]
    assert table and table[-1]["trials/nrows"] == len(summary["rows"]), table
    assert summary_run["summary"]["best/trial_id"] == summary["best"]["trial_id"]
    assert summary_run["summary"]["verdict"] == summary["verdict"]


def check_tune_and_optuna(folder: Path, summary: dict, location: str | None = None) -> None:
    """Ray Tune's and Optuna's own APIs on the finished search (its folder as a file:// URI, as on S3): every trial
    has a Tune checkpoint, the best's is the Train run's best; intermediate values at train/step; no fail reason
    left in a finished trial. ``location``: how Tune is given the folder (default: its file:// URI)."""
    import optuna
    import ray.tune

    analysis = ray.tune.ExperimentAnalysis(location or folder.as_uri())
    grid = ray.tune.ResultGrid(analysis)
    assert len(grid) == summary["trials"] and all(r.checkpoint is not None for r in grid), [r.path for r in grid]
    best = next(t for t in analysis.trials if t.trial_id == summary["best"]["trial_id"])
    checkpoint = analysis.get_best_checkpoint(best, metric="val/amr", mode="max")
    assert checkpoint is not None
    with checkpoint.as_directory() as local:
        assert {"adapter", "state.pt", "eval_records.json"} <= {p.name for p in Path(local).iterdir()}
    assert grid.get_best_result("val/amr", "max").checkpoint is not None
    control = next(t for t in analysis.trials if t.trial_id == summary["control"])
    assert control.config.get("raysal_control") and "optim.lr" in control.config, control.config  # its values
    for trial in summary["rows"]:
        assert not (folder / "trials" / trial["trial_id"] / "fail_reason.txt").exists(), trial["trial_id"]
    study = optuna.load_study(study_name=summary["search"], storage=f"sqlite:///{folder / 'optuna.db'}")
    ours = next(t for t in study.trials if t.user_attrs.get("raysal_control"))
    assert ours.params["optim.lr"] == control.config["optim.lr"], ours.params  # plots and importance see the control
    for t in study.trials:
        steps = set(t.intermediate_values)
        assert steps and steps <= {2, 4, 6} and max(steps) == t.user_attrs["train/step"], (t.number, steps)


def run_notebook_snippet(cwd: Path) -> dict:
    """docs/notebook.md's Python block, exactly, run in ``cwd`` (where runs/criteria is a finished search) in a fresh
    interpreter → what it computed."""
    block = next(b for lang, b, _ in fenced_blocks(Path(__file__).parents[1] / "docs" / "notebook.md")
                 if lang == "python")  # fmt: skip
    script = cwd / "notebook.py"
    # the block as written, its print kept as a value, and what it computed printed last
    body = block.replace("    print(sorted(os.listdir(folder)))", "    files = sorted(os.listdir(folder))")
    assert body != block, "the snippet lists the checkpoint's files"
    script.write_text(
        body + "\nprint('RESULT', json.dumps({'checkpoint_files': files, 'importances': list(importances)}))\n"
    )
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    out["checkpoint_files"] = set(out["checkpoint_files"])
    return out


RUN_FOR_REAL = ("raysal.report", "raysal.export")  # the commands a user runs on a finished search


def run_documented_commands(cwd: Path, cache: Path, *, uri: str) -> list[tuple[str, ...]]:
    """Run every fenced ``python -m raysal.report|export`` command of the docs in ``cwd`` (where ``runs/criteria`` is
    a finished search): a placeholder bucket location is replaced by ``uri``; each must exit 0."""
    ran = []
    for cmd in commands():
        target = python_target(cmd.argv)
        if target is None or target[1] not in RUN_FOR_REAL or (cmd.marker or "").startswith("expected to fail"):
            continue
        args = [uri if a.startswith("s3://") else a for a in target[2]]
        res = run([target[1], *args], cache, cwd=cwd, extra_env={"WANDB_MODE": "offline"})
        assert res.returncode == 0, f"{cmd}: exit {res.returncode}\n{res.stderr[-3000:]}"
        ran.append((target[1], *args))
    return ran


@pytest.mark.integration
def test_search_on_the_coconut_defaults_adapter_wandb_and_no_key_on_disk(tmp_path, cache, single_split):
    """A search as a user starts it on PanCap-like data: the data=coconut defaults (one split, 1 % hold-out), a space
    file without max_concurrent_trials (concurrency from the trial's worker + data CPUs: no starved pipeline on
    2 CPUs), 1 sampled trial + the LM-only control, W&B offline with an API key set; storage as a file:// URI (the
    code path of s3://, on a local disk)."""
    # the sampled trial aligns the localization heads: the search runs the head finder first (a Ray task), its
    # table written to the storage is found by every trial (finder.out is the search's, not the trial's
    # storage_path), and a second search reuses it
    # guards against the control on POPE: every trial is asked the hold-out's questions at every evaluation
    guards = "{lm_tolerance: 0.02, guards: {val/pope/adversarial/f1: 0.01, val/pope/adversarial/fpr: 0.01}}"
    # no finalists' stage here (test_fault_injection.py runs one); the confirmation band sized for the 900 images
    space = space_file(tmp_path, 1, "itune", concurrency="", space="  criteria.align.heads: {choice: [localization]}\n",
                       control=guards, top="finalists: null")  # fmt: skip
    common = ["experiment=demo", "data=coconut", f"data.shards={single_split}", f"storage_path={tmp_path.as_uri()}",
              "finder.samples=4", "data.confirm_holdout=0.05"]  # fmt: skip
    sessions_before = set(Path("/tmp/ray").glob("session_2*"))
    res = run(["raysal.tune", str(space), *common, "trainer.batch_size=4"], cache,
              extra_env={"WANDB_API_KEY": FAKE_KEY})  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    # the W&B key is written nowhere: not by raysal, not by Ray on its behalf (runtime_env logs), not by W&B
    sessions = set(Path("/tmp/ray").glob("session_2*")) - sessions_before
    assert sessions, "the search started a Ray session of its own"
    leaks = [p for folder in (*sessions, tmp_path, cache) for p in files_containing(folder, FAKE_KEY)]
    assert not leaks, leaks
    table = tmp_path / "heads" / "llava" / "heads.json"
    assert f"and {table.as_uri()} does not exist yet: scoring the base model's heads first" in res.stdout, res.stdout
    assert json.loads(table.read_text())["images"] == 4
    n = int(HOLDOUT.search(res.stdout).group(1))
    folder = tmp_path / "itune"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["reported"] == 2  # 1 sampled + the LM-only control
    assert summary["control"] and summary["lm_limit"] > 0 and not summary["failed"]
    assert "localization" in summary["table"], summary["table"]
    assert summary["leaked_placement_groups"] == 0
    pope = ("val/pope/adversarial/f1", "val/pope/adversarial/fpr")
    assert set(summary["guards"]) == set(pope) and summary["guards"][pope[1]]["mode"] == "min"
    assert all(set(r["guards"]) == set(pope) for r in summary["rows"]), summary["rows"]  # each trial's verdicts
    assert ("raysal: guard val/pope/adversarial/fpr (non-inferiority: higher than the control by at most 0.01, on the "
            "paired 95 % interval's bound): control") in res.stdout  # fmt: skip
    # issue 30: every trial compared paired with the control on the records its checkpoint kept; without finalists
    # (finalists: null) nothing is confirmed, and the summary says so
    assert summary["rule"] == "paired" and set(summary["paired"]) == {r["trial_id"] for r in summary["rows"]}
    assert summary["confirmation"] is None and summary["confirmed"] is None
    assert not summary["verdict"].startswith(("confirmed", "not confirmed")), summary["verdict"]
    if summary["best"]["trial_id"] != summary["control"]:
        assert "95 % intervals" in summary["verdict"], summary["verdict"]
    assert "python -m raysal.train" in summary["table"] and summary["best"]["replay"].startswith(
        "python -m raysal.train"
    )
    base = load_model(str(cache / "tiny" / "llava"), dtype="float32")
    model = PeftModel.from_pretrained(base, folder / "best_adapter")
    assert any("lora_A" in n for n, _ in model.named_parameters())
    every = wandb_runs(folder)
    report_runs = [r for r in every if any(k.startswith("report/") for h in r["history"] for k in h)]
    runs = [r for r in every if r not in report_runs]  # one per trial (and the best's tags, once judged)
    assert len({r["id"] for r in runs}) == 2 and len(report_runs) == 1 and {r["group"] for r in every} == {"itune"}
    assert {"report/plane/_type", "report/hallucination/_type", "report/probes/_type"} <= set(
        report_runs[0]["history"][0]
    )
    check_wandb_sweep(runs, report_runs[0], summary)
    assert "Exception ignored" not in res.stderr, res.stderr[-3000:]
    # what `wandb sync` needs is inside the search's wandb/ folder: W&B's own CLI reads every run there
    staged = [p for p in (folder / "wandb").glob("artifacts-*/artifacts/staging/*") if p.is_file()]
    assert staged, "the tables' staged artifact files are beside the runs"
    synced = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run",
                             *map(str, sorted((folder / "wandb").glob("offline-run-*")))],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert synced.returncode == 0, synced.stdout[-2000:] + synced.stderr[-2000:]
    for r in [r for r in runs if r["history"]]:  # every trial evaluated the printed hold-out, shows its heatmaps
        assert {h["val/images"] for h in r["history"] if "val/images" in h} == {n}
        evaluated = [h for h in r["history"] if "val/images" in h]
        assert [h["train/step"] for h in evaluated] == [2, 4, 6]  # POPE and the readout at every evaluation
        for key in (*pope, "val/pope/random/accuracy", "val/pope/popular/mass", "val/rec_acc50", "val/rec_miou"):
            assert all(math.isfinite(h[key]) for h in evaluated), (key, evaluated[-1])
        media = [h for h in r["history"] if h.get("probes/scores/_type") == "table-file"]
        assert media and all(h.get("probes/probe0_0/_type") == "image-file" for h in media), r["history"][-1].keys()
    # the replay command of the best trial is a valid run config
    from raysal.orchestration.train.compose import compose_cfg

    replay = summary["best"]["replay"].split()[3:]
    assert compose_cfg(replay).optim.lr > 0

    # every documented report/export command, run for real from a folder where runs/criteria is this search: the
    # relative path as written, an s3:// location as this search's file:// URI; the export once more by absolute path
    # (the winner and the control as folders transformers loads alone; their logits: tests/test_export.py)
    user = tmp_path / "user"
    (user / "runs").mkdir(parents=True)
    (user / "runs" / "criteria").symlink_to(folder, target_is_directory=True)
    ran = run_documented_commands(user, cache, uri=folder.as_uri())
    assert {"raysal.report", "raysal.export"} <= {c[0] for c in ran}, ran
    check_tune_and_optuna(folder, summary)
    notebook = run_notebook_snippet(user)
    assert notebook["checkpoint_files"] >= {"adapter", "state.pt", "eval_records.json"}, notebook
    assert notebook["importances"], "Optuna's importance sees the sampled parameters"
    exported = run(["raysal.export", str(folder), "--out", str(tmp_path / "export")], cache)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert f"raysal: exported control (trial {summary['control']})" in exported.stdout
    best = tmp_path / "export" / "best"
    assert f"raysal: lmms-eval: python -m lmms_eval --model llava_hf --model_args pretrained={best}," in exported.stdout
    from transformers import AutoModelForImageTextToText, AutoProcessor

    for out in (tmp_path / "export", user / "exports" / "criteria"):
        for name in ("best", "control"):
            AutoModelForImageTextToText.from_pretrained(out / name)
            assert AutoProcessor.from_pretrained(out / name).chat_template
            assert (out / name / "train_image_ids.txt").read_text().split()

    # the same search again: finished, nothing trains, and the heads table is reused, not made again
    before = table.stat().st_mtime_ns
    again = run(["raysal.tune", str(space), *common, "trainer.batch_size=4"], cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 trials to run" in again.stdout and "scoring the base model's heads" not in again.stdout
    assert table.stat().st_mtime_ns == before


@pytest.mark.integration
def test_train_on_the_coconut_defaults_evaluates_the_holdout_it_printed(tmp_path, cache, single_split, s3_server):
    """data=coconut as shipped: one split, validation = the 1 % hash hold-out, the shards in a bucket (as on a
    cluster: the preflight reads the manifest and footers, Ray Data the files, the probes theirs, from S3). It used
    to hang on 2 CPUs (a hold-out filter asking for a whole CPU)."""
    from raysal import storage
    from raysal.search.override_text import format_override

    shards = storage.join(s3_server.new_prefix(), "shards")
    storage.upload(single_split, shards)
    res = run(
        [
            "raysal.train",
            "experiment=demo",
            "data=coconut",
            format_override("data.shards", shards),
            "trainer.batch_size=4",
            "trainer.max_steps=4",
            "trainer.eval_every=2",
            f"storage_path={tmp_path}",
            "name=coco",
            "data.confirm_holdout=0.05",
        ],
        cache,
        extra_env=KEYS,
    )  # 900 images: 1 % confirms too few
    assert res.returncode == 0, res.stderr[-3000:]
    m = HOLDOUT.search(res.stdout)
    assert m, res.stdout[-2000:]
    n = int(m.group(1))
    assert 8 <= n < 30
    history = wandb_runs(tmp_path / "coco")[0]["history"]
    assert [h["val/images"] for h in history if "val/images" in h] == [n, n]
    assert all(h["val/tokens"] > 0 and h["val/lm_loss"] > 0 for h in history if "val/images" in h)
