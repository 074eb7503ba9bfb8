"""make_dist/overrides.py: for every entry, the assumption it rests on about
another library's private code, checked against the library installed. A
failure names the entry, the library, the installed and the checked version
and what changed; a version other than the one an entry was checked against
fails too (its checks passing), until the entry is re-read and its CHECKED
updated."""

import contextlib
import inspect
import json
import logging
import os
import re
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from make_dist import overrides

ROOT = Path(__file__).resolve().parents[1]


def installed(dist: str) -> str:
    return version(dist).split("+")[0]  # a local build tag (torch's +cpu) is the same release


def said(entry) -> str:
    libs = ", ".join(f"{d} {installed(d)} (checked: {v})" for d, v in entry.CHECKED.items())
    return f"overrides.{entry.__name__}, with {libs}"


@contextlib.contextmanager
def checking(entry, what: str):
    """Any failure inside, an assertion or an error, as one line naming the
    entry, the libraries' installed and checked versions and the assumption."""
    why = None
    try:
        yield
    except AssertionError as e:
        why = str(e).splitlines()[0] if str(e) else "assert"
    except Exception as e:  # an AttributeError or ImportError is as telling as a failed assert
        why = f"{type(e).__name__}: {e}"
    if why is not None:  # the line alone, no chained traceback
        raise pytest.fail.Exception(f"{said(entry)}: {what}: no longer true ({why})", pytrace=False) from None


def same_versions(entry) -> None:
    drift = [f"{d} {installed(d)} is installed, overrides.{entry.__name__} was checked against {d} {v}"
             for d, v in entry.CHECKED.items() if installed(d) != v]
    assert not drift, "; ".join(drift) + (": the checks above still pass; re-read the entry against the installed "
                                          "version and update its CHECKED")


def test_every_override_is_documented_checked_and_tested():
    names = {e.__name__ for e in overrides.ENTRIES}
    assert len(names) == len(overrides.ENTRIES)
    for entry in overrides.ENTRIES:
        assert entry.__doc__ and entry.CHECKED, entry.__name__
        assert callable(globals().get(f"test_{entry.__name__}")), f"overrides.{entry.__name__} has no test here"


def test_checked_versions_are_the_pinned_ones():
    """pyproject.toml pins what the entries were checked against: a new pin
    names the entries to re-check before anything is installed."""
    pins = dict(re.findall(r'^\s*"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                           re.MULTILINE))
    stale = [f"overrides.{e.__name__} was checked against {d} {v}, pyproject.toml pins {pins.get(d)}"
             for e in overrides.ENTRIES for d, v in e.CHECKED.items() if pins.get(d) != v]
    assert not stale, "; ".join(stale)


# ---------------------------------------------------------------------------
# open_clip


@pytest.fixture(scope="module")
def tiny():
    from make_dist.config import ModelConfig
    from make_dist.model import build_model, tokenizer

    torch.manual_seed(0)
    cfg = ModelConfig(name="make-tiny")
    model = build_model(cfg).eval()
    tokens = tokenizer(cfg)(["a red scaly plaque on the left elbow with crusts", "a dark irregular mole", ""])
    return model, tokens


def test_open_clip_text_forward(tiny):
    import open_clip

    entry = overrides.open_clip_text_forward
    model, tokens = tiny
    clip = model.clip
    with checking(entry, "open_clip's CLIP.encode_text pools with open_clip.transformer.text_global_pool"):
        assert callable(open_clip.transformer.text_global_pool)
        assert "text_global_pool" in open_clip.CLIP.encode_text.__code__.co_names
    with checking(entry, "on full-length tokens it equals open_clip's own CLIP.encode_text"), torch.no_grad():
        assert torch.allclose(entry(clip, tokens), clip.encode_text(tokens), atol=1e-6, rtol=0)
    with checking(entry, "cut to a text's real length it equals the full-length encoding (causal mask, EOT "
                         "pooling)"), torch.no_grad():
        full = clip.encode_text(tokens[:1])
        assert torch.allclose(entry(clip, tokens[:1, :16]), full, atol=1e-5, rtol=0)
    same_versions(entry)


@pytest.mark.parametrize("final_ln_after_pool", [False, True])
def test_open_clip_image_forward(final_ln_after_pool):
    from open_clip.transformer import VisionTransformer

    entry = overrides.open_clip_image_forward
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    with checking(entry, "a VisionTransformer with output_tokens returns (pooled, tokens), tokens after "
                         "ln_post (unless final_ln_after_pool) and before proj, pooled as without tokens"), \
            torch.no_grad():
        visual = VisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2.0,
                                   output_dim=16, final_ln_after_pool=final_ln_after_pool, output_tokens=True).eval()
        pooled, patches = entry(visual, images)
        want = visual.ln_post(visual.transformer(visual._embeds(images)))[:, 1:] @ visual.proj
        assert patches.shape == (2, 16, 16) and torch.allclose(patches, want, atol=1e-5, rtol=0)
        visual.output_tokens = False
        assert torch.allclose(pooled, visual(images), atol=1e-6, rtol=0)
    same_versions(entry)


def test_open_clip_image_forward_gives_the_clip_image_embedding(tiny):
    """In the model make-dist builds: the pooled output is CLIP.encode_image's."""
    model, _ = tiny
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled, _ = overrides.open_clip_image_forward(model.clip.visual, images)
        model.clip.visual.output_tokens = False
        try:
            want = model.clip.encode_image(images)
        finally:
            model.clip.visual.output_tokens = True
    assert torch.allclose(pooled, want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------
# DeepSpeed

PROBE = r"""
import json, os, sys, time
import torch
from make_dist import overrides
from make_dist.train.engine import init_distributed

start = time.time()
init_distributed(use_gpu=False)
import deepspeed
import deepspeed.comm.comm as comm
facts = {"init_s": time.time() - start,
         "patched": sys.modules["deepspeed.comm.torch"].build_shm_op is overrides._no_shm_op,
         "shm_comm_op": repr(getattr(comm.cdb, "shm_comm_op", "missing"))}
with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 1, "zero_optimization": {"stage": 3}}):
    layer = torch.nn.Linear(4, 3)
facts.update(numel=layer.weight.numel(), ds_numel=getattr(layer.weight, "ds_numel", None),
             full=overrides.deepspeed_full_numel(layer.weight))
print("FACTS " + json.dumps(facts))
"""


@pytest.fixture(scope="module")
def deepspeed_process(tmp_path_factory):
    """One process of a one-rank gloo group started as make-dist starts it,
    then a ZeRO-3 parameter: what DeepSpeed did, as JSON."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
               LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path_factory.mktemp("ds"))
    line = [x for x in out.stdout.splitlines() if x.startswith("FACTS ")]
    return json.loads(line[0][6:]) if line else {"error": (out.stdout + out.stderr)[-2000:]}


def test_deepspeed_without_shm_extension(deepspeed_process, monkeypatch):
    import deepspeed.comm.torch  # noqa: F401

    entry = overrides.deepspeed_without_shm_extension
    module = sys.modules["deepspeed.comm.torch"]
    with checking(entry, "deepspeed.comm.torch has a function build_shm_op() of no arguments"):
        assert inspect.isfunction(module.build_shm_op) and not inspect.signature(module.build_shm_op).parameters
    with checking(entry, "TorchBackend.__init__ calls build_shm_op by its module-global name (so the patch is "
                         "what runs)"):
        assert "build_shm_op" in module.TorchBackend.__init__.__code__.co_names
    with checking(entry, "`import deepspeed.comm.torch` gives a module whose build_shm_op the patch replaces"):
        monkeypatch.setattr(module, "build_shm_op", module.build_shm_op)  # restored after
        entry()
        assert module.build_shm_op is overrides._no_shm_op and module.build_shm_op() is None
    with checking(entry, "a process group started through engine.init_distributed has no shared-memory op"):
        assert "error" not in deepspeed_process, deepspeed_process.get("error")
        assert deepspeed_process["patched"] and deepspeed_process["shm_comm_op"] == "None", deepspeed_process
    same_versions(entry)


def test_deepspeed_checkpoint_types():
    entry = overrides.deepspeed_checkpoint_types
    with checking(entry, "DynamicLossScaler, LossScaler, ZeroStageEnum and fragment_address import from "
                         "deepspeed.runtime.fp16.loss_scaler, runtime.zero.config and utils.tensor_fragment"):
        types = entry()
        assert [t.__name__ for t in types] == ["DynamicLossScaler", "LossScaler", "ZeroStageEnum", "fragment_address"]
        assert all(isinstance(t, type) for t in types)
    same_versions(entry)


def test_deepspeed_checkpoint_reader():
    import deepspeed.runtime.engine
    import deepspeed.runtime.state_dict_factory
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    entry = overrides.deepspeed_checkpoint_reader
    with checking(entry, "TorchCheckpointEngine.load takes (path, map_location)"):
        assert list(inspect.signature(TorchCheckpointEngine.load).parameters) == ["self", "path", "map_location"]
    for module in (deepspeed.runtime.engine, deepspeed.runtime.state_dict_factory):
        source = inspect.getsource(module)
        with checking(entry, f"{module.__name__} reads checkpoint files only through checkpoint_engine.load"):
            assert "checkpoint_engine.load(" in source, "no checkpoint_engine.load"
            assert "torch.load(" not in source, "a direct torch.load"

    def load(path, map_location=None):
        return path

    engine = type("Engine", (), {})()
    engine.checkpoint_engine = TorchCheckpointEngine()
    entry(engine, load)
    assert engine.checkpoint_engine.load is load
    engine.checkpoint_engine = object()
    with pytest.raises(RuntimeError, match="make-dist reads checkpoints through TorchCheckpointEngine only"):
        entry(engine, load)
    same_versions(entry)


def test_deepspeed_full_numel(deepspeed_process):
    entry = overrides.deepspeed_full_numel
    assert entry(torch.zeros(3, 4)) == 12
    with checking(entry, "a parameter partitioned by deepspeed.zero.Init keeps its full size in ds_numel"):
        assert "error" not in deepspeed_process, deepspeed_process.get("error")
        assert deepspeed_process["ds_numel"] == deepspeed_process["full"] == 12, deepspeed_process
        assert deepspeed_process["numel"] == 0, deepspeed_process  # what numel() alone would count
    same_versions(entry)


# ---------------------------------------------------------------------------
# Ray


def test_ray_embedded_options():
    import ray
    import ray._private.ray_constants as ray_constants
    import ray.train.v2._internal.constants as train_constants

    entry = overrides.ray_embedded_options
    options = entry(8265, "0.25")
    with checking(entry, "ray.init reads the private option _node_ip_address"):
        assert '"_node_ip_address"' in inspect.getsource(inspect.unwrap(ray.init))
    with checking(entry, "Ray's state API reads RAY_API_SERVER_ADDRESS, Ray Train's controller "
                         "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER and RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
        assert set(options["runtime_env"]["env_vars"]) == {
            ray_constants.RAY_API_SERVER_ADDRESS_ENVIRONMENT_VARIABLE,
            train_constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR, train_constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR}
        assert overrides.RAY_TRAIN_POLL_INTERVAL == train_constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR
    assert options["_node_ip_address"] == "127.0.0.1"
    assert options["runtime_env"]["env_vars"]["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:8265"
    same_versions(entry)


def test_ray_job_submission(monkeypatch):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray.dashboard.modules.job.common import JOB_ID_METADATA_KEY
    from ray.dashboard.modules.job.job_supervisor import JobSupervisor

    entry = overrides.ray_job_submission
    with checking(entry, "Ray's job supervisor tells its entry point RAY_JOB_CONFIG_JSON_ENV_VAR, JSON with "
                         "runtime_env and metadata, the submission id under job_submission_id"):
        assert RAY_JOB_CONFIG_JSON_ENV_VAR == "RAY_JOB_CONFIG_JSON_ENV_VAR"
        assert JOB_ID_METADATA_KEY == "job_submission_id"
        source = inspect.getsource(JobSupervisor._get_driver_env_vars)
        assert "RAY_JOB_CONFIG_JSON_ENV_VAR" in source and '"runtime_env"' in source and '"metadata"' in source
        assert "JOB_ID_METADATA_KEY: job_id" in inspect.getsource(JobSupervisor.__init__)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert entry() == (None, False)
    config = {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}, "metadata": {"job_submission_id": "raysubmit_1"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(config))
    assert entry() == ("raysubmit_1", True)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}, "metadata": {}}))
    assert entry() == (None, False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{not json")
    assert entry() == (None, False)
    same_versions(entry)


def test_ray_raylet_messages_to_log(monkeypatch, caplog):
    import ray._private.worker as ray_worker

    entry = overrides.ray_raylet_messages_to_log
    with checking(entry, "ray._private.worker.print_to_stdstream(data, ignore_prefix) prints the driver's messages"):
        assert list(inspect.signature(ray_worker.print_to_stdstream).parameters) == ["data", "ignore_prefix"]
    with checking(entry, "Ray's error listener (listen_error_messages) prints the raylet's messages through "
                         "print_to_stdstream looked up by name"):
        assert "print_to_stdstream" in ray_worker.listen_error_messages.__code__.co_names
    printed = []
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data))
    entry()
    entry()  # once per process: not wrapped twice
    caplog.set_level(logging.INFO)
    ray_worker.print_to_stdstream({"pid": "raylet", "lines": ["8 PYTHON worker processes"], "is_err": False}, False)
    ray_worker.print_to_stdstream({"pid": 1234, "lines": ["a worker's line"], "is_err": False}, False)
    assert [(r.name, r.message) for r in caplog.records] == [("raylet", "8 PYTHON worker processes")]
    assert [d["pid"] for d in printed] == [1234]
    same_versions(entry)


def test_ray_logs_dir():
    import ray
    import ray._private.node
    import ray._private.worker as ray_worker

    entry = overrides.ray_logs_dir
    with checking(entry, "ray._private.worker has the module attribute _global_node (the driver's Node)"):
        assert hasattr(ray_worker, "_global_node")
    with checking(entry, "ray._private.node.Node has get_logs_dir_path()"):
        assert list(inspect.signature(ray._private.node.Node.get_logs_dir_path).parameters) == ["self"]
    if not ray.is_initialized():
        assert entry() == "/tmp/ray/session_latest/logs"
    same_versions(entry)


# ---------------------------------------------------------------------------
# Ray and MLflow

HANDLERS = r"""
import json, logging
def terminal(name):
    logger = logging.getLogger(name)
    return [type(h).__name__ for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)], logger.propagate
import mlflow, ray
before = {name: terminal(name) for name in ("ray", "mlflow")}
from make_dist import overrides
overrides.library_terminal_handlers_off()
left = {name: terminal(name) for name in logging.root.manager.loggerDict
        if isinstance(logging.root.manager.loggerDict[name], logging.Logger)}
print("FACTS " + json.dumps({"before": before, "left": {k: v for k, v in left.items() if v[0] or not v[1]}}))
"""


def test_library_terminal_handlers_off(tmp_path):
    entry = overrides.library_terminal_handlers_off
    out = subprocess.run([sys.executable, "-c", HANDLERS], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    line = [x for x in out.stdout.splitlines() if x.startswith("FACTS ")]
    assert line, out.stdout[-2000:] + out.stderr[-2000:]
    facts = json.loads(line[0][6:])
    for name, lib in (("ray", "Ray"), ("mlflow", "MLflow")):
        with checking(entry, f"imported, {lib} puts a terminal handler on the logger {name!r}, propagate off"):
            handlers, propagate = facts["before"][name]
            assert handlers and not propagate, facts["before"][name]
    assert facts["left"] == {}, facts["left"]  # every terminal handler gone, every logger propagating
    same_versions(entry)


# ---------------------------------------------------------------------------
# MLflow


@pytest.mark.filterwarnings("ignore:The specified dataset source can be interpreted in multiple")
def test_mlflow_dataset_entity(tmp_path):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset

    entry = overrides.mlflow_dataset_entity
    (tmp_path / "manifest.json").write_text("{}")
    with checking(entry, "an mlflow.data dataset's _to_mlflow_entity() gives an mlflow.entities.Dataset with its "
                         "name, digest and source"):
        dataset = MetaDataset(source=resolve_dataset_source(str(tmp_path / "manifest.json")), name="shards",
                              digest="0123456789abcdef")
        entity = entry(dataset)
        assert isinstance(entity, Dataset), type(entity)
        assert (entity.name, entity.digest) == ("shards", "0123456789abcdef")
        assert str(tmp_path / "manifest.json") in entity.source, entity.source
    same_versions(entry)


def test_mlflow_system_metrics(tmp_path, monkeypatch):
    from conftest import tracking_db
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

    from make_dist.tracking import Run

    entry = overrides.mlflow_system_metrics
    with checking(entry, "SystemMetricsMonitor(run_id, tracking_uri=, resume_logging=) with start, finish, "
                         "collect_metrics, aggregate_metrics, publish_metrics and mlflow_logger.flush"):
        parameters = inspect.signature(SystemMetricsMonitor).parameters
        assert {"run_id", "tracking_uri", "resume_logging"} <= set(parameters), list(parameters)
        for name in ("start", "finish", "collect_metrics", "aggregate_metrics", "publish_metrics"):
            assert callable(getattr(SystemMetricsMonitor, name, None)), name
    with checking(entry, "a monitor started and stopped with its closing sample logs system/* metrics to the run"):
        uri = tracking_db(tmp_path / "m.db")
        run = Run.create(uri, "overrides", "system metrics")
        overrides.mlflow_system_metrics_stop(entry(run.id, run.uri, resumed=False))
        run.finish()
        logged = MlflowClient(uri).get_run(run.id).data.metrics
        assert any(k.startswith("system/") for k in logged), sorted(logged)
    same_versions(entry)
