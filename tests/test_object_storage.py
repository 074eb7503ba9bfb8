"""Object storage for real: a moto S3 server on 127.0.0.1, reached through the
standard AWS settings (AWS_ENDPOINT_URL, keys, region), as a user's S3 or
S3-compatible store is. Shards, training, checkpoints, resume, export and
held-out evaluation all on s3://; bad settings refused before any worker starts."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import fsspec
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST_REPORTS, free_port, run_command, tracking_db, wait_for_dashboard
from make_dist.config import load_config
from make_dist.errors import UserError

pytestmark = pytest.mark.slow
EXE = Path(sys.executable).parent / "make-dist"


def _fresh_s3():
    """s3fs keeps its filesystems by arguments, not by environment: forget them after a change."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return fsspec.filesystem("s3")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 server (moto) and the environment that points at it, for this
    process, its Ray workers (started after) and the commands it runs."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "make-dist-test",
           "AWS_SECRET_ACCESS_KEY": "make-dist-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.3)
    _fresh_s3().mkdir("make")
    yield env
    server.terminate()
    server.wait(timeout=30)
    log.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _fresh_s3()


@pytest.fixture(scope="module")
def mlflow_server(s3, tmp_path_factory):
    """`mlflow server` on 127.0.0.1: runs in SQLite, artifacts in the bucket
    (--artifacts-destination; clients upload through the server). Started
    here, waited for where it is first needed. One request worker and no job
    runner, as docs/cluster.md sizes a laptop's server: MLflow's defaults
    start 4 workers and 9 job processes, each importing mlflow. Its store is
    its own (a client-made one would keep artifacts of the default experiment
    in the client's folder, not in the bucket)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(
        [Path(sys.executable).parent / "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/runs.db",
         "--artifacts-destination", "s3://make/mlflow", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"

    def ready() -> str:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                return url
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)

    yield ready
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def ray_with_s3(s3):
    """An embedded Ray started after the AWS settings: its workers inherit them."""
    import ray

    from make_dist.train.cluster import init_ray

    init_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_shards(s3, tiny_shards, repo_root):
    """The training tests' synthetic set, sharded into the bucket by the command a user runs."""
    synth = Path(tiny_shards).parent.parent / "synth"
    shards = run_command([EXE, "shards", "--table", synth / "train.csv", "--images-root", synth,
                          "--out", "s3://make/shards", "--columns", repo_root / "configs/columns/synthetic.yaml",
                          "--shard-size", "16", "--workers", "1"], env={**os.environ, **s3})
    assert shards.returncode == 0, shards.stdout[-3000:] + shards.stderr[-3000:]
    assert "make/shards/manifest.json" in _fresh_s3().find("make/shards")
    return "s3://make/shards/manifest.json"


def _config(tmp_path, repo_root, **extra):
    values = {"data.train_shards": "s3://make/shards/manifest.json", "train.storage": "s3://make/runs",
              "tracking.uri": tracking_db(tmp_path / "mlflow.db"), "train.name": "on-s3", "data.num_workers": 0,
              "train.checkpoint_every": 2, **extra}
    return load_config(repo_root / "configs/tiny.yaml", [f"{k}={v}" for k, v in values.items()])


def test_shards_training_checkpoints_resume_and_evaluation_on_s3(tmp_path, repo_root, tiny_shards, s3, s3_shards,
                                                                 mlflow_server, ray_with_s3, capfd):
    """Everything a run touches in the bucket, tracked by an MLflow server
    whose artifacts are in the bucket too; the held-out tables and the
    paper's suite (a small copy of the authors' layout) evaluated during
    training, every 2 steps, logged to the run."""
    from paper_layout import write_paper_data

    from make_dist.train.launch import fit

    synth = Path(tiny_shards).parent.parent / "synth"
    fs = _fresh_s3()
    for folder in ("eval", "images"):  # the held-out tables and their images
        fs.put(str(synth / folder), f"make/synth/{folder}", recursive=True)
    fs.put(str(synth / "classes.yaml"), "make/synth/classes.yaml")
    fs.put(str(write_paper_data(tmp_path / "paper", sets=("PAD", "skincon"))), "make/paper/data", recursive=True)
    settings = {"evaluation.every_steps": 2, "evaluation.images_root": "s3://make/synth",
                "evaluation.classify_table": "s3://make/synth/eval/classify.csv",
                "evaluation.classes": "s3://make/synth/classes.yaml",
                "evaluation.retrieval_table": "s3://make/synth/eval/retrieval.csv",
                "evaluation.suite": "paper", "evaluation.suite_data": "s3://make/paper/data"}

    tracking = mlflow_server()
    settings.update({"tracking.uri": tracking, "tracking.register": "derm-make"})
    fit(_config(tmp_path, repo_root, **{"train.steps": 4, **settings}))
    files = fs.find("make/runs/on-s3")
    assert sum(f.endswith("/latest") for f in files) == 2  # the checkpoints of steps 2 and 4, in the bucket
    assert "make/runs/on-s3/model/open_clip_config.json" in files  # the export
    assert not any(".make-dist-probe" in f for f in files)

    fit(_config(tmp_path, repo_root, **{"train.steps": 6, **settings}))  # the same run, longer: it resumes
    assert "resumed from the checkpoint of step 4" in capfd.readouterr().out
    client = MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("make-dist-tiny").experiment_id])
    history = lambda key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))  # noqa: E731
    assert max(step for step, _ in history("loss/total")) == 6 and run.info.status == "FINISHED"
    # once per evaluation: linking a fit's last values to its model adds no point
    assert [step for step, _ in history("eval/classify/top1")] == [2, 4, 6]
    assert run.data.tags["eval/retrieval/scored"] == "40" and run.data.tags["eval/paper/PAD-UFES-20/scored"] == "9"
    assert "eval/paper/concepts_avg_auroc" in run.data.metrics
    # what keeps the suite from the paper's protocol, on the run: make-dist's terms, 1 of 4 classification sets
    assert run.data.tags["eval/paper/SkinCon/concept_terms"] == "make-dist"
    assert run.data.tags["eval/paper/classify_avg_top1/sets"] == "1 of 4"
    artifacts = lambda folder: {a.path for a in client.list_artifacts(run.info.run_id, folder)}  # noqa: E731
    assert "eval/classify/confusion_matrix.png" in artifacts("eval/classify")
    assert "eval/paper/SkinCon/concept_auroc.png" in artifacts("eval/paper/SkinCon")
    stored = fs.find("make/mlflow")  # the artifacts, uploaded through the server into the bucket
    # the weights once a fit: in its Logged Model (two fits, two models), not again among the run's artifacts
    assert sum(f.endswith("/open_clip_pytorch_model.bin") for f in stored) == 2
    assert "model" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert any(f.endswith("/eval/classify/confusion_matrix.png") for f in stored)
    assert not list(Path.cwd().glob("mlruns")) and not list(Path.cwd().glob("mlartifacts"))

    # the model: a pyfunc Logged Model of the run, registered (a version per fit), its metrics linked
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    versions = client.search_model_versions("name = 'derm-make'")
    assert sorted(int(v.version) for v in versions) == [1, 2] and {v.run_id for v in versions} == {run.info.run_id}
    model = client.get_logged_model(run.outputs.model_outputs[-1].model_id)
    assert model.source_run_id == run.info.run_id and "eval/classify/top1" in {m.key for m in model.metrics}
    assert model.experiment_id == run.info.experiment_id  # shown on the run's page and its experiment's Models tab
    listed = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert model.model_id in {m.model_id for m in listed}
    mlflow.set_tracking_uri(tracking)  # a request as a caller sends it, beside the model
    assert mlflow.models.Model.load(f"models:/{model.model_id}").saved_input_example_info["type"] == "dataframe"
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert "s3://make/shards/manifest.json" in inputs["shards"].dataset.source
    assert {t.value for t in inputs["classify table"].tags} == {"evaluation"}  # the held-out tables, as such
    # loaded in a fresh process, from the registry, with the package alone
    image = (synth / "images").rglob("*.jpg").__next__().read_bytes()
    script = ("import sys, mlflow, pandas as pd\n"
              "model = mlflow.pyfunc.load_model('models:/derm-make/2')\n"
              f"out = model.predict(pd.DataFrame({{'image': [{image!r}] * 2}}), "
              "params={'classes': ['psoriasis', 'eczema', 'melanoma']})\n"
              "print(list(out.columns), out.shape, round(float(out.sum(axis=1).min()), 4))\n"
              "print(model.predict(pd.DataFrame({'image': [" + repr(image) + "]}), "
              "params={'output': 'embeddings'}).shape)\n")
    loaded = run_command([sys.executable, "-c", script], env={**os.environ, "MLFLOW_TRACKING_URI": tracking},
                         cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "['psoriasis', 'eczema', 'melanoma'] (2, 3) 1.0" in loaded.stdout
    assert "(1, 128)" in loaded.stdout  # no classes: the embedding (make-tiny: 128 wide)


def test_a_runs_lease_holds_in_the_bucket(s3, capfd):
    """The lease on object storage: created only if absent (a conditional
    put), a second holder refused naming the first, given back at the end,
    and one left by a holder on another machine taken over once old."""
    from make_dist import lease
    from make_dist.lease import Lease

    folder = "s3://make/leases/run"
    with Lease(folder, "make-dist training run", rename="give this run another train.name"):
        with pytest.raises(UserError, match=r"s3://make/leases/run is in use by another run \(make-dist training run "
                                            rf"on host .*, pid {os.getpid()},"):
            Lease(folder, "make-dist training run", rename="-").acquire()
    fs = _fresh_s3()
    assert not fs.glob("make/leases/run/.lease-*")
    stale = dataclasses.asdict(lease.Holder.me("make-dist training run"))
    stale.update(host="node-7", boot="another", pid=1, renewed=time.time() - lease.TTL_S - 1)
    fs.pipe("make/leases/run/.lease-000000.json", json.dumps(stale).encode())
    with Lease(folder, "make-dist training run", rename="-"):
        fs = _fresh_s3()
        assert fs.glob("make/leases/run/.lease-*") == ["make/leases/run/.lease-000001.json"]
        assert json.loads(fs.cat("make/leases/run/.lease-000001.json"))["pid"] == os.getpid()
    assert "taking over the lease" in capfd.readouterr().err


def test_bad_storage_settings_are_refused_before_any_worker(tmp_path, repo_root, tiny_shards, s3, monkeypatch):
    from make_dist.train.launch import check

    local = {"data.train_shards": tiny_shards}
    with pytest.raises(UserError, match="train.storage = s3://no-such-bucket/runs: no bucket 'no-such-bucket'"):
        check(_config(tmp_path, repo_root, **local, **{"train.storage": "s3://no-such-bucket/runs"}))
    assert not _fresh_s3().exists("no-such-bucket")  # a misspelt bucket is not created

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    _fresh_s3()
    start = time.time()
    with pytest.raises(UserError, match=r"train.storage = s3://make/runs: cannot write there \(cannot reach the "
                                        r"storage endpoint \(http://127.0.0.1:\d+, from AWS_ENDPOINT_URL\)"):
        check(_config(tmp_path, repo_root, **local))
    assert time.time() - start < 60

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["AWS_ENDPOINT_URL"])
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _fresh_s3()
    with pytest.raises(UserError, match="shards manifest s3://make/shards/manifest.json: no credentials: set "
                                        "AWS_ACCESS_KEY_ID"):
        check(_config(tmp_path, repo_root))
    monkeypatch.undo()

    # keys that may read the bucket but not write it: the server enforces IAM for this part
    import boto3

    iam = boto3.client("iam", endpoint_url=s3["AWS_ENDPOINT_URL"])
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}))
    keys = iam.create_access_key(UserName="reader")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys["SecretAccessKey"])
    _fresh_s3()
    enforce = lambda count: urllib.request.urlopen(  # noqa: E731  (moto: requests allowed before IAM applies)
        urllib.request.Request(f"{s3['AWS_ENDPOINT_URL']}/moto-api/reset-auth", data=count, method="POST",
                               headers={"Content-Type": "text/plain"}))
    enforce(b"0")
    try:
        with pytest.raises(UserError, match=r"train.storage = s3://make/runs: cannot write there \(permission "
                                            r"denied \(Forbidden\): the credentials in use may not"):
            check(_config(tmp_path, repo_root, **local))
    finally:
        enforce(b"inf")
        monkeypatch.undo()
        _fresh_s3()


def _ray_node(env: dict, *args: str) -> subprocess.Popen:
    """One node of a local cluster (`ray start --block`), 1 CPU, its own temp
    folder: two nodes on one machine would otherwise share one, and one node's
    clean-up would delete the other's job files."""
    return subprocess.Popen([Path(sys.executable).parent / "ray", "start", "--block", "--node-ip-address=127.0.0.1",
                             "--num-cpus=1", "--disable-usage-stats", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_a_lost_node_is_replaced_and_the_run_resumes_from_the_bucket(tmp_path, repo_root, s3, s3_shards):
    """Two Ray nodes (a head and a worker node, `ray start`, 1 CPU each, so
    one training worker on each), storage on s3:// only, the job submitted
    with `ray job submit`. The worker node is killed mid-run and a new one
    joins, as an autoscaler would bring: the run resumes from its last
    checkpoint in the bucket and reaches its planned step count, every step
    and the exported model in its MLflow run."""
    import secrets
    import signal

    port, dashboard = free_port(), free_port()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32), **FAST_REPORTS)
    folders = [f"/tmp/mdn{port}-{i}" for i in range(3)]  # short: Ray's socket paths have a length limit
    nodes = [_ray_node(env, "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                       f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={folders[0]}")]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(address, nodes[0])
        nodes.append(_ray_node(env, f"--address=127.0.0.1:{port}", f"--temp-dir={folders[1]}"))
        log = tmp_path / "job.log"
        with open(log, "w") as out:
            job = subprocess.Popen(
                [Path(sys.executable).parent / "ray", "job", "submit", "--address", address, "--working-dir",
                 repo_root, "--", "python", "jobs/pretrain.py", "--config", "configs/tiny.yaml",
                 "--set", f"data.train_shards={s3_shards}", "--set", "train.storage=s3://make/nodes",
                 "--set", f"tracking.uri={tracking_db(tmp_path / 'mlflow.db')}", "--set", "train.name=two-nodes",
                 "--set", "train.steps=16", "--set", "train.checkpoint_every=2", "--set", "train.max_failures=2",
                 "--set", "data.num_workers=0", "--set", "tracking.log_model=false"],
                env=env, stdout=out, stderr=subprocess.STDOUT)
        fs = _fresh_s3()
        snapshot = "make/nodes/two-nodes/checkpoint_manager_snapshot.json"
        deadline = time.time() + 300
        while True:  # a checkpoint Ray Train committed (every rank's part in the bucket), not one mid-upload
            fs.invalidate_cache()
            try:
                committed = json.loads(fs.cat(snapshot))["latest_checkpoint_result"]["metrics"]["step"]
                break
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                assert time.time() < deadline and job.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
        os.killpg(nodes[1].pid, signal.SIGKILL)  # the worker node and its training worker, at once
        nodes[1].wait()
        nodes.append(_ray_node(env, f"--address=127.0.0.1:{port}", f"--temp-dir={folders[2]}"))
        assert job.wait(timeout=480) == 0, log.read_text()[-5000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    text = log.read_text()
    resumed = [int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if "resumed from the checkpoint of step" in line]
    assert resumed and resumed[0] >= committed, text[-5000:]
    assert "succeeded" in text
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("make-dist-tiny").experiment_id])
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss/total")}
    assert max(steps) == 16 and set(range(resumed[0] + 1, 17)) <= steps  # every step after the resume
    assert {"loss/total", "loss/mkcl", "loss/slra", "lr", "samples_per_s"} <= set(run.data.metrics)
    assert run.data.tags["ray.job_submission_id"].startswith("raysubmit_")  # the job it ran as
    assert "model/open_clip_pytorch_model.bin" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert run.info.status == "FINISHED"


def test_a_sweep_on_s3_tracked_by_the_server_resumes_after_its_driver_dies(tmp_path, repo_root, tiny_shards, s3,
                                                                           s3_shards, mlflow_server):
    """A real `make-dist sweep` with its storage in the bucket (Tune's state,
    the trials' checkpoints) and its runs on the MLflow server: killed (its
    whole process group) once a trial has finished, run again, it resumes from
    the bucket and the parent run completes."""
    import signal

    synth = Path(tiny_shards).parent.parent / "synth"
    tracking = mlflow_server()
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({  # YAML's superset: JSON
        "base": str(repo_root / "configs/tiny.yaml"), "name": "resumable", "storage": "s3://make/sweeps",
        "scheduler": "fifo", "metric": "eval/classify/top1", "mode": "max",
        "space": {"optim.lr": {"grid": [1e-4, 5e-4]}},
        "set": [f"data.train_shards={s3_shards}", "model.name=make-micro", "train.steps=2", "train.checkpoint_every=2",
                "train.workers=1", "data.num_workers=0", f"evaluation.classify_table={synth}/eval/classify.csv",
                f"evaluation.classes={synth}/classes.yaml", f"evaluation.images_root={synth}",
                f"tracking.uri={tracking}", "tracking.experiment=sweep-on-s3"]}))  # the server's other runs apart
    cmd = [str(EXE), "sweep", "--config", str(sweep)]
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    client = MlflowClient(tracking)
    deadline, finished = time.time() + 240, []
    while time.time() < deadline and first.poll() is None and not finished:  # until one trial's run is complete
        experiment = client.get_experiment_by_name("sweep-on-s3")
        finished = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED'"
                                      ) if experiment else []
        time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert finished and first.returncode != 0, (tmp_path / "first.log").read_text()[-3000:]

    again = run_command(cmd, timeout=300, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming from s3://make/sweeps/resumable/tune" in again.stdout
    assert "2 trials (0 failed, 0 stopped early)" in again.stdout
    runs = client.search_runs([client.get_experiment_by_name("sweep-on-s3").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "sweep resumable"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and "best/eval/classify/top1" in parent.data.metrics
    assert sorted({float(t.data.params["optim.lr"]) for t in trials if t.info.status == "FINISHED"}) == [1e-4, 5e-4]
    fs = _fresh_s3()
    stored = fs.find("make/sweeps/resumable")
    assert any("/tune/" in f for f in stored)  # Tune's experiment state
    assert sum(f.startswith("make/sweeps/resumable/trials/trial-") and f.endswith("/latest") for f in stored) >= 2
    assert parent.data.tags["make_dist.best_model"].startswith("s3://make/sweeps/resumable/trials/trial-")
    assert any(f.endswith("/sweep/summary.json") for f in fs.find("make/mlflow"))  # through the server
    assert not list(tmp_path.glob("mlruns")) and not list(tmp_path.glob("runs"))
