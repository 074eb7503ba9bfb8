"""MLflow: the driver opens (or reopens) the run and logs the config, system
facts and, at the end, the model and plots; rank 0 of the workers logs the
per-step metrics into the same run.

Default store: `mlflow.db` (sqlite) and `mlartifacts/` in the working
directory (any sqlite store keeps its artifacts in `mlartifacts/` beside it); `tracking.uri` points at a server instead (needed on a cluster,
where the workers cannot reach the driver's files).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import fsspec

from ..config import Config, dump_config

RUN_ID_FILE = "mlflow_run_id"  # in the run's storage folder: a restarted run reopens its MLflow run
PLOTTED = ("loss/total", "loss/mkcl", "loss/i2t", "loss/t2i", "loss/slra", "lr", "logit_scale", "samples_per_s")


def default_tracking_uri() -> str:
    """The local store: mlflow.db in the working directory."""
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or default_tracking_uri()


def experiment_id(client, name: str) -> str:
    """The experiment's id, created if new (here, in the driver: workers cannot,
    NOTES.md). With a sqlite store, artifacts go to mlartifacts/ beside it."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:///"):
        location = f"file://{os.path.dirname(client.tracking_uri[len('sqlite:///'):])}/mlartifacts"
    return client.create_experiment(name, artifact_location=location)


class RunTracker:
    """The driver's side of one training run."""

    def __init__(self, cfg: Config, run_dir: str, *, run_name: str | None = None,
                 parent_run_id: str | None = None, params: dict | None = None):
        """`parent_run_id` nests the run (a sweep's trial); `params` are logged
        instead of the config's (a sweep's own settings)."""
        from mlflow.tracking import MlflowClient

        self.cfg, self.run_dir = cfg, run_dir
        self.uri = tracking_uri(cfg)
        self.client = MlflowClient(self.uri)
        self.run_id = self._reopen()
        if self.run_id is None:
            tags = {"make_dist.run_dir": run_dir}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(experiment_id(self.client, cfg.tracking.experiment),
                                         run_name=run_name or cfg.tracking.run_name or cfg.train.name, tags=tags)
            self.run_id = run.info.run_id
            self._log_config(params)
            _write_text(f"{run_dir}/{RUN_ID_FILE}", self.run_id)
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def _reopen(self) -> str | None:
        fs, path = fsspec.core.url_to_fs(f"{self.run_dir}/{RUN_ID_FILE}")
        if not fs.exists(path):
            return None
        run_id = fs.cat_file(path).decode().strip()
        try:
            self.client.get_run(run_id)
        except Exception:  # a run id from another tracking store
            return None
        return run_id

    def _log_config(self, params: dict | None = None) -> None:
        import ray
        import torch
        from mlflow.entities import Param, RunTag

        params = [Param(k, str(v)[:6000]) for k, v in (params if params is not None else self.cfg.flat()).items()]
        facts = {
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "host": platform.node(), "world_size": str(self.cfg.train.workers),
            "devices": f"{self.cfg.train.workers} x {'GPU' if self.cfg.train.use_gpu else 'CPU'}",
        }
        self.client.log_batch(self.run_id, params=params, tags=[RunTag(f"system.{k}", v) for k, v in facts.items()])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "config.yaml")
            with open(path, "w") as f:
                f.write(dump_config(self.cfg))
            self.client.log_artifact(self.run_id, path)

    def log_best(self, summary: dict) -> None:
        """A sweep's best trial: its metric and parameters, on the parent run."""
        from mlflow.entities import Metric, Param

        value = summary.get("value")
        metrics = [Metric(f"best/{summary['metric']}", float(value), int(time.time() * 1000), 0)] if value is not None else []
        params = [Param(f"best.{k}", str(v)[:6000]) for k, v in summary["params"].items()]
        self.client.log_batch(self.run_id, metrics=metrics, params=params)

    def finish(self, ok: bool, artifacts: bool = True) -> None:
        """Model and plots as artifacts; the run's status."""
        if ok and artifacts:
            self._log_model()
            self._log_plots()
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")

    def _log_model(self) -> None:
        fs, root = fsspec.core.url_to_fs(f"{self.run_dir}/model")
        if not fs.exists(root):
            return
        with tempfile.TemporaryDirectory() as tmp:
            fs.get(f"{root}/", f"{tmp}/model/", recursive=True)
            self.client.log_artifacts(self.run_id, f"{tmp}/model", artifact_path="model")

    def _log_plots(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        histories = {k: self.client.get_metric_history(self.run_id, k) for k in PLOTTED}
        histories = {k: sorted(h, key=lambda m: m.step) for k, h in histories.items() if h}
        if not histories:
            return
        fig, axes = plt.subplots(2, 4, figsize=(16, 7))
        for ax, key in zip(axes.flat, PLOTTED):
            points = histories.get(key, [])
            ax.plot([m.step for m in points], [m.value for m in points])
            ax.set_title(key)
            ax.set_xlabel("step")
        fig.suptitle(f"{self.cfg.train.name}: training curves")
        fig.tight_layout()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "training_curves.png")
            fig.savefig(path, dpi=80)
            plt.close(fig)
            self.client.log_artifact(self.run_id, path, artifact_path="plots")


class StepLogger:
    """Rank 0's side: per-step metrics into the driver's run."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.run_id = run_id
        if run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(uri)

    def facts(self, facts: dict[str, str]) -> None:
        """What only a worker can see (its device, library versions), as tags."""
        if self.run_id:
            for key, value in facts.items():
                self.client.set_tag(self.run_id, f"system.{key}", value)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def _write_text(url: str, text: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(text)
