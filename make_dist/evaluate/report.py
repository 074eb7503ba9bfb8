"""Evaluation results out: a printed table, a JSON file, MLflow metrics and plots."""

from __future__ import annotations

import json
import os
import tempfile

from .tasks import TaskResult


def table(results: dict[str, list[TaskResult]]) -> str:
    """Side by side: one column per model, one row per metric."""
    models = list(results)
    keys = []
    for task_results in results.values():
        for r in task_results:
            keys += [(r.task, k) for k in r.metrics if "/" not in k and (r.task, k) not in keys]
    width = max(12, *(len(m) for m in models))
    lines = [f"{'task':10} {'metric':14} " + " ".join(f"{m:>{width}}" for m in models)]
    for task, key in keys:
        values = []
        for m in models:
            found = [r.metrics.get(key) for r in results[m] if r.task == task]
            values.append(f"{found[0]:>{width}.4f}" if found and found[0] is not None else " " * width)
        lines.append(f"{task:10} {key:14} " + " ".join(values))
    counts = [f"{m}: " + ", ".join(f"{r.task} {r.scored}/{r.rows} images"
                                   + (f" ({len(r.skipped)} skipped)" if r.skipped else "") for r in results[m])
              for m in models]
    return "\n".join(lines + ["scored: " + "; ".join(counts)])


def write_json(path: str, results: dict[str, list[TaskResult]]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({m: [r.to_json() for r in rs] for m, rs in results.items()}, f, indent=1)
    os.replace(tmp, path)


def plots(result: TaskResult, directory: str, label: str = "") -> list[str]:
    """PNG files for one task: confusion matrix, per-concept AUROC bars or recall@K curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if result.task == "classify":
        names, confusion = result.details["classes"], result.details["confusion"]
        fig, ax = plt.subplots(figsize=(0.5 * len(names) + 3, 0.5 * len(names) + 2))
        ax.imshow(confusion, cmap="Blues")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{label} confusion matrix (top-1 {result.metrics['top1']:.3f})")
        paths.append(_save(fig, directory, "confusion_matrix.png"))
    elif result.task == "concepts":
        auroc = {k: v for k, v in result.details["auroc"].items() if v == v}
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(auroc) + 1.5))
        ax.barh(list(auroc), list(auroc.values()))
        ax.axvline(0.5, color="grey", linestyle="--")
        ax.set_xlim(0, 1)
        ax.set_xlabel("AUROC")
        ax.set_title(f"{label} concept annotation (mean {result.metrics['mean_auroc']:.3f})")
        paths.append(_save(fig, directory, "concept_auroc.png"))
    elif result.task == "retrieval":
        fig, ax = plt.subplots(figsize=(6, 4))
        for direction, curve in result.details["recall_curves"].items():
            ax.plot(range(1, len(curve) + 1), curve, label=direction)
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title(f"{label} retrieval")
        paths.append(_save(fig, directory, "recall_at_k.png"))
    plt.close("all")
    return paths


def log_mlflow(results: list[TaskResult], uri: str | None, run_id: str | None = None,
               experiment: str = "make-dist-eval", run_name: str | None = None, step: int | None = None,
               prefix: str = "eval") -> str:
    """Metrics (`eval/<task>/<metric>`) and plots on a run: the given one, or a new one."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from ..train.tracking import default_tracking_uri, experiment_id

    client = MlflowClient(uri or default_tracking_uri())
    if run_id is None:
        run_id = client.create_run(experiment_id(client, experiment), run_name=run_name).info.run_id
        new = True
    else:
        new = False
    metrics = [Metric(f"{prefix}/{r.task}/{k}", float(v), 0, step or 0)
               for r in results for k, v in r.metrics.items() if v == v]
    metrics += [Metric(f"{prefix}/{r.task}/scored", float(r.scored), 0, step or 0) for r in results]
    client.log_batch(run_id, metrics=metrics)
    with tempfile.TemporaryDirectory() as tmp:
        for r in results:
            for path in plots(r, tmp, r.task):
                client.log_artifact(run_id, path, artifact_path=f"{prefix}/{r.task}")
        path = os.path.join(tmp, "results.json")
        with open(path, "w") as f:
            json.dump([r.to_json() for r in results], f, indent=1)
        client.log_artifact(run_id, path, artifact_path=prefix)
    if new:
        client.set_terminated(run_id)
    return run_id


def _save(fig, directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path
