"""What a sweep tells a person and MLflow.

While it runs: a line per trial event on the terminal (`TrialLines`, a Tune
callback). After it: the trials' records grouped into rows (trials alike but
for the seed: the mean and spread of the metric), the best finished trial
(`summarize`), and on the sweep's parent MLflow run the tables, a bar chart
and the best trial's links (`log_summary`).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from ray.tune import Callback

from ..progress import say
from ..tracking import Run
from .schema import WHOLE, SweepConfig


class TrialLines(Callback):
    """Tune callback: a line per trial event, numbered i of n, for a person."""

    def __init__(self, metric: str, total: int):
        self.metric, self.total = metric, total
        self.number: dict[str, int] = {}

    def _name(self, trial) -> str:
        number = self.number.setdefault(trial.trial_id, len(self.number) + 1)
        return f"trial {number}/{self.total}"

    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{k}={short(v)}" for k, v in trial.config.items())
        say(f"{self._name(trial)} started: {params}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.metric in result:
            say(f"{self._name(trial)} step {result.get('step')}: {self.metric} = {result[self.metric]:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        say(f"{self._name(trial)} ended")

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"{self._name(trial)} failed: its error is in {trial.path or 'the Tune folder'}")


def short(value: Any) -> Any:
    """A parameter as a person reads it (floats to 4 significant digits)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: short(v) for k, v in value.items()}
    return value


def parent_params(sweep: SweepConfig) -> dict[str, Any]:
    """The sweep's settings as its parent MLflow run's parameters."""
    return {"sweep.metric": sweep.metric, "sweep.mode": sweep.mode, "sweep.scheduler": sweep.scheduler,
            "sweep.samples": sweep.samples, "sweep.sample_seed": sweep.sample_seed, "sweep.seeds": sweep.seeds,
            **{f"sweep.space.{k}": v for k, v in sweep.space.items()}}


def summarize(trials: list[dict], sweep: SweepConfig) -> dict:
    """The trials, the rows (trials alike but for the seed) with the mean and
    spread of the metric over seeds, and the best finished trial."""
    import statistics

    groups: dict[str, list[dict]] = {}
    for t in trials:
        key = json.dumps({k: v for k, v in t["params"].items() if k != "train.seed"}, sort_keys=True)
        groups.setdefault(key, []).append(t)
    rows = []
    for key, members in groups.items():
        values = [m["value"] for m in members if m["status"] == "finished" and m["value"] is not None]
        rows.append({"params": json.loads(key), "seeds": len(values),
                     "mean": statistics.fmean(values) if values else None,
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
                     "values": values})
    finished = [t for t in trials if t["status"] == "finished" and t["value"] is not None]
    sign = 1 if sweep.mode == "max" else -1
    best = max(finished, key=lambda t: sign * t["value"]) if finished else None
    return {"metric": sweep.metric, "mode": sweep.mode, "trials": trials, "rows": rows, "best": best,
            "errors": sum(t["status"] == "failed" for t in trials),
            "stopped": sum(t["status"].startswith("stopped") for t in trials)}


def say_summary(sweep: SweepConfig, summary: dict) -> None:
    """The sweep's last terminal line: how its trials ended and the best one."""
    best = summary["best"]
    say(f"make-dist: sweep {sweep.name}: {len(summary['trials'])} trials ({summary['errors']} failed, "
        f"{summary['stopped']} stopped early); best {sweep.metric} = {best['value'] if best else None}"
        + (" with " + ", ".join(f"{k}={v}" for k, v in best["params"].items()) if best else ""))


def log_summary(parent: Run, summary: dict, sweep: SweepConfig) -> None:
    """On the parent run: the best trial's metric, parameters and links; the
    trials and rows as tables (summary.json, trials.md); a bar chart of the
    rows (mean and spread over seeds); the same table as the run's description."""
    best = summary["best"]
    if best:
        parent.log_metrics({f"best/{sweep.metric}": best["value"]})
        parent.log_params({f"best.{k}": v for k, v in best["params"].items()})
        parent.set_tags({"make_dist.best_trial_run": best["run_id"] or "", "make_dist.best_model": best["model"]})
    table = trials_markdown(summary)
    parent.log_text(json.dumps(summary, indent=1, default=str), "summary.json", "sweep")
    parent.log_text(table, "trials.md", "sweep")
    parent.set_tags({"mlflow.note.content": table})
    with tempfile.TemporaryDirectory() as tmp:
        parent.log_file(_bar_chart(summary, os.path.join(tmp, "rows.png")), "sweep")


def trials_markdown(summary: dict) -> str:
    metric = summary["metric"]
    lines = [f"| row | seeds | {metric}: mean | spread (sd) |", "|---|---|---|---|"]
    for r in summary["rows"]:
        mean = "n/a" if r["mean"] is None else f"{r['mean']:.4f}"
        std = "n/a" if r["std"] is None else f"{r['std']:.4f}"
        lines.append(f"| {_row_label(r['params'])} | {r['seeds']} | {mean} | {std} |")
    lines += ["", f"| trial | parameters | {metric} | steps | ended | MLflow run |", "|---|---|---|---|---|---|"]
    for t in summary["trials"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.4f}"
        run = f"[{t['run_id'][:8]}](#/runs/{t['run_id']})" if t["run_id"] else ""
        lines.append(f"| {t['trial']} | {_row_label(t['params'])} | {value} | {t['step']} | {t['status']} | {run} |")
    if summary["best"]:
        b = summary["best"]
        lines += ["", f"Best: trial {b['trial']} ({metric} = {b['value']:.4f}), MLflow run {b['run_id']}, "
                      f"model {b['model']}"]
    return "\n".join(lines)


def _row_label(params: dict) -> str:
    """A row's name (space.config's `name`) and its other parameters."""
    named = params.get(WHOLE, {}).get("name") if isinstance(params.get(WHOLE), dict) else None
    rest = ", ".join(f"{k}={v}" for k, v in params.items() if not (k == WHOLE and named))
    return ", ".join(x for x in (named, rest) if x)


def _bar_chart(summary: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    labels = [_row_label(r["params"])[:70] for r in rows]
    means = [r["mean"] if r["mean"] is not None else 0.0 for r in rows]
    ax.barh(labels, means, xerr=[r["std"] or 0.0 for r in rows], capsize=3)
    for i, r in enumerate(rows):  # every seed's value, over its bar
        ax.scatter(r["values"], [i] * len(r["values"]), color="black", s=10, zorder=3)
    ax.set_xlabel(f"{summary['metric']} (mean and sd over seeds; dots: each seed)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
