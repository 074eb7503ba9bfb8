"""One trial: its config, its name and folder, its MLflow run, and how it ended.

A trial is a whole training run: `_trial` (the Tune function trainable) builds
its Config from the base and the sampled values, names it after Tune's trial
id (`trial-<id>`, a folder of the sweep's `trials/`), and calls the same
`launch.fit` as `make-dist train`, nested under the sweep's parent MLflow run,
with Tune's `TuneReportCallback`. After the fit, `trial_records` turns Tune's
results into one record per trial and marks each trial's MLflow run with how
it ended: only the sweep can tell a failed trial from one its scheduler stopped.
"""

from __future__ import annotations

from pathlib import Path

from ..config import from_dict
from ..tracking import Run, recorded_run
from ..train.launch import fit
from .report import short
from .schema import SweepConfig, apply_value


def trial_config(base: dict, params: dict, source: str = "<trial>"):
    """The training Config of one trial: the base with the sampled values applied."""
    config = {section: dict(values) for section, values in base.items()}
    for key, value in params.items():
        apply_value(config, key, value, source)
    return from_dict(config, source)


def trial_name(trial_id: str) -> str:
    """A trial's train.name: its run folder under the sweep's trials/."""
    return f"trial-{trial_id}"


def _trial(params: dict, base: dict, parent: Run) -> None:
    """One trial: a whole training run, named after the trial (in the base's
    train.storage, the sweep's trials/ folder), nested in MLflow.
    (Tune records the trainable's name, `_trial`, and a resume checks it.)"""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, params, f"<trial {trial_id}>")
    cfg.train.name = trial_name(trial_id)
    fit(cfg, parent=parent, callbacks=[TuneReportCallback()], params=params)


def trial_records(grid, sweep: SweepConfig, base_cfg, uri: str) -> list[dict]:
    """One record per trial: parameters, final metric, steps reached, how it
    ended, marked on its MLflow run here (FAILED, or KILLED with the reason
    when the scheduler stopped it): only the sweep tells the two apart, since a
    stopped trial's training ends in an error too, at times after this runs."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        run_dir = f"{base_cfg.train.storage}/{trial_name(trial_id)}"
        run = recorded_run(uri, run_dir)
        step = metrics.get("step", 0)
        if result.error is not None:
            status = "failed"
            if run is not None:
                run.finish("FAILED")
        elif step < base_cfg.train.steps:
            status = f"stopped by {sweep.scheduler.upper()} at step {step}"
            if run is not None:
                run.set_tags({"make_dist.stopped": f"early: {status}, {sweep.metric} "
                                                   f"{metrics.get(sweep.metric)} below its rung's cutoff"})
                run.finish("KILLED")
        else:
            status = "finished"
        rows.append({"trial": trial_id, "params": {k: short(v) for k, v in (result.config or {}).items()},
                     "value": metrics.get(sweep.metric), "step": step, "status": status,
                     "run_id": run.id if run else None,
                     "model": f"{run_dir}/model" if status == "finished" else None})
    return rows
