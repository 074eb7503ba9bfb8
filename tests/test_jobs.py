"""The cluster path: `ray start --head` on 127.0.0.1, then `ray job submit` of
jobs/pretrain.py, as a user runs it."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_job_submit_trains_and_tracks(tmp_path, repo_root, tiny_shards, ray_head):
    address, env = ray_head
    db = tmp_path / "mlflow.db"
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(repo_root), "--",
         "python", "jobs/pretrain.py", "--config", "configs/tiny.yaml",
         "--set", f"data.train_shards={tiny_shards}", "--set", f"train.storage={tmp_path}/runs",
         "--set", f"tracking.uri=sqlite:///{db}", "--set", "train.steps=3", "--set", "train.checkpoint_every=3",
         "--set", "data.num_workers=0"],
        env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in job.stdout + job.stderr
    client = MlflowClient(f"sqlite:///{db}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "make-dist-tiny"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert {"loss/total", "loss/mkcl", "loss/slra", "lr", "samples_per_s"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")] == [1, 2, 3]
    model = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/open_clip_pytorch_model.bin" in model


def test_sweep_job_runs_trials_nested_in_mlflow(tmp_path, repo_root, tiny_shards, ray_head):
    """A 2-trial sweep over the learning rate, each trial a whole training run
    reporting a held-out metric, through `ray job submit`."""
    address, env = ray_head
    synth = Path(tiny_shards).parent.parent / "synth"
    db = tmp_path / "mlflow.db"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": str(repo_root / "configs/tiny.yaml"),
        "set": [f"data.train_shards={tiny_shards}", "train.steps=2", "train.checkpoint_every=2", "train.workers=1",
                "data.num_workers=0", f"evaluation.classify_table={synth}/eval/classify.csv",
                f"evaluation.classes={synth}/classes.yaml", f"evaluation.images_root={synth}",
                "evaluation.every_steps=1", f"tracking.uri=sqlite:///{db}"],
        "space": {"optim.lr": {"grid": [1.0e-4, 5.0e-4]}},
        # fifo: ASHA may stop the second trial at its first report when it scores
        # below the first, which made this test pass or fail by the draw
        "metric": "eval/classify/top1", "mode": "max", "scheduler": "fifo",
        "storage": str(tmp_path / "runs"), "name": "lr",
    }))
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(repo_root), "--",
         "python", "jobs/sweep.py", "--config", str(sweep)], env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "2 trials (0 failed); best eval/classify/top1" in job.stdout + job.stderr
    client = MlflowClient(f"sqlite:///{db}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "make-dist-tiny"]
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "sweep lr"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    assert sorted(float(t.data.params["optim.lr"]) for t in trials) == [1e-4, 5e-4]
    for t in trials:  # each trial's curves and held-out metric at both steps
        assert [m.step for m in client.get_metric_history(t.info.run_id, "eval/classify/top1")] == [1, 2]
        assert len(client.get_metric_history(t.info.run_id, "loss/total")) == 2
    top1 = {float(t.data.params["optim.lr"]): t.data.metrics["eval/classify/top1"] for t in trials}
    best = max(top1.values())
    assert parent.data.metrics["best/eval/classify/top1"] == pytest.approx(best)
    # on 40 images both trials may score alike: the best is then either of them
    assert top1[float(parent.data.params["best.optim.lr"])] == pytest.approx(best)
    assert parent.info.status == "FINISHED"
