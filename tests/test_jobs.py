"""The cluster path: `ray start --head` on 127.0.0.1, then `ray job submit` of
jobs/sweep.py, as a user runs it, and the shipped sweeps. (`ray job submit` of
jobs/pretrain.py runs on two nodes in test_object_storage.py.)"""

import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import run_command, tracking_db

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def tiny(tiny_shards, db, storage) -> list[str]:
    """--set arguments that run a shipped sweep file at a tiny size on the
    tests' data and the smallest model (make-micro), its cadences (checkpoint,
    evaluation, ASHA) left as shipped."""
    synth = Path(tiny_shards).parent.parent / "synth"
    keys = [f"data.train_shards={tiny_shards}", "model.name=make-micro", "data.batch_size=4", "data.num_workers=0",
            "train.workers=1",
            f"evaluation.classify_table={synth}/eval/classify.csv", f"evaluation.classes={synth}/classes.yaml",
            f"evaluation.concepts_table={synth}/eval/concepts.csv",
            f"evaluation.retrieval_table={synth}/eval/retrieval.csv", f"evaluation.images_root={synth}",
            f"tracking.uri={tracking_db(db)}", f"sweep.storage={storage}"]
    return [arg for key in keys for arg in ("--set", key)]


def sweep_runs(db, name):
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if r.info.run_name == f"sweep {name}"]
    return client, parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def test_the_shipped_ablation_runs_to_its_end(tmp_path, repo_root, tiny_shards):
    """configs/sweep_ablation.yaml as shipped, one seed and two trials at a
    time, its cadences scaled down 10x (20 steps of batch 4, checkpoints every 10,
    an evaluation at 20): a checkpoint comes before the first evaluation, which
    once killed the sweep."""
    db = tmp_path / "mlflow.db"
    out = run_command([BIN / "make-dist", "sweep", "--config", repo_root / "configs/sweep_ablation.yaml",
                       *tiny(tiny_shards, db, tmp_path / "runs"), "--set", "train.steps=20",
                       "--set", "train.checkpoint_every=10", "--set", "evaluation.every_steps=20",
                       "--set", "sweep.seeds=1", "--set", "sweep.max_concurrent=2"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "6 trials (0 failed, 0 stopped early); best eval/classify/top1" in out.stdout
    # progress a person can read: every row started and ended (two at a time start in either order)
    started = [line for line in out.stdout.splitlines() if " started: config={'name': " in line]
    assert sorted(line.split(": ", 1)[0] for line in started) == [f"trial {i}/6 started" for i in range(1, 7)]
    assert {line.split("'name': ")[1].split("'")[1] for line in started} == {
        row["name"] for row in yaml.safe_load((repo_root / "configs/sweep_ablation.yaml").read_text())
        ["space"]["config"]["grid"]}
    assert sum(line.endswith(" ended") for line in out.stdout.splitlines()) == 6
    assert "WARNING" not in out.stdout and "(RayTrainWorker" not in out.stdout  # the libraries' logs: in files
    client, parent, trials = sweep_runs(db, "ablation")
    assert len(trials) == 6 and all(t.info.status == "FINISHED" for t in trials)
    assert sorted(t.data.tags["make_dist.objective"] for t in trials) == ["clip", "clip-knowledge"] + ["make"] * 4
    for t in trials:  # the held-out metric at the step that evaluated it, and only there
        assert [m.step for m in client.get_metric_history(t.info.run_id, "eval/classify/top1")] == [20]
    note = parent.data.tags["mlflow.note.content"]  # the comparison at a glance, on the parent's page
    assert "| CLIP + knowledge | 1 |" in note and "Best: trial" in note
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} >= {
        "sweep/rows.png", "sweep/summary.json", "sweep/trials.md"}
    best = parent.data.tags["make_dist.best_trial_run"]
    assert best in {t.info.run_id for t in trials} and Path(parent.data.tags["make_dist.best_model"]).is_dir()


def test_the_shipped_lr_lambda_sweep_runs_under_job_submit(tmp_path, repo_root, tiny_shards, ray_head):
    """configs/sweep_lr_lambda.yaml as shipped (checkpoints every 20,
    evaluations every 50, ASHA from step 50) but 100 steps, not 200, through
    `ray job submit`; one draw of the learning rate per lambda (3 trials),
    two at a time."""
    address, env = ray_head
    db = tmp_path / "mlflow.db"
    job = run_command(
        [BIN / "ray", "job", "submit", "--address", address, "--working-dir", repo_root, "--",
         "python", "jobs/sweep.py", "--config", "configs/sweep_lr_lambda.yaml", *tiny(tiny_shards, db, tmp_path),
         "--set", "sweep.samples=1", "--set", "sweep.max_concurrent=2", "--set", "train.steps=100"],
        env=env)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "3 trials (0 failed" in job.stdout
    client, parent, trials = sweep_runs(db, "lr_lambda")
    assert len(trials) == 3 and parent.info.status == "FINISHED"
    for t in trials:  # finished, or stopped by ASHA at an evaluation and marked so
        steps = [m.step for m in client.get_metric_history(t.info.run_id, "eval/classify/top1")]
        if t.info.status == "FINISHED":
            assert steps == [50, 100]
        else:
            assert t.info.status == "KILLED" and steps == [50] and "ASHA" in t.data.tags["make_dist.stopped"]


def test_a_job_whose_results_would_vanish_with_the_ray_session_is_refused(tmp_path, repo_root, tiny_shards, ray_head):
    """Under `ray job submit --working-dir .` a job runs in Ray's copy of the
    folder: the default MLflow store and a relative train.storage would be
    written there and deleted with the Ray session. Refused before any
    worker starts, naming the setting to give."""
    address, env = ray_head
    submit = [BIN / "ray", "job", "submit", "--address", address, "--working-dir", repo_root, "--",
              "python", "jobs/pretrain.py", "--config", "configs/tiny.yaml", "--set", f"data.train_shards={tiny_shards}"]
    job = run_command(submit, env=env)
    assert job.returncode != 0
    said = job.stdout + job.stderr
    assert "make-dist: train.storage = runs: this job runs in Ray's copy of its working directory (" in said, said[-3000:]
    assert "give train.storage an absolute path on storage that lasts, or a URL (s3://BUCKET/PATH)" in said
    assert "Traceback" not in said and "RayTrainWorker" not in said
    job = run_command([*submit, "--set", f"train.storage={tmp_path}/runs"], env=env)
    assert job.returncode != 0 and "make-dist: tracking.uri is not set: this job runs in Ray's copy" in job.stdout


def test_asha_stops_the_weak_trials_and_says_so(tmp_path, repo_root, tiny_shards, ray_head):
    """2 trials in the order lambda 0, 2: the second adds about 2 ln(batch) of
    the fine-grained term to the total loss, so at step 3 it is below the
    first, and ASHA stops it there.
    With another Ray running on the machine (ray_head): the embedded sweep's
    workers once lost track of their own cluster, a stopped trial's CPUs were
    never freed and the last trial waited forever."""
    db = tmp_path / "mlflow.db"
    sweep = tmp_path / "asha.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": str(repo_root / "configs/tiny.yaml"),
        "set": ["train.steps=6", "train.checkpoint_every=2", "evaluation.every_steps=3"],
        "space": {"loss.lam": {"grid": [0.0, 2.0]}},
        "metric": "loss/total", "mode": "min", "scheduler": "asha",
        "asha": {"grace_period": 3, "reduction_factor": 2}, "name": "asha",
    }))
    out = run_command([BIN / "make-dist", "sweep", "--config", sweep, *tiny(tiny_shards, db, tmp_path / "runs")])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "2 trials (0 failed, 1 stopped early)" in out.stdout
    client, parent, trials = sweep_runs(db, "asha")
    status = sorted((float(t.data.params["loss.lam"]), t.info.status) for t in trials)
    assert status == [(0.0, "FINISHED"), (2.0, "KILLED")]
    for t in trials:
        if t.info.status == "KILLED":
            assert t.data.tags["make_dist.stopped"].startswith("early: stopped by ASHA at step 3")
    assert parent.data.params["best.loss.lam"] == "0.0"
