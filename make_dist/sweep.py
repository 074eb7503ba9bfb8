"""Hyperparameter sweeps: Ray Tune over training configs (`make-dist sweep`).

A sweep file (configs/sweep_*.yaml):

    base: tiny.yaml                  # training config, relative to this file
    set: [data.train_shards=...]     # fixed overrides of the base
    space:                           # config keys -> a distribution
      optim.lr: {loguniform: [1.0e-4, 1.0e-3]}
      loss.lam: {grid: [0.3, 0.7]}
      loss: {grid: [{slra: false}, {slra: true}]}   # a section: each value a partial section
      config: {grid: [{name: CLIP+, loss: {slra: false}, data: {caption: knowledge}}]}  # several sections
    seeds: 1                         # each point trained with train.seed 0 .. seeds-1
    metric: eval/classify/top1       # loss/total, or a held-out metric the base config evaluates
    mode: max
    samples: 1                       # repeats of the grid (random draws for the others)
    sample_seed: 0                   # the random draws: the same seed, the same trials (null: new draws)
    scheduler: asha                  # asha (default) | fifo
    asha: {grace_period: 50, reduction_factor: 2}   # in training steps; max_t: train.steps
    max_concurrent: 1
    name: sweep                      # resumes when run again with the same name, storage and settings
    storage: runs

`--set sweep.KEY=VALUE` overrides a key of the sweep file itself (its name,
storage, scheduler, seeds...); any other `--set` overrides the base config.

Each trial is a whole training run: a Tune function trainable launches a
TorchTrainer (Ray Train V2), whose rank-0 reports reach Tune through
TuneReportCallback. A report carries the held-out metrics only at the steps
that evaluated (a checkpoint's report has the loss alone), so the scheduler
compares trials on the steps where the metric exists; that it exists at all
is checked before any trial starts. ASHA counts time in training steps on
every report but a trial's last, so it never stops one while it exports
its model. MLflow gets one parent run for the sweep
(a table and chart of the trials, the best trial linked) and a nested run
per trial; a trial the scheduler stopped is marked KILLED with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from .config import FOLDER_NAME_RULE, apply_override, from_dict, is_folder_name, load_config
from .errors import ConfigError, UserError
from .evaluate.tasks import REPORTED
from .files import check_writable, read_bytes, write_atomic
from .lease import Lease
from .progress import logs_to_file, say
from .tracking import Run, open_run, recorded_run
from .train.cluster import init_ray, ray_logs
from .train.launch import absolute, check, fit, outside_ray_jobs_copy
from .train.plan import MIDRUN_STEP
from .typed import build_section, read_yaml
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform")
SCHEDULERS = ("asha", "fifo")
ASHA_KEYS = ("grace_period", "reduction_factor", "max_t", "brackets")
WHOLE = "config"  # a space key whose values set several sections at once (a row of a table)
SETTINGS_FILE = "sweep.json"  # in the sweep's folder: what it was started with, checked on resume


@dataclass
class SweepConfig:
    base: str = "tiny.yaml"
    set: list[str] = field(default_factory=list)
    space: dict = field(default_factory=dict)
    seeds: int = 1
    metric: str = "loss/total"
    mode: str = "min"
    samples: int = 1
    sample_seed: int | None = 0
    scheduler: str = "asha"
    asha: dict = field(default_factory=lambda: {"grace_period": 1, "reduction_factor": 2})
    max_concurrent: int = 1
    name: str = "sweep"
    storage: str = "runs"


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepConfig, dict]:
    """The sweep and its base training config (as a dict, overrides applied),
    checked: a sweep whose metric can never be reported is refused here."""
    path = Path(path)
    raw = read_yaml(path, "sweep file")
    own = [o for o in overrides if o.strip().startswith("sweep.")]
    for item in own:
        apply_override({"sweep": raw}, item)  # the base config's --set parsing, on the sweep's own keys
    for key in ("space", "asha"):  # free-form mappings: checked below
        if key in raw and not isinstance(raw[key], dict):
            raise ConfigError(f"{path}: {key} must be a mapping")
    free = {k: raw.pop(k) for k in ("space", "asha") if k in raw}
    sweep = build_section(SweepConfig, raw, "sweep",
                          lambda section, key: "--set" if any(o.strip().startswith(f"sweep.{key}=") for o in own)
                          else str(path))
    for k, v in free.items():
        setattr(sweep, k, v)
    if not is_folder_name(sweep.name):
        raise ConfigError(f"{path}: sweep.name = {sweep.name!r}: {FOLDER_NAME_RULE}")
    if sweep.mode not in ("min", "max"):
        raise ConfigError(f"{path}: sweep.mode = {sweep.mode!r}: must be min or max")
    if sweep.scheduler not in SCHEDULERS:
        raise ConfigError(f"{path}: sweep.scheduler = {sweep.scheduler!r}: must be asha or fifo")
    if sweep.seeds < 1 or sweep.samples < 1:
        raise ConfigError(f"{path}: sweep.seeds and sweep.samples must be >= 1")
    unknown = sorted(set(sweep.asha) - set(ASHA_KEYS))
    if unknown:
        raise ConfigError(f"{path}: sweep.asha.{unknown[0]}: unknown (known: {', '.join(ASHA_KEYS)})")
    if not sweep.space:
        raise ConfigError(f"{path}: sweep.space is empty: name at least one config key to search")
    if sweep.seeds > 1 and "train.seed" in sweep.space:
        raise ConfigError(f"{path}: sweep.seeds and space.train.seed both set the seed: keep one")
    base = (path.parent / sweep.base) if not Path(sweep.base).is_absolute() else Path(sweep.base)
    base_cfg = load_config(base, [*sweep.set, *[o for o in overrides if o not in own]])
    _check_metric(sweep, base_cfg, path)
    for key, spec in sweep.space.items():  # every sampled value must make a valid config
        for value in _examples(spec, key, path):
            _apply(base_cfg.to_dict(), key, value, str(path))
    return sweep, base_cfg.to_dict()


def _check_metric(sweep: SweepConfig, cfg, path: Path) -> None:
    """The metric must be one a trial reports: the loss, a held-out metric of a
    table the base config evaluates, or one of the paper suite's
    (eval/paper/<average> or eval/paper/<set>/<metric>); ASHA needs it before the last step."""
    if sweep.metric == "loss/total":
        return
    parts = sweep.metric.split("/")
    if parts[:2] == ["eval", "paper"]:
        if not cfg.evaluation.suite:
            raise ConfigError(f"{path}: sweep.metric = {sweep.metric}: the base config runs no suite "
                              f"(set evaluation.suite = paper and evaluation.suite_data)")
    else:
        names = ", ".join(["loss/total"] + [f"eval/{t}/{m}" for t in cfg.evaluation.tables() for m in REPORTED[t]])
        if len(parts) != 3 or parts[0] != "eval" or parts[1] not in REPORTED or parts[2] not in REPORTED[parts[1]]:
            raise ConfigError(f"{path}: sweep.metric = {sweep.metric}: no trial reports it (reported: {names})")
        if parts[1] not in cfg.evaluation.tables():
            raise ConfigError(f"{path}: sweep.metric = {sweep.metric}: the base config evaluates no {parts[1]!r} "
                              f"table (set evaluation.{parts[1]}_table)")
    if sweep.scheduler == "asha" and not cfg.evaluation.every_steps:
        raise ConfigError(f"{path}: sweep.scheduler = asha compares trials on {sweep.metric} before their end, "
                          f"but evaluation.every_steps = 0 evaluates only after the last step: set it")


def search_space(sweep: SweepConfig | dict, source: str = "<sweep>") -> dict:
    from ray import tune

    space = sweep.space if isinstance(sweep, SweepConfig) else sweep
    out = {}
    for key, spec in space.items():
        kind, values = _spec(spec, key, source)
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


def trial_count(sweep: SweepConfig) -> int:
    """How many trials the sweep runs: every grid point (x seeds), `samples` times."""
    count = sweep.samples * sweep.seeds
    for key, spec in sweep.space.items():
        kind, values = _spec(spec, key, "<sweep>")
        if kind == "grid":
            count *= len(values)
    return count


def trial_config(base: dict, params: dict, source: str = "<trial>"):
    """The training Config of one trial: the base with the sampled values applied."""
    config = {section: dict(values) for section, values in base.items()}
    for key, value in params.items():
        _apply(config, key, value, source)
    return from_dict(config, source)


def run_sweep(sweep: SweepConfig, base: dict, quiet: bool = True) -> dict:
    """Run (or resume) the sweep; returns its summary (best trial, every trial).
    quiet: one line per trial event on the terminal; Ray's and Tune's output in files.
    The sweep holds its folder's lease while it runs (a second sweep of the name is refused)."""
    sweep_dir = f"{absolute(sweep.storage)}/{sweep.name}"
    outside_ray_jobs_copy("sweep.storage", sweep.storage, sweep_dir)
    check_writable(sweep_dir, "sweep.storage")
    with Lease(sweep_dir, "make-dist sweep", rename="give this sweep another name (--set sweep.name=NEW)"):
        return _run_sweep(sweep, base, sweep_dir, quiet)


def _run_sweep(sweep: SweepConfig, base: dict, sweep_dir: str, quiet: bool) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    base_cfg = from_dict(base, "<sweep base>")
    # The trials train under the sweep's folder, not the base's train.storage; checked before Ray starts.
    trial_train = dataclasses.replace(base_cfg.train, storage=f"{sweep_dir}/trials")
    base_cfg = check(dataclasses.replace(base_cfg, train=trial_train))
    _check_same_settings(sweep, base_cfg.to_dict(), sweep_dir)
    if quiet:
        local = sweep_dir if "://" not in sweep_dir else os.path.join(tempfile.gettempdir(), f"make-dist-{sweep.name}")
        say(f"make-dist: sweep {sweep.name}: logs in {logs_to_file(f'{local}/logs/driver.log')}")
    init_ray(quiet)  # before the MLflow run: a cluster that cannot run trials leaves no run behind
    if quiet:
        say(f"make-dist: sweep {sweep.name}: Ray's and the trials' logs in {ray_logs()}")
    parent = open_run(base_cfg, sweep_dir, run_name=f"sweep {sweep.name}", params=_sweep_params(sweep))
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
    trials = _trial_rows(grid, sweep, base_cfg, parent.uri)
    summary = summarize(trials, sweep)
    log_summary(parent, summary, sweep)
    parent.finish("FAILED" if summary["errors"] else "FINISHED")
    best = summary["best"]
    say(f"make-dist: sweep {sweep.name}: {len(trials)} trials ({summary['errors']} failed, "
        f"{summary['stopped']} stopped early); best {sweep.metric} = {best['value'] if best else None}"
        + (" with " + ", ".join(f"{k}={v}" for k, v in best["params"].items()) if best else ""))
    return summary


class TrialLines(Callback):
    """Tune callback: a line per trial event, numbered i of n, for a person."""

    def __init__(self, metric: str, total: int):
        self.metric, self.total = metric, total
        self.number: dict[str, int] = {}

    def _name(self, trial) -> str:
        number = self.number.setdefault(trial.trial_id, len(self.number) + 1)
        return f"trial {number}/{self.total}"

    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
        say(f"{self._name(trial)} started: {params}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.metric in result:
            say(f"{self._name(trial)} step {result.get('step')}: {self.metric} = {result[self.metric]:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        say(f"{self._name(trial)} ended")

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"{self._name(trial)} failed: its error is in {trial.path or 'the Tune folder'}")


def _trial(params: dict, base: dict, parent: Run) -> None:
    """One trial: a whole training run, named after the trial (in the base's
    train.storage, the sweep's trials/ folder), nested in MLflow."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, params, f"<trial {trial_id}>")
    cfg.train.name = f"trial-{trial_id}"
    fit(cfg, parent=parent, callbacks=[TuneReportCallback()], params=params)


# ---------------------------------------------------------------------------
# Resuming: only the same sweep


def _check_same_settings(sweep: SweepConfig, base: dict, sweep_dir: str) -> None:
    """A sweep folder resumes only the sweep it was started with: other
    settings would mix experiments (a trial trained under two configs)."""
    settings = {"sweep": dataclasses.asdict(sweep), "base": base}
    settings["sweep"].pop("set")  # folded into base
    path = f"{sweep_dir}/{SETTINGS_FILE}"
    try:
        recorded = json.loads(read_bytes(path))
    except FileNotFoundError:
        write_atomic(path, json.dumps(settings, indent=1, default=str))
        return
    now = json.loads(json.dumps(settings, default=str))
    differ = [k for k in sorted(set(_flat(recorded)) | set(_flat(now))) if _flat(recorded).get(k) != _flat(now).get(k)]
    if differ:
        shown = "; ".join(f"{k}: {_flat(recorded).get(k)!r} then, {_flat(now).get(k)!r} now" for k in differ[:5])
        raise UserError(f"sweep {sweep.name}: {sweep_dir} holds a sweep started with other settings ({shown}"
                        f"{' ...' if len(differ) > 5 else ''}). Resuming would mix the two: start this one "
                        f"under another name (--set sweep.name=NEW) or remove {sweep_dir}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "space":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
    return out


# ---------------------------------------------------------------------------
# The outcome: every trial, the rows over seeds, the best, in MLflow


def _trial_rows(grid, sweep: SweepConfig, base_cfg, uri: str) -> list[dict]:
    """One record per trial: parameters, final metric, steps reached, how it
    ended, marked on its MLflow run here (FAILED, or KILLED with the reason
    when the scheduler stopped it): only the sweep tells the two apart, since a
    stopped trial's training ends in an error too, at times after this runs."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        run_dir = f"{base_cfg.train.storage}/trial-{trial_id}"  # as _trial names it
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
        rows.append({"trial": trial_id, "params": {k: _short(v) for k, v in (result.config or {}).items()},
                     "value": metrics.get(sweep.metric), "step": step, "status": status,
                     "run_id": run.id if run else None,
                     "model": f"{run_dir}/model" if status == "finished" else None})
    return rows


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


def _sweep_params(sweep: SweepConfig) -> dict[str, Any]:
    return {"sweep.metric": sweep.metric, "sweep.mode": sweep.mode, "sweep.scheduler": sweep.scheduler,
            "sweep.samples": sweep.samples, "sweep.sample_seed": sweep.sample_seed, "sweep.seeds": sweep.seeds,
            **{f"sweep.space.{k}": v for k, v in sweep.space.items()}}


def _short(value: Any) -> Any:
    """A parameter as a person reads it (floats to 4 significant digits)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    return value


def _spec(spec: Any, key: str, source: str) -> tuple[str, list]:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{source}: space.{key}: expected one of {', '.join(DISTRIBUTIONS)}, "
                          f"e.g. {{grid: [0.3, 0.7]}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{source}: space.{key}.{kind}: expected a non-empty list")
    if kind in ("uniform", "loguniform"):
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: space.{key}.{kind}: expected [low, high] numbers") from None
        if len(values) != 2 or values[0] >= values[1] or (kind == "loguniform" and values[0] <= 0):
            raise ConfigError(f"{source}: space.{key}.{kind}: expected [low, high] with 0 < low < high"
                              if kind == "loguniform" else f"{source}: space.{key}.{kind}: expected [low, high]")
    return kind, values


def _examples(spec, key: str, source: Path) -> list:
    kind, values = _spec(spec, key, str(source))
    return values


def _apply(config: dict, key: str, value: Any, source: str) -> None:
    """Set `section.key` to value, merge a mapping into `section`, or (key
    `config`) merge several sections at once: {name: ..., loss: {...}, data: {...}}."""
    if key == WHOLE:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: space.{WHOLE}: each value is a mapping of sections, e.g. "
                              f"{{name: CLIP, loss: {{slra: false}}}}")
        for section, partial in value.items():
            if section != "name":
                _apply(config, section, partial, source)
        return
    section, _, name = key.partition(".")
    if section not in config:
        raise ConfigError(f"{source}: space.{key}: unknown section {section!r}")
    if name:
        config[section][name] = value
    elif isinstance(value, dict):
        config[section].update(value)
    else:
        raise ConfigError(f"{source}: space.{key}: a section takes mappings, e.g. {{grid: [{{slra: false}}]}}")
    try:
        from_dict(config, source)
    except ConfigError as e:
        raise ConfigError(f"space.{key} = {value!r}: {e}") from None
