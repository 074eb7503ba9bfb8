"""Evaluation results out: a printed table, a JSON file, MLflow metrics and plots."""

from __future__ import annotations

import json
import os
import tempfile

from ..tracking import Run
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


def plots(result: TaskResult, directory: str, label: str = "") -> list[str]:
    """PNG files for one task: confusion matrix, per-concept AUROC bars or
    recall@K curves; `label` (a model, a set, a step) leads their titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if result.task == "classify":
        names, confusion = result.details["classes"], result.details["confusion"]
        side = min(0.5 * len(names), 16)  # 134 classes: a readable square, not 70 inches
        fig, ax = plt.subplots(figsize=(side + 3, side + 2))
        ax.imshow(confusion, cmap="Blues")
        if len(names) <= 40:
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(_title(label, f"confusion matrix (top-1 {result.metrics['top1']:.3f})"))
        paths.append(_save(fig, directory, "confusion_matrix.png"))
    elif result.task == "concepts":
        auroc = {k: v for k, v in result.details["auroc"].items() if v == v}
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(auroc) + 1.5))
        ax.barh(list(auroc), list(auroc.values()))
        ax.axvline(0.5, color="grey", linestyle="--")
        ax.set_xlim(0, 1)
        ax.set_xlabel("AUROC")
        ax.set_title(_title(label, f"concept annotation (mean AUROC {result.metrics['mean_auroc']:.3f})"))
        paths.append(_save(fig, directory, "concept_auroc.png"))
    elif result.task == "retrieval":
        fig, ax = plt.subplots(figsize=(6, 4))
        for direction, curve in result.details["recall_curves"].items():
            ax.plot(range(1, len(curve) + 1), curve, label=direction)
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title(_title(label, "retrieval: recall@K"))
        paths.append(_save(fig, directory, "recall_at_k.png"))
    plt.close("all")
    return paths


# What a task reports that counts rather than measures: a run's tags, not charts of one point.
COUNTS = ("chance_top1",)


def log_results(run: Run, results: list[TaskResult], step: int = 0, prefix: str = "eval") -> None:
    """Metrics (`eval/<task>/<metric>`), how many images each scored and the
    chance level (tags: counts, not curves), plots and the results as JSON, on
    a run at a step."""
    run.log_metrics({f"{prefix}/{r.task}/{k}": v for r in results for k, v in r.metrics.items() if k not in COUNTS},
                    step)
    run.set_tags({k: v for r in results for k, v in count_tags(r, f"{prefix}/{r.task}").items()})
    with tempfile.TemporaryDirectory() as tmp:
        for r in results:
            for path in plots(r, tmp, f"step {step}" if step else ""):
                run.log_file(path, f"{prefix}/{r.task}")
    run.log_text(json.dumps([r.to_json() for r in results], indent=1), "results.json", prefix)


def count_tags(result: TaskResult, prefix: str) -> dict[str, str]:
    """`<prefix>/scored`, `/rows` and the COUNTS of one result, as tags (4 significant digits)."""
    counts = {"scored": result.scored, "rows": result.rows,
              **{c: result.metrics[c] for c in COUNTS if c in result.metrics}}
    return {f"{prefix}/{k}": f"{v:.4g}" for k, v in counts.items()}


def _title(label: str, what: str) -> str:
    """A plot's title: what it shows, after whose (a model, a set, a step) when there is a label."""
    return f"{label}: {what}" if label else what


def _save(fig, directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path
