"""MLflow: the one place make-dist reaches it.

A `Run` is one MLflow run, by id. Training logs through one (the driver
opens it with the config and system facts; rank 0 of the workers adds the
step metrics, the evaluations and the model; the driver adds the curves and
closes it), evaluation and sweeps through theirs. Every metric carries the
time it was logged.

Default store: `mlflow.db` (sqlite) in the working directory, its artifacts
in `mlartifacts/` beside it. On a cluster, `tracking.uri` names an MLflow
server that every node can reach.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
import warnings
from collections.abc import Mapping

from . import overrides
from .config import Config, dump_config
from .files import read_bytes, write_atomic

RUN_ID_FILE = "mlflow_run_id"  # in a run's storage folder: a restarted run reopens its MLflow run
EXPERIMENT_KIND = "mlflow.experimentKind"  # the MLflow UI's experiment type tag
RAY_JOB_TAG = "ray.job_submission_id"  # the `ray job submit` job a run (or its last attempt) ran as
CURVES = ("loss/total", "loss/mkcl", "loss/i2t", "loss/t2i", "loss/slra", "lr", "logit_scale", "samples_per_s")


def tracking_uri(uri: str | None = None) -> str:
    """The store named, or the local one: mlflow.db in the working directory.
    A relative SQLite or folder path is made absolute: Ray's workers run in
    folders of their own, where it would name another store."""
    if not uri:
        return f"sqlite:///{os.path.abspath('mlflow.db')}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and not uri.endswith(":memory:"):
        return f"sqlite:///{os.path.abspath(uri[len('sqlite:///'):])}"
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return os.path.abspath(uri)
    return uri


class Run:
    """One MLflow run. Picklable (the client is made where it is used), so a
    driver can hand it to Ray workers."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.id = uri, run_id
        self._client = None

    def __getstate__(self):
        return {"uri": self.uri, "id": self.id}

    def __setstate__(self, state):
        self.__init__(state["uri"], state["id"])

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    @classmethod
    def create(cls, uri: str, experiment: str, run_name: str | None = None,
               tags: Mapping[str, str] | None = None) -> "Run":
        """A new run, with the tags MLflow's own `start_run` sets (the user,
        the command as its source, the git commit it runs from where there is
        one: the UI's "Created by", "Source" and "Git commit") and `tags`."""
        from mlflow.tracking.context.registry import resolve_tags

        run = cls(uri, "")
        info = run.client.create_run(_experiment_id(run.client, experiment), run_name=run_name,
                                     tags=resolve_tags({**_code_version(), **(tags or {})}))
        run.id = info.info.run_id
        return run

    # -- writing ----------------------------------------------------------------

    def log_params(self, params: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Metrics at a step, stamped with the time they are logged; NaN values are left out."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if float(v) == float(v)]
        if batch:
            self.client.log_batch(self.id, metrics=batch)

    def log_file(self, path: str, folder: str | None = None) -> None:
        self.client.log_artifact(self.id, path, artifact_path=folder)

    def log_folder(self, path: str, folder: str | None = None) -> None:
        self.client.log_artifacts(self.id, path, artifact_path=folder)

    def log_text(self, text: str, name: str, folder: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            with open(path, "w") as f:
                f.write(text)
            self.log_file(path, folder)

    def reopen(self) -> None:
        self.client.update_run(self.id, status="RUNNING")

    def finish(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED or KILLED (stopped before its end)."""
        self.client.set_terminated(self.id, status=status)

    # -- reading ----------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """The latest value of every metric."""
        return dict(self.client.get_run(self.id).data.metrics)

    def tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.id).data.tags)

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of one metric, by step."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.id, key))

    def last_step(self, prefix: str) -> int:
        """The last step any metric whose name starts with `prefix` was logged at (0: none)."""
        keys = [k for k in self.client.get_run(self.id).data.metrics if k.startswith(prefix)]
        return max((step for k in keys for step, _ in self.history(k)), default=0)

    def read_text(self, path: str) -> str:
        """An artifact of the run ("eval/results.json"), as text."""
        import mlflow.artifacts

        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=self.id, artifact_path=path, dst_path=tmp,
                                                        tracking_uri=self.uri)
            with open(local) as f:
                return f.read()

    def exists(self) -> bool:
        try:
            self.client.get_run(self.id)
        except Exception:  # a run id from another tracking store
            return False
        return True


# ---------------------------------------------------------------------------
# A training run (and a sweep's parent run): opened or reopened by its folder


def open_run(cfg: Config, run_dir: str, *, run_name: str | None = None, parent: Run | None = None,
             params: Mapping[str, object] | None = None, tags: Mapping[str, str] | None = None) -> Run:
    """The MLflow run of a run folder: the one recorded there (a restarted
    run continues it), or a new one with the config, its parameters (or
    `params`, a sweep's own) and the driver's system facts. `parent` nests it
    (a sweep's trial); `tags` are set either way (the Ray job of this attempt)."""
    uri = tracking_uri(cfg.tracking.uri)
    recorded = recorded_run(uri, run_dir)
    if recorded is not None:
        recorded.reopen()
        if tags:
            recorded.set_tags(tags)
        return recorded
    tags = {"make_dist.run_dir": run_dir, "make_dist.objective": cfg.objective(), **(tags or {})}
    if parent is not None:
        tags["mlflow.parentRunId"] = parent.id
    run = Run.create(uri, cfg.tracking.experiment, run_name or cfg.tracking.run_name or cfg.train.name, tags)
    run.log_params(params if params is not None else cfg.flat())
    run.set_tags({f"system.{k}": v for k, v in _driver_facts(cfg).items()})
    run.log_text(dump_config(cfg), "config.yaml")
    if isinstance(cfg.data.train_shards, str) and cfg.data.train_shards.endswith("manifest.json"):
        log_dataset_input(run, cfg.data.train_shards, "shards", "training")
    for task, table in cfg.evaluation.tables().items():  # the UI's "Datasets used", beside the shards
        log_dataset_input(run, table, f"{task} table", "evaluation")
    write_atomic(f"{run_dir}/{RUN_ID_FILE}", run.id)
    return run


def log_curves(run: Run, title: str) -> None:
    """The training curves of a run as one figure (plots/training_curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {k: run.history(k) for k in CURVES}
    histories = {k: h for k, h in histories.items() if h}
    if not histories:
        return
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, key in zip(axes.flat, CURVES):
        points = histories.get(key, [])
        ax.plot([step for step, _ in points], [value for _, value in points])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(f"{title}: training curves")
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "training_curves.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        run.log_file(path, "plots")


def recorded_run(uri: str, run_dir: str) -> Run | None:
    """The MLflow run recorded in a run folder, if there is one in this store."""
    try:
        run_id = read_bytes(f"{run_dir}/{RUN_ID_FILE}").decode().strip()
    except FileNotFoundError:
        return None
    run = Run(uri, run_id)
    return run if run.exists() else None


def _experiment_id(client, name: str) -> str:
    """The experiment's id, created if new (by the driver: a worker cannot
    create one). With a sqlite store, artifacts go to mlartifacts/ beside it."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND not in found.tags:  # made by an older make-dist or by hand
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, "custom_model_development")
        return found.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:///"):
        location = f"file://{os.path.dirname(client.tracking_uri[len('sqlite:///'):])}/mlartifacts"
    # the UI shows it as model training (runs, metrics, models), not as a GenAI experiment (traces)
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: "custom_model_development"})


def log_dataset_input(run: Run, url: str, name: str, context: str) -> None:
    """A file (the shards' manifest, a held-out table) as one of the run's
    dataset inputs, `context` training or evaluation (the UI's "Datasets used")."""
    import hashlib

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    digest = hashlib.sha256(read_bytes(url)).hexdigest()[:16]
    with warnings.catch_warnings():  # MLflow registers its local source twice and warns that it is ambiguous
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
        source = resolve_dataset_source(url)
    dataset = MetaDataset(source=source, name=name, digest=digest)
    run.client.log_inputs(run.id, [DatasetInput(overrides.mlflow_dataset_entity(dataset),
                                                tags=[InputTag("mlflow.data.context", context)])])


def _code_version() -> dict[str, str]:
    """The git commit (branch, remote) of make-dist's own code, when it runs
    from a checkout. MLflow looks for one beside the command it was started
    by, which for `make-dist` is the environment's script: never in git."""
    from mlflow.utils import git_utils
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL

    here = os.path.dirname(os.path.abspath(__file__))
    found = {MLFLOW_GIT_COMMIT: git_utils.get_git_commit(here), MLFLOW_GIT_BRANCH: git_utils.get_git_branch(here),
             MLFLOW_GIT_REPO_URL: git_utils.get_git_repo_url(here)}
    return {k: v for k, v in found.items() if v} if found[MLFLOW_GIT_COMMIT] else {}


def _driver_facts(cfg: Config) -> dict[str, str]:
    import ray
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "host": platform.node(), "world_size": str(cfg.train.workers),
            "devices": f"{cfg.train.workers} x {'GPU' if cfg.train.use_gpu else 'CPU'}"}
