"""Training: real Ray Train workers, real DeepSpeed on gloo, real MLflow (sqlite).

A tiny model and a few steps each; one embedded Ray serves the in-process
runs, and the stop/restart and fault runs are real `make-dist train`
processes, stopped or shot for real.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import tracking_db
from mlflow.tracking import MlflowClient

from make_dist.config import load_config
from make_dist.model import build_model

pytestmark = pytest.mark.slow
EXE = Path(sys.executable).parent / "make-dist"


@pytest.fixture(scope="module")
def shards(tiny_shards):
    return tiny_shards


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from make_dist.train.cluster import init_ray

    init_ray()
    yield
    ray.shutdown()


def overrides(tmp_path, shards, **extra):
    values = {"data.train_shards": shards, "train.storage": str(tmp_path / "runs"),
              "tracking.uri": tracking_db(tmp_path / "mlflow.db"), "train.steps": 2, "train.checkpoint_every": 2,
              "data.num_workers": 0, "tracking.log_model": False, **extra}  # logged models: test_object_storage
    return [f"{k}={v}" for k, v in values.items()]


def tiny(tmp_path, shards, repo_root, **extra):
    return load_config(repo_root / "configs/tiny.yaml", overrides(tmp_path, shards, **extra))


def run_history(tmp_path, key="loss/total"):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "make-dist-tiny"]
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run, sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)


def exported_weights(run_dir):
    return torch.load(Path(run_dir) / "model/open_clip_pytorch_model.bin")


def test_two_workers_make_the_same_first_update_as_one_with_double_batch(tmp_path, shards, repo_root, ray_local,
                                                                         process_group):
    """ZeRO-2, fixed data order, no augmentation: rank r of 2 reads shard r
    (batch 8); the single worker reads shards 0 and 1 (batch 16).

    Adam's first step moves a weight by lr * g / (|g| + eps): about lr * sign(g)
    at the usual eps, blind to a gradient's scale. With eps = lr = 1e4 (and no
    weight decay) it moves it by g (1 - |g| / 1e4): the update is the gradient,
    and a gradient off by the world size would show as a factor of 2."""
    from make_dist.train.launch import fit

    same = {"data.resampled": "false", "data.augment": "false", "data.shuffle_buffer": 0, "train.steps": 1,
            "train.checkpoint_every": 1, "train.zero_stage": 2, "optim.warmup_steps": 1,
            "optim.lr": 1e4, "optim.eps": 1e4, "optim.weight_decay": 0.0}
    cfg_two = tiny(tmp_path / "two", shards, repo_root, **same, **{"train.workers": 2, "data.batch_size": 8})
    two = fit(cfg_two)
    one = fit(tiny(tmp_path / "one", shards, repo_root, **same, **{"train.workers": 1, "data.batch_size": 16}))
    a, b = exported_weights(two.run_dir), exported_weights(one.run_dir)
    torch.manual_seed(cfg_two.train.seed)
    init = build_model(cfg_two.model).clip.state_dict()
    assert a.keys() == b.keys() == init.keys()
    moved = 0
    for key in a:  # minus the gradient of the 16 samples' loss, in both runs
        step_two, step_one = a[key] - init[key], b[key] - init[key]
        assert torch.allclose(step_two, step_one, rtol=1e-3, atol=1e-6), (key, (step_two - step_one).abs().max())
        moved += bool(step_one.abs().max() > 1e-4)
    assert moved > len(a) // 2  # the step really moved the weights
    # and the losses both runs report are the one loss of the same 16 samples
    _, _, h_two = run_history(tmp_path / "two")
    _, _, h_one = run_history(tmp_path / "one")
    assert h_two[0].value == pytest.approx(h_one[0].value, rel=1e-5)
    # The same run without Ray (the Trainer in this process): the same first loss, the same update
    here = fit(tiny(tmp_path / "here", shards, repo_root, **same, **{"train.workers": 1, "data.batch_size": 16}),
               ray=False)
    _, _, h_here = run_history(tmp_path / "here")
    assert h_here[0].step == 1 and h_here[0].value == pytest.approx(h_one[0].value, rel=1e-6)
    c = exported_weights(here.run_dir)
    for key in b:  # the same update, up to the float rounding of another thread count
        assert torch.allclose(c[key] - init[key], b[key] - init[key], rtol=1e-3, atol=1e-6), key


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stages_train_through_short_batches(tmp_path, shards, repo_root, ray_local, stage):
    """Data read in order: 3 shards of 8 over 2 ranks at batch 6 give rank 0
    batches of 6, 6, 4 and rank 1 batches of 6, 2, so step 2 holds 6 + 2
    samples; the epoch ends when rank 1 runs out and step 3 starts the next.
    Unequal batches used to abort the gather (gloo) or hang it (NCCL)."""
    from make_dist.train.launch import fit

    three_shards = shards.replace("manifest.json", "shard-00000{0..2}.tar")
    result = fit(tiny(tmp_path, shards, repo_root, **{
        "train.zero_stage": stage, "train.steps": 3, "train.checkpoint_every": 2, "data.train_shards": three_shards,
        "data.resampled": "false", "data.batch_size": 6, "data.shuffle_buffer": 0}))
    client, run, history = run_history(tmp_path)
    assert [m.step for m in history] == [1, 2, 3] and all(torch.isfinite(torch.tensor(m.value)) for m in history)
    seen = sorted(client.get_metric_history(run.info.run_id, "samples_seen"), key=lambda m: m.step)
    assert [m.value for m in seen] == [12, 20, 32]  # batches of 12, 8 (the epoch's short last one), 12
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert artifacts == {"model/open_clip_config.json", "model/open_clip_pytorch_model.bin"}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "plots", "model"}
    assert run.data.params["train.zero_stage"] == str(stage)
    assert run.data.tags["system.world_size"] == "2" and run.data.tags["system.zero_stage"] == str(stage)
    assert run.data.tags["system.precision"] == "fp32" and run.data.tags["system.device"]
    assert "system/cpu_utilization_percentage" in run.data.metrics  # a run of seconds still gets its closing sample
    # what MLflow's own start_run records: the UI's "Created by", "Source" and git commit
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["mlflow.source.name"] and len(run.data.tags["mlflow.source.git.commit"]) == 40
    weights = exported_weights(result.run_dir)
    assert all(v.numel() > 0 for v in weights.values())  # ZeRO-3 shards were gathered for the export


def test_zero3_runs_the_same_text_passes_on_every_rank():
    """Length buckets differ between ranks; ZeRO-3's forward collectives need
    the same passes everywhere (a mismatch hung a 2-worker run here)."""
    for stage, want in ((0, "buckets"), (2, "buckets"), (3, "longest")):
        assert load_config(None, [f"train.zero_stage={stage}"]).text_batching() == want
    assert load_config(None, ["train.zero_stage=3", "model.text_batching=full"]).text_batching() == "full"


def test_a_sweeps_trial_that_fails_is_marked_by_its_sweep(tmp_path, shards, repo_root, ray_local):
    """A trial's training ends in an error both when it fails and when its
    scheduler stops it (Tune tears its actor down, at times after the sweep
    has marked the run KILLED: a CI run once saw a stopped trial end FAILED).
    So a trial never marks its own run failed; its sweep does, from Tune's
    result for it (here the record Tune would give for this failed trial)."""
    from types import SimpleNamespace

    from make_dist.sweep import SweepConfig, trial_records
    from make_dist.tracking import open_run
    from make_dist.train.launch import fit

    cfg = tiny(tmp_path, shards, repo_root, **{"optim.lr": 1e8, "optim.warmup_steps": 1, "train.steps": 10,
                                              "train.max_nonfinite": 1, "train.workers": 1,
                                              "train.name": "trial-t1"})
    parent = open_run(cfg, str(tmp_path / "sweep"), run_name="sweep s", params={})
    with pytest.raises(Exception, match="1 non-finite losses in a row"):
        fit(cfg, parent=parent)
    client = MlflowClient(parent.uri)
    (trial,) = client.search_runs([client.get_run(parent.id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.id}'")
    assert trial.info.status == "RUNNING"  # left to the sweep
    failed = SimpleNamespace(metrics={"trial_id": "t1", "step": 1}, path=str(tmp_path / "tune/t1"),
                             error=RuntimeError("1 non-finite losses in a row"), config={"optim.lr": 1e8})
    (row,) = trial_records([failed], SweepConfig(), cfg, parent.uri)
    assert row["status"] == "failed" and row["run_id"] == trial.info.run_id
    assert client.get_run(trial.info.run_id).info.status == "FAILED"


def plant(path: Path, marker: Path) -> None:
    """An object in a checkpoint file that runs a shell command when unpickled."""

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    state = torch.load(path, weights_only=False)  # our own file, in the test: trusted here
    state["payload"] = Payload()
    torch.save(state, path)


def test_a_resume_reads_the_newest_whole_checkpoint_and_refuses_one_that_carries_code(
        tmp_path, shards, repo_root, ray_local, capfd):
    """Two ranks under ZeRO-3, checkpoints at steps 2 and 4. Rank 1's part of
    the newer one is truncated (rank 0's reads fine): both ranks fall back to
    step 2 (had rank 1 alone failed in DeepSpeed's load, rank 0 would wait
    in its gathers for ever), each step logged once. Then an object planted
    in a checkpoint (as a tampered run folder would hold) stops the resume in
    one line naming the file, and its command never runs."""
    from make_dist.errors import UserError
    from make_dist.train.launch import fit

    settings = {"train.workers": 2, "train.checkpoint_every": 2, "train.name": "resumed", "train.zero_stage": 3}
    fit(tiny(tmp_path, shards, repo_root, **settings, **{"train.steps": 4}))
    run_dir = tmp_path / "runs/resumed"
    older, newer = sorted(run_dir.glob("checkpoint_2*"))
    part = newer / "state/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    part.write_bytes(part.read_bytes()[:1000])
    capfd.readouterr()
    fit(tiny(tmp_path, shards, repo_root, **settings, **{"train.steps": 6}))
    time.sleep(1)  # the workers' lines reach the driver's output through Ray's log monitor
    out = capfd.readouterr().out
    assert f"the checkpoint {newer} could not be read on every rank" in out, out[-3000:]
    assert f"resuming from the one before, {older}" in out and "resumed from the checkpoint of step 2" in out
    _, run, history = run_history(tmp_path)
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 ran twice, and are logged once
    assert run.info.status == "FINISHED"

    marker = tmp_path / "payload-ran"
    newest = sorted(run_dir.glob("checkpoint_2*"))[-1]
    planted = newest / "state/zero_pp_rank_0_mp_rank_00_model_states.pt"
    plant(planted, marker)
    with pytest.raises(UserError) as refused:
        fit(tiny(tmp_path, shards, repo_root, **settings, **{"train.steps": 8}))
    message = str(refused.value)
    assert message.startswith(f"resuming from {newest}: {planted} holds a Python object make-dist's checkpoints "
                              f"never hold (posix.system): refused"), message
    assert "\n" not in message and not marker.exists()


def test_shards_that_make_no_batch_stop_the_run_naming_them(tmp_path, shards, repo_root, ray_local):
    """Every shard corrupt: the run used to skip samples for ever (millions of
    warnings, no step). It stops within seconds, in one line naming shards."""
    from make_dist.errors import UserError
    from make_dist.train.launch import fit

    for i in range(3):
        (tmp_path / f"shard-{i}.tar").write_bytes(os.urandom(3000))
    start = time.time()
    with pytest.raises(UserError, match=r"data.train_shards: no batch can be made: every one of its 3 shards is "
                                        r"unreadable, and no sample was read \(.*shard-\d\.tar: "):
        fit(tiny(tmp_path, shards, repo_root, **{"data.train_shards": f"{tmp_path}/shard-{{0..2}}.tar",
                                                 "train.workers": 1, "data.num_workers": 1}))
    assert time.time() - start < 120
    _, run, _ = run_history(tmp_path)
    assert run.info.status == "FAILED"


def test_every_listed_shard_must_exist_before_ray_starts(tmp_path, shards, repo_root):
    """A shard missing after the first was found only while streaming (or, drawn at random, never)."""
    from make_dist.errors import UserError
    from make_dist.train.launch import check

    listed = shards.replace("manifest.json", "shard-0000{00..11}.tar")
    check(tiny(tmp_path, shards, repo_root, **{"data.train_shards": listed}))  # all there
    gone = shards.replace("manifest.json", "shard-0000{00..13}.tar")
    with pytest.raises(UserError, match=r"data.train_shards: 2 of its 14 shards do not exist: .*shard-000012\.tar, "
                                        r".*shard-000013\.tar$"):
        check(tiny(tmp_path, shards, repo_root, **{"data.train_shards": gone}))


def test_the_driver_and_a_sweeps_trials_leave_the_models_libraries_to_the_workers():
    """Every run's driver and every trial imports the launcher and the sweep;
    open_clip, torchvision and DeepSpeed load on the workers only (seconds of
    every start)."""
    heavy = ("open_clip", "torchvision", "deepspeed", "make_dist.model", "make_dist.train.trainer")
    out = subprocess.run([sys.executable, "-c", "import sys, make_dist.sweep, make_dist.train.launch; "
                          f"print([m for m in {heavy!r} if m in sys.modules])"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


def test_a_relative_store_path_means_the_drivers_folder(tmp_path, monkeypatch):
    """Ray's workers run in folders of their own: `sqlite:///m.db` given to the
    driver must name the driver's file there too (it once opened a second, empty store)."""
    from make_dist.tracking import tracking_uri

    monkeypatch.chdir(tmp_path)
    assert tracking_uri("sqlite:///m.db") == f"sqlite:///{tmp_path}/m.db"
    assert tracking_uri("mlruns") == str(tmp_path / "mlruns")
    for kept in ("sqlite:////srv/m.db", "http://127.0.0.1:5000", "databricks", "sqlite:///:memory:"):
        assert tracking_uri(kept) == kept
    assert tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"


def test_bad_config_fails_before_ray_starts(tmp_path):
    start = time.time()
    out = subprocess.run([str(EXE), "train", "--set", f"data.train_shards={tmp_path}/none/manifest.json",
                          "--set", f"train.storage={tmp_path}/runs"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "manifest.json" in out.stderr and "Traceback" not in out.stderr
    assert "Ray" not in out.stdout + out.stderr and time.time() - start < 60


def test_a_down_tracking_server_or_unwritable_storage_fails_before_ray_starts(tmp_path, shards):
    """Checked by the driver before any worker starts, each in one line naming what is wrong."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "a-file").write_text("")
    for key, value, message in (("tracking.uri", f"http://127.0.0.1:{port}", "no MLflow server answers"),
                                ("tracking.uri", f"sqlite:///{tmp_path}/a-file/mlflow.db", "cannot write in"),
                                ("train.storage", f"{tmp_path}/a-file/runs", "cannot write there")):
        start = time.time()
        out = subprocess.run([str(EXE), "train", "--set", f"data.train_shards={shards}",
                              "--set", f"train.storage={tmp_path}/runs", "--set", f"{key}={value}"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and f"{key} = {value}: {message}" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and "Ray" not in out.stdout + out.stderr and time.time() - start < 30


def read_only(path: Path):
    """Make a file truly read-only, also for root (who writes through a file's
    mode): the immutable flag. Undone by the caller (`chattr -i`)."""
    path.chmod(0o444)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    with pytest.raises(PermissionError):
        open(path, "r+b")


def test_a_tracking_store_that_cannot_take_the_run_fails_before_ray_starts(tmp_path, shards):
    """A server that answers its health check but 503 on its API (its store
    down) left the driver silent for minutes; a read-only SQLite file and a
    `file:` store (which MLflow 3 refuses) failed with tracebacks after Ray
    started. Each is refused in one line naming tracking.uri, within seconds."""
    import http.server
    import threading

    class HealthyButBroken(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()
            self.wfile.write(b"OK" if self.path == "/health" else b"store unavailable")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HealthyButBroken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    db = tmp_path / "ro/mlflow.db"
    tracking_db(db)
    read_only(db)
    stub = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for value, message in ((stub, "the MLflow server answers /api/2.0/mlflow/experiments/search?max_results=1 "
                                      "with HTTP 503"),
                               (f"sqlite:///{db}", "MLflow cannot write this store (attempt to write a readonly database)"),
                               (f"file://{tmp_path}/mlruns", "MLflow cannot use this store: The filesystem tracking "
                                                             "backend (e.g., './mlruns') is in maintenance mode")):
            start = time.time()
            out = subprocess.run([str(EXE), "train", "--set", f"data.train_shards={shards}",
                                  "--set", f"train.storage={tmp_path}/runs", "--set", f"tracking.uri={value}"],
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 2 and f"tracking.uri = {value}: {message}" in out.stderr, out.stderr
            assert len(out.stderr.strip().splitlines()) == 1 and "Ray" not in out.stdout + out.stderr
            assert time.time() - start < 30
    finally:
        server.shutdown()
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(db)], check=False)


def test_an_unreachable_cluster_address_fails_within_seconds(tmp_path, shards):
    """RAY_ADDRESS naming a cluster nobody runs: one line naming the address,
    no MLflow run left behind (ray.init alone retries for minutes)."""
    from conftest import free_port

    port = free_port()  # nothing listens there
    start = time.time()
    out = subprocess.run([str(EXE), "train", "--set", f"data.train_shards={shards}", "--set",
                          f"train.storage={tmp_path}/runs", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{port}"))
    assert out.returncode == 2, out.stderr
    assert f"RAY_ADDRESS = 127.0.0.1:{port}: no Ray cluster answers there" in out.stderr
    assert "Traceback" not in out.stderr and time.time() - start < 30
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_every_node_must_import_the_workers_dependencies(ray_local):
    """One probe task pinned to each node; a module a node lacks is named
    with the node and its Python."""
    from make_dist.errors import UserError
    from make_dist.train.cluster import WORKER_MODULES, check_nodes

    check_nodes()  # this machine's node has them all
    with pytest.raises(UserError, match=r"node \S+ \(\S*python\S*\) cannot import no_such_module_of_make_dist"):
        check_nodes((*WORKER_MODULES, "no_such_module_of_make_dist"))


def test_the_embedded_rays_dashboard_and_job_api_listen_on_loopback_only(ray_local):
    """The dashboard runs whatever is submitted to it: 127.0.0.1 only, as the
    docs say (which also say that Ray's gRPC ports are not)."""
    import ray

    webui = ray._private.worker._global_node.address_info["webui_url"]
    port = int(webui.rpartition(":")[2])
    listening = {c.laddr.ip for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening == {"127.0.0.1"}, (webui, listening)


def test_quiet_ray_sends_the_raylets_messages_to_the_log(ray_local, capfd, caplog, monkeypatch):
    """Ray's driver prints the raylet's messages to stdout whatever
    log_to_driver says; quiet, they belong in the log. A real message
    published through the GCS, as the raylet publishes its own."""
    import logging

    import ray
    import ray._private.worker as ray_worker
    from ray._private.utils import publish_error_to_driver

    from make_dist.overrides import ray_raylet_messages_to_log

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored after
    ray_raylet_messages_to_log()
    caplog.set_level(logging.INFO)
    publish_error_to_driver("test", "WARNING: 8 PYTHON worker processes (a test)", ray_worker.global_worker.gcs_client)
    deadline = time.time() + 20
    while time.time() < deadline and not any("PYTHON worker processes (a test)" in r.message for r in caplog.records):
        time.sleep(0.2)
    assert [r.name for r in caplog.records if "PYTHON worker processes (a test)" in r.message] == ["raylet"]
    assert "PYTHON worker processes (a test)" not in capfd.readouterr().out
    assert ray.is_initialized()


# ---------------------------------------------------------------------------
# Real processes: stopped, and shot


def start_training(tmp_path, shards, repo_root, env=None, **extra):
    """A real `make-dist train` process on the smallest model (what is tested is the process)."""
    extra = {"model.name": "make-micro", **extra}
    args = [str(EXE), "train", "--config", str(repo_root / "configs/tiny.yaml")]
    for item in overrides(tmp_path, shards, **extra):
        args += ["--set", item]
    log = open(tmp_path / "train.log", "ab")
    env = dict(os.environ, RAY_DEDUP_LOGS="0", **(env or {}))
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env), args


def wait_for_checkpoint(run_dir: Path, proc, timeout=240) -> int:
    """The step of the first checkpoint Ray Train committed (every rank's part
    written); a checkpoint folder alone may still be half uploaded."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except (OSError, ValueError, KeyError):
            latest = None
        if latest:
            return latest["metrics"]["step"]
        time.sleep(0.2)
    raise AssertionError(f"no committed checkpoint in {run_dir} (exit code {proc.poll()})")


def test_stopped_run_resumes_when_restarted(tmp_path, shards, repo_root):
    """SIGTERM to the driver alone (as `kill` sends it) stops the run within
    seconds: its Ray instance and every process it spawned end, the MLflow run
    is marked KILLED, the message says where the checkpoints are; the same
    command resumes from the last one."""
    steps = {"train.steps": 40, "train.checkpoint_every": 2, "train.name": "resumable"}
    proc, args = start_training(tmp_path, shards, repo_root, **steps)
    wait_for_checkpoint(tmp_path / "runs/resumable", proc)
    spawned = psutil.Process(proc.pid).children(recursive=True)
    stopped_at = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("SIGTERM did not stop make-dist train within 60 s") from None
    assert proc.returncode == 130 and time.time() - stopped_at < 30
    log = (tmp_path / "train.log").read_text()
    assert f"stopped: the checkpoints written so far are in {tmp_path}/runs/resumable" in log, log[-3000:]
    _, alive = psutil.wait_procs(spawned, timeout=30)
    assert not alive, [p.cmdline() for p in alive]  # Ray's processes went with it
    _, first_run, before = run_history(tmp_path)
    assert 2 <= before[-1].step < 40, "the stop should land mid-run"
    assert first_run.info.status == "KILLED"

    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from the checkpoint of step" in again.stdout + again.stderr
    client, run, history = run_history(tmp_path)
    assert run.info.run_id == first_run.info.run_id  # the same MLflow run continues
    assert history[-1].step == 40 and run.info.status == "FINISHED"


def test_two_runs_of_one_name_started_together_one_is_refused(tmp_path, shards, repo_root):
    """Both used to report success, their checkpoints mixed in one folder and
    one's model overwriting the other's. The run folder's lease lets one in;
    the other stops before Ray starts, naming the holder."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    racing = {"train.steps": 2, "train.name": "contested", "train.storage": str(tmp_path / "runs"),
              "train.workers": 1}
    first, _ = start_training(tmp_path / "a", shards, repo_root, **racing)
    second, _ = start_training(tmp_path / "b", shards, repo_root, **racing)
    codes = sorted((first.wait(timeout=400), second.wait(timeout=400)))
    logs = [(tmp_path / folder / "train.log").read_text() for folder in "ab"]
    assert codes == [0, 2], logs
    refused = next(log for log in logs if "is in use by another run" in log)
    assert f"make-dist: {tmp_path}/runs/contested is in use by another run (make-dist training run on host " in refused
    assert "give this run another train.name" in refused and "Traceback" not in refused
    assert "Started a local Ray instance" not in refused  # refused before Ray started
    assert not list((tmp_path / "runs/contested").glob(".lease-*"))  # the winner gave it back


def test_a_run_whose_folder_another_run_took_over_stops(tmp_path, shards, repo_root):
    """A driver that seemed dead to a run on another machine (a lease not
    renewed for 90 s: a stalled driver) finds a newer lease generation at its
    next renewal and stops, rather than write beside the new holder."""
    steps = {"train.steps": 400, "train.checkpoint_every": 4, "train.name": "taken", "data.num_workers": 0}
    proc, _ = start_training(tmp_path, shards, repo_root, **steps)
    wait_for_checkpoint(tmp_path / "runs/taken", proc)
    (current,) = (tmp_path / "runs/taken").glob(".lease-*.json")
    other = json.loads(current.read_text())
    other.update(host="node-7", pid=1, token="another-run", renewed=time.time())
    (tmp_path / "runs/taken/.lease-000001.json").write_text(json.dumps(other))
    assert proc.wait(timeout=120) == 2
    log = (tmp_path / "train.log").read_text()
    assert f"make-dist: stopped: {tmp_path}/runs/taken was taken over by make-dist training run on host node-7" in log
    _, run, _ = run_history(tmp_path)
    assert run.info.status == "KILLED"


def test_a_killed_driver_leaves_no_ray_behind_and_its_run_resumes(tmp_path, shards, repo_root):
    """SIGKILL to the driver alone: its embedded Ray's processes (the dashboard
    and runtime-env agents lived a minute and more) end within seconds; the
    same command takes over the dead run's lease at once and resumes, each step
    in the MLflow run once (a resumed run used to log replayed steps again)."""
    steps = {"train.steps": 40, "train.checkpoint_every": 4, "train.name": "killed", "data.num_workers": 0}
    proc, args = start_training(tmp_path, shards, repo_root, env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"},
                                **steps)
    wait_for_checkpoint(tmp_path / "runs/killed", proc)
    time.sleep(2)  # past the checkpoint: steps logged that the resumed run replays
    spawned = [p for p in psutil.Process(proc.pid).children(recursive=True)]
    assert any("raylet" in " ".join(p.cmdline()) for p in spawned)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(spawned, timeout=20)
    assert not alive, [p.cmdline()[:2] for p in alive]
    _, _, before = run_history(tmp_path)
    assert 4 <= before[-1].step < 40 and list((tmp_path / "runs/killed").glob(".lease-*.json"))  # left behind

    again = subprocess.run(args, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1"))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "taking over the lease of a run that ended without giving it back" in again.stderr
    assert "resumed from the checkpoint of step" in again.stdout + again.stderr
    client, run, history = run_history(tmp_path)
    assert [m.step for m in history] == list(range(1, 41)) and run.info.status == "FINISHED"
    # the machine's use, in the UI's System metrics tab (sampled every second here, by both attempts)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")) >= 2


def test_a_rank_restoring_late_does_not_rewrite_the_checkpoint_another_rank_reads(tmp_path):
    """Resuming from object storage: every rank gets its own copy. (Ray's shared
    download folder was rewritten under a reading rank: ray-project/ray#48726.)"""
    import pyarrow.fs
    import ray.train

    from make_dist.train.ray_worker import RayCheckpoint

    def restored(checkpoint):
        return RayCheckpoint(checkpoint).restored()

    (tmp_path / "bucket/checkpoint").mkdir(parents=True)
    (tmp_path / "bucket/checkpoint/state.pt").write_bytes(b"weights" * 1000)
    remote = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())  # not local to Ray
    checkpoint = ray.train.Checkpoint("checkpoint", filesystem=remote)
    with restored(checkpoint) as first:
        before = os.stat(Path(first) / "state.pt")
        with restored(checkpoint) as second:  # a rank that starts while the first still reads
            assert second != first
            assert (Path(second) / "state.pt").read_bytes() == b"weights" * 1000
        after = os.stat(Path(first) / "state.pt")
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert (Path(first) / "state.pt").read_bytes() == b"weights" * 1000
    assert not Path(first).exists() and not Path(second).exists()
    local = ray.train.Checkpoint.from_directory(str(tmp_path / "bucket/checkpoint"))
    with restored(local) as directory:  # read in place, not copied
        assert directory == str(tmp_path / "bucket/checkpoint")
