"""Rolling a run back to an older checkpoint (issue 17, bug 3): the checkpoints of the abandoned future are
quarantined, so the launchers' ``run.resume=auto`` on the next (re)queue continues the rollback's lineage;
and ``launch/submit.py`` passes a user's ``run.resume=PATH`` to the first job, ``auto`` to requeues."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from launch import submit
from tests.util import launch_cmd, metrics, run, tiny_overrides
from vaejob.cli import LOG_NAME
from vaejob.config import load_config
from vaejob.tracking import Tracker

# Constant LR (after 2 warm-up steps): each record's lr says which segment of the run logged it.
BASE = {
    "train.max_steps": 30,
    "train.checkpoint_every": 10,
    "train.lr_schedule": "constant",
    "train.sample_every": 1000,
    "samples.final_plots": "false",
    "wandb.mode": "disabled",
}
ROLLBACK_LR = 0.005  # the first segment trains with tiny_overrides' 0.01


def train(shards: str, run_dir: Path, **kw: object) -> subprocess.CompletedProcess:
    return run(launch_cmd(1) + tiny_overrides(shards, run_dir, **{**BASE, **kw}))


def steps_in(directory: Path) -> list[int]:
    """The steps of the checkpoint dirs named step_XXXXXXXX (not a quarantine's renamed step_XXXXXXXX-N)."""
    return sorted(int(p.name.removeprefix("step_")) for p in directory.glob("step_" + "[0-9]" * 8))


def weights_sha(checkpoint: Path) -> str:
    return hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow
def test_rollback_quarantines_the_newer_checkpoints_and_auto_continues_the_rollback(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    ckpts, abandoned = run_dir / "checkpoints", run_dir / "checkpoints" / "abandoned"
    cp = train(tiny_shards, run_dir)
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert steps_in(ckpts) == [10, 20, 30]
    future = {s: weights_sha(ckpts / f"step_{s:08d}") for s in (20, 30)}

    # A named checkpoint that fails its checks stops the job before anything is moved.
    broken = Path(shutil.copytree(ckpts / "step_00000010", tmp_path / "broken" / "step_00000010"))
    (broken / "trainer_state.json").write_text("{}")
    cp = train(tiny_shards, run_dir, **{"run.resume": str(broken), "train.max_steps": 15})
    assert cp.returncode == 2 and "cannot resume from" in cp.stderr, cp.stderr[-3000:]
    assert steps_in(ckpts) == [10, 20, 30] and not abandoned.exists()

    # Roll back to step 10 with a lower learning rate and stop at 15.
    back = train(
        tiny_shards,
        run_dir,
        **{"run.resume": str(ckpts / "step_00000010"), "train.max_steps": 15, "train.lr": ROLLBACK_LR},
    )
    assert back.returncode == 0, back.stderr[-3000:]
    assert f"resumed from {ckpts}/step_00000010 at step 10" in back.stderr
    moved = [line for line in back.stderr.splitlines() if "abandoned" in line]
    assert len(moved) == 1, back.stderr[-3000:]
    assert "step_00000020, step_00000030" in moved[0] and f"to {abandoned}/" in moved[0], moved[0]
    assert steps_in(ckpts) == [10, 15]  # pruning counted only the rollback's lineage
    assert steps_in(abandoned) == [20, 30]
    assert {s: weights_sha(abandoned / f"step_{s:08d}") for s in (20, 30)} == future
    # The abandoned future's metrics records are kept beside its checkpoints, not lost.
    dropped = [json.loads(line) for line in (abandoned / "metrics-after-step_00000010.jsonl").open()]
    assert [r["step"] for r in dropped if r["split"] == "train"] == list(range(12, 31, 2))
    assert [r["step"] for r in dropped if r["split"] == "val"] == [20, 30]

    # The launchers' next requeue: auto continues from 15 (not the abandoned 30) and trains on to 30.
    again = train(tiny_shards, run_dir, **{"run.resume": "auto", "train.lr": ROLLBACK_LR})
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpts}/step_00000015 at step 15" in again.stderr, again.stderr[-3000:]
    assert "abandoned" not in again.stderr
    assert steps_in(ckpts) == [15, 20, 30]
    assert steps_in(abandoned) == [20, 30]  # pruning never touches the quarantine
    assert {s: weights_sha(abandoned / f"step_{s:08d}") for s in (20, 30)} == future
    weights_sha_30 = weights_sha(ckpts / "step_00000030")
    assert weights_sha_30 != future[30]  # a new lineage, trained with ROLLBACK_LR
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["step"]) == ("completed", 30)

    # metrics.jsonl: one record per logged step, in order, each from the lineage that holds step 30.
    train_records = metrics(run_dir, "train")
    assert [r["step"] for r in train_records] == [*range(2, 15, 2), 15, *range(16, 31, 2)]
    assert [r["step"] for r in metrics(run_dir, "val")] == [10, 15, 20, 30]
    assert all(r["lr"] == 0.01 for r in train_records if 2 < r["step"] <= 10)
    assert all(r["lr"] == ROLLBACK_LR for r in train_records if r["step"] > 10)

    # A second rollback, to 15: the quarantine keeps both abandoned futures, the new one under free names.
    cp = train(
        tiny_shards,
        run_dir,
        **{"run.resume": str(ckpts / "step_00000015"), "train.max_steps": 22, "train.lr": ROLLBACK_LR},
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    moved = [line for line in cp.stderr.splitlines() if "abandoned" in line]
    assert len(moved) == 1 and "(as step_00000020-1, step_00000030-1)" in moved[0], cp.stderr[-3000:]
    assert steps_in(ckpts) == [15, 20, 22] and steps_in(abandoned) == [20, 30]
    assert sorted(p.name for p in abandoned.glob("step_*-1")) == ["step_00000020-1", "step_00000030-1"]
    assert weights_sha(abandoned / "step_00000030-1") == weights_sha_30  # the lineage just abandoned
    assert {s: weights_sha(abandoned / f"step_{s:08d}") for s in (20, 30)} == future
    dropped = [json.loads(line) for line in (abandoned / "metrics-after-step_00000015.jsonl").open()]
    assert [r["step"] for r in dropped if r["split"] == "train"] == list(range(16, 31, 2))
    assert [r["step"] for r in metrics(run_dir, "train")][-6:] == [14, 15, 16, 18, 20, 22]


def test_a_resume_past_the_end_of_metrics_jsonl_says_so(tmp_path, caplog):
    """Resuming a checkpoint newer than metrics.jsonl's last record (by a log step or more) leaves a gap in
    the metrics: one warning line says so; a resume within one log window of the last record does not."""
    cfg = load_config(None, [f"run.dir={tmp_path}", "wandb.mode=disabled", "train.log_every=2"])
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "split": "train"}) + "\n" for s in [2, 4, 6, 7, 8]))
    logger = logging.getLogger(LOG_NAME)
    if not logger.propagate:  # after setup_logging vaejob's logger does not reach the root's capture
        logger.addHandler(caplog.handler)
    try:
        Tracker(cfg, "abcd1234", enabled=True, resume_step=7).finish()  # drops 8; 7 is the resumed step
        Tracker(cfg, "abcd1234", enabled=True, resume_step=8).finish()  # a stop signal one step after a log
        assert caplog.messages == []
        Tracker(cfg, "abcd1234", enabled=True, resume_step=30).finish()
    finally:
        logger.removeHandler(caplog.handler)
    assert caplog.messages == [
        f"{path} ends at step 7 but this job resumes at step 30: the steps between have no records "
        "(a checkpoint newer than the metrics was resumed)"
    ]
    assert [r["step"] for r in metrics(tmp_path)] == [2, 4, 6, 7]


# -- launch/submit.py: which run.resume each job gets (no cluster: the dry run and the requeue objects) ------
def submitted_argv(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    """What each task of the first job passes to vaejob.train.main (submit.py --dry-run prints it)."""
    assert submit.main(["--cluster", "local", "--gpus-per-node", "0", "--dry-run", *argv]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("# each task calls"))
    return ast.literal_eval(line.split("vaejob.train.main(", 1)[1].removesuffix(")"))


def resume_values(argv: list[str]) -> list[str]:
    return [a.removeprefix("run.resume=") for a in argv if a.startswith("run.resume=")]


def test_submit_first_job_keeps_a_named_checkpoint_and_requeues_resume_auto(
    tiny_run, tmp_path, capsys, monkeypatch
):
    checkpoint = str(tiny_run / "checkpoints" / "step_00000060")
    monkeypatch.chdir(tiny_run)  # a relative PATH is made absolute, like run.dir
    overrides = tiny_overrides("shards", tmp_path / "run")
    first = submitted_argv(capsys, *overrides, "run.resume=checkpoints/step_00000060")
    assert resume_values(first) == [checkpoint]
    # Without a run.resume the first job gets auto, as before.
    assert resume_values(submitted_argv(capsys, *overrides)) == ["auto"]

    # submitit's requeue (SIGUSR2 -> checkpoint() -> a fresh pickled Trainer): the next job resumes auto.
    resubmitted = submit.Trainer(first).checkpoint()
    assert resume_values(resubmitted.function.argv) == ["auto"]
    assert resume_values(resubmitted.function.argv_for_this_run()) == ["auto"]
    assert [a for a in resubmitted.function.argv if not a.startswith("run.resume=")] == [
        a for a in first if not a.startswith("run.resume=")
    ]
    # A requeue Slurm does itself (node failure, PreemptMode=REQUEUE) reruns the first job's pickle:
    # SLURM_RESTART_COUNT > 0 tells it apart.
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resume_values(submit.Trainer(first).argv_for_this_run()) == [checkpoint]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert resume_values(submit.Trainer(first).argv_for_this_run()) == [checkpoint]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert resume_values(submit.Trainer(first).argv_for_this_run()) == ["auto"]


def test_submit_refuses_a_named_checkpoint_that_is_not_one(tmp_path, capsys):
    missing = tmp_path / "run" / "checkpoints" / "step_00000010"
    argv = ["--cluster", "local", "--dry-run", f"run.dir={tmp_path / 'run'}", f"run.resume={missing}"]
    code = submit.main(argv)  # fails on the submit host, before anything is queued
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("submit.py: error: run.resume=") and str(missing) in err[0], err
    assert "is not a complete checkpoint dir" in err[0], err
