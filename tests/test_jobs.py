"""The cluster path: `ray start --head` on 127.0.0.1, then `ray job submit` of
jobs/pretrain.py, as a user runs it."""

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    dashboard = free_port()
    # Token authentication, as a cluster should run: the head and the submitting
    # client share one token (RAY_AUTH_MODE must be set for both, see docs/cluster.md).
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_TMPDIR=f"/tmp/mdj{dashboard}",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=180)
    yield f"http://127.0.0.1:{dashboard}", env
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


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
