"""Running a sweep: Ray Tune over the trials (`run_sweep`).

Each trial is a whole training run (trials.py): a Tune function trainable
launches a TorchTrainer (Ray Train V2), whose rank-0 reports reach Tune
through TuneReportCallback. A report carries the held-out metrics only at the
steps that evaluated (a checkpoint's report has the loss alone), so the
scheduler compares trials on the steps where the metric exists; that it exists
at all is checked before any trial starts (schema.py). ASHA counts time in
training steps on every report but a trial's last, so it never stops one while
it exports its model. MLflow gets one parent run for the sweep (a table and
chart of the trials, the best trial linked: report.py) and a nested run per
trial; a trial the scheduler stopped is marked KILLED with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

from ..config import from_dict
from ..errors import UserError
from ..files import check_writable
from ..progress import logs_to_file, say
from ..tracking import open_run
from ..train.cluster import init_ray, ray_logs
from ..train.launch import absolute, check, outside_ray_jobs_copy
from ..train.plan import MIDRUN_STEP
from .guard import check_same_settings, hold
from .report import TrialLines, log_summary, parent_params, say_summary, summarize
from .schema import SweepConfig, distribution, trial_count
from .trials import _trial, trial_records


def search_space(sweep: SweepConfig | dict, source: str = "<sweep>") -> dict:
    """The sweep's space as Tune's: a grid or a distribution per key, and the grid over train.seed."""
    from ray import tune

    space = sweep.space if isinstance(sweep, SweepConfig) else sweep
    out = {}
    for key, spec in space.items():
        kind, values = distribution(spec, key, source)
        if kind == "grid":
            out[key] = tune.grid_search(values)
        elif kind == "choice":
            out[key] = tune.choice(values)
        elif kind == "uniform":
            out[key] = tune.uniform(*values)
        else:
            out[key] = tune.loguniform(*values)
    if isinstance(sweep, SweepConfig) and sweep.seeds > 1:
        out["train.seed"] = tune.grid_search(list(range(sweep.seeds)))
    return out


def search_algorithm(sweep: SweepConfig):
    """Tune's generator of trials: the grid, and the random keys drawn from
    `sample_seed` (the same sweep file, the same trials), `max_concurrent` at a time."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=sweep.max_concurrent, random_state=sweep.sample_seed)


def run_sweep(sweep: SweepConfig, base: dict, quiet: bool = True) -> dict:
    """Run (or resume) the sweep; returns its summary (best trial, every trial).
    quiet: one line per trial event on the terminal; Ray's and Tune's output in files.
    The sweep holds its folder's lease while it runs (a second sweep of the name is refused)."""
    sweep_dir = f"{absolute(sweep.storage)}/{sweep.name}"
    outside_ray_jobs_copy("sweep.storage", sweep.storage, sweep_dir)
    check_writable(sweep_dir, "sweep.storage")
    with hold(sweep_dir):
        return _run_sweep(sweep, base, sweep_dir, quiet)


def _run_sweep(sweep: SweepConfig, base: dict, sweep_dir: str, quiet: bool) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    base_cfg = from_dict(base, "<sweep base>")
    # The trials train under the sweep's folder, not the base's train.storage; checked before Ray starts.
    trial_train = dataclasses.replace(base_cfg.train, storage=f"{sweep_dir}/trials")
    base_cfg = check(dataclasses.replace(base_cfg, train=trial_train))
    check_same_settings(sweep, base_cfg.to_dict(), sweep_dir)
    if quiet:
        local = sweep_dir if "://" not in sweep_dir else os.path.join(tempfile.gettempdir(), f"make-dist-{sweep.name}")
        say(f"make-dist: sweep {sweep.name}: logs in {logs_to_file(f'{local}/logs/driver.log')}")
    init_ray(quiet)  # before the MLflow run: a cluster that cannot run trials leaves no run behind
    if quiet:
        say(f"make-dist: sweep {sweep.name}: Ray's and the trials' logs in {ray_logs()}")
    parent = open_run(base_cfg, sweep_dir, run_name=f"sweep {sweep.name}", params=parent_params(sweep))
    say(f"make-dist: sweep {sweep.name}: {trial_count(sweep)} trials; MLflow parent run {parent.id} at {parent.uri}")
    # A checkpoint's report has no held-out metric: expected, and the metric's
    # existence was checked in load_sweep. ASHA skips reports without it.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base_cfg.to_dict(), parent=parent),
        {"CPU": 0, "memory": 2**20})  # the trial only drives: no CPU, so its Train workers get them all
    path = f"{sweep_dir}/tune"
    progress = TrialLines(sweep.metric, trial_count(sweep))
    run_config = tune.RunConfig(name="tune", storage_path=sweep_dir, callbacks=[progress],
                                verbose=0 if quiet else 1)
    if tune.Tuner.can_restore(path):
        say(f"make-dist: sweep {sweep.name}: resuming from {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)  # its callbacks come back too
    else:
        scheduler = (ASHAScheduler(time_attr=MIDRUN_STEP, **{"max_t": base_cfg.train.steps, **sweep.asha})
                     if sweep.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep),
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.samples,
                                        scheduler=scheduler, search_alg=search_algorithm(sweep)),
            run_config=run_config,
        )
    try:
        grid = tuner.fit()
    except BaseException:
        parent.finish("FAILED")
        raise
    # An interrupted fit returns too; the state Tune saved tells what finished.
    saved = tune.Tuner.restore(path, trainable=trainable).get_results()
    if saved.num_terminated + saved.num_errors < len(saved):
        parent.finish("KILLED")
        raise UserError(f"sweep {sweep.name} was interrupted after {saved.num_terminated} of {len(saved)} "
                        f"trials; run the same command again to resume it")
    trials = trial_records(grid, sweep, base_cfg, parent.uri)
    summary = summarize(trials, sweep)
    log_summary(parent, summary, sweep)
    parent.finish("FAILED" if summary["errors"] else "FINISHED")
    say_summary(sweep, summary)
    return summary
