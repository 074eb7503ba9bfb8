"""The `make-dist` command line, run as a user runs it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

EXE = Path(sys.executable).parent / "make-dist"  # the installed console script


def run(*args, cwd=None):
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_help_lists_subcommands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("config", "model", "synth", "shards", "train", "demo", "eval", "sweep", "wheelhouse"):
        assert command in out.stdout


def test_config_prints_resolved_yaml(repo_root):
    out = run("config", "--config", str(repo_root / "configs/tiny.yaml"), "--set", "loss.lam=0.25")
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["loss"]["lam"] == 0.25 and resolved["model"]["name"] == "make-tiny"


def test_config_prints_the_steps_of_the_epochs(repo_root, tmp_path):
    import json

    (tmp_path / "manifest.json").write_text(json.dumps({"samples": 403_563, "shards": ["a.tar"], "subtexts": 8}))
    out = run("config", "--config", str(repo_root / "configs/paper.yaml"),
              "--set", f"data.train_shards={tmp_path / 'manifest.json'}")
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["train"]["steps"] == 2956
    assert "train.steps = 2956: 15 epochs of 403,563 samples at 2,048 a step (1 x 2048)" in out.stdout
    out = run("config", "--config", str(repo_root / "configs/paper.yaml"))  # no shards named: says so
    assert out.returncode == 0 and "train.steps follows from the sample count" in out.stdout


def test_bad_config_fails_naming_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: fast\n")
    out = run("config", "--config", str(path))
    assert out.returncode == 2
    assert f"{path}: optim.lr = 'fast': expected a number" in out.stderr
    assert "Traceback" not in out.stderr


def test_model_export(repo_root, tmp_path):
    out = run("model", "--config", str(repo_root / "configs/tiny.yaml"), "--export", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr
    assert "M parameters" in out.stdout
    assert (tmp_path / "m/open_clip_config.json").is_file() and (tmp_path / "m/open_clip_pytorch_model.bin").is_file()


def test_synth_then_shards(repo_root, tmp_path):
    out = run("synth", "--out", str(tmp_path / "synth"), "--n", "20", "--n-eval", "5", "--size", "64", "--workers", "1")
    assert out.returncode == 0, out.stderr
    assert "20 training and 5 held-out images" in out.stdout
    out = run("shards", "--table", str(tmp_path / "synth/train.csv"), "--images-root", str(tmp_path / "synth"),
              "--out", str(tmp_path / "shards"), "--columns", str(repo_root / "configs/columns/synthetic.yaml"),
              "--shard-size", "8", "--workers", "1")
    assert out.returncode == 0, out.stderr
    assert "20 samples in 3 shards" in out.stdout and "skipped 0 rows" in out.stdout


def test_shards_with_missing_table_fails_clearly(repo_root, tmp_path):
    out = run("shards", "--table", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o"),
              "--columns", str(repo_root / "configs/columns/synthetic.yaml"))
    assert out.returncode == 2 and "table not found" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path):
    """The README's first command, at a small size (the default run is timed in
    docs/BENCHMARKS.md): three objectives, intervals, a quiet terminal. Ray's
    temp folder records a cluster that is gone (as a crashed `ray start
    --head` leaves it): the demo starts its own Ray instead of joining it."""
    ray_tmp = Path(f"/tmp/mdd{os.getpid()}")  # short: Ray's socket paths live under it
    (ray_tmp / "ray").mkdir(parents=True, exist_ok=True)
    (ray_tmp / "ray/ray_current_cluster").write_text("127.0.0.1:6390")
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp))
    try:
        out = subprocess.run([str(EXE), "demo", "--out", str(tmp_path / "demo"), "--n", "120", "--n-eval", "40",
                              "--steps", "4", "--seed", "3"], capture_output=True, text=True, timeout=900,
                             cwd=tmp_path, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for line in ("[1/5] synthesising 120 training and 40 held-out", "[2/5] writing shards", "[3/5] MAKE (make)",
                 "[4/5] CLIP (clip)", "[5/5] CLIP + knowledge (clip-knowledge)", "make-dist demo: done",
                 "120 training samples, 4 steps x 2 workers", "zero-shot on 40 held-out images",
                 "classify/top1", "concepts/mean_auroc", "retrieval/mean_recall", "MAKE - CLIP + knowledge",
                 "x chance", "the libraries' logs go to", "Ray's and the workers' logs:"):
        assert line in out.stdout, line
    for noise in ("WARNING", "(RayTrainWorker", "(TrainController", "Traceback"):  # in the log files instead
        assert noise not in out.stdout + out.stderr, noise
    models = list((tmp_path / "demo/runs").glob("*-demo-s3-*/model/open_clip_pytorch_model.bin"))
    assert len(models) == 3  # MAKE and both CLIP arms
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("make-dist-demo").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name.startswith("demo s3 ")]
    arms = {r.info.run_name.split(" · ")[0]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(arms) == {"MAKE", "CLIP", "CLIP + knowledge"}  # named by what differs, first
    assert parent.info.status == "FINISHED" and "| **MAKE - CLIP** |" in parent.data.tags["mlflow.note.content"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.json", "comparison.md"}
    assert "make_minus_clip/classify/top1" in parent.data.metrics
    models = {client.get_logged_model(r.outputs.model_outputs[-1].model_id).name for r in arms.values()}
    assert models == {"make", "clip", "clip-knowledge"}  # one model name per objective
    assert {d.dataset.name for d in arms["MAKE"].inputs.dataset_inputs} == {
        "shards", "classify table", "concepts table", "retrieval table"}
    results = json.loads((tmp_path / "demo/results.json").read_text())
    assert set(results["arms"]) == {"MAKE", "CLIP", "CLIP + knowledge"} and results["seed"] == 3
    for arm in results["arms"].values():
        for e in arm.values():
            assert e["low"] <= e["value"] <= e["high"]
    assert (tmp_path / "mlflow.db").is_file()  # the default store, in the working directory


def test_a_job_in_a_python_without_the_dependencies_says_so(repo_root, tmp_path):
    """As under a Ray head started outside the project's environment: one line
    naming the Python, the missing module and how to start the head."""
    out = subprocess.run([sys.executable, "-S", str(repo_root / "jobs/pretrain.py"), "--config", "x.yaml"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"this Python ({sys.executable}) cannot import make-dist's dependencies (No module named" in out.stderr
    assert "PATH=$PWD/.venv/bin:$PATH ray start --head" in out.stderr and "-- $PWD/.venv/bin/python jobs/" in out.stderr
