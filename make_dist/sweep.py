"""Hyperparameter sweeps: Ray Tune over training configs (`make-dist sweep`).

A sweep file (configs/sweep_*.yaml):

    base: tiny.yaml                  # training config, relative to this file
    set: [data.train_shards=...]     # fixed overrides of the base
    space:                           # config keys -> a distribution
      optim.lr: {loguniform: [1.0e-4, 1.0e-3]}
      loss.lam: {grid: [0.3, 0.7]}
      loss: {grid: [{slra: false}, {slra: true}]}   # a section: each value a partial section
    metric: eval/classify/top1       # reported during training (evaluation hook) or loss
    mode: max
    samples: 1                       # repeats of the grid (random draws for the others)
    scheduler: asha                  # asha (default) | fifo
    asha: {grace_period: 1, reduction_factor: 2}
    max_concurrent: 1
    name: sweep                      # resumes when run again with the same name and storage
    storage: runs

Each trial is a whole training run: a Tune function trainable launches a
TorchTrainer (Ray Train V2), whose rank-0 reports reach Tune through
TuneReportCallback. MLflow gets one parent run for the sweep and a nested
run per trial; the best trial and its config land on the parent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import from_dict, load_config
from .errors import ConfigError, UserError
from .tracking import Run, open_run
from .train.launch import absolute, check, fit, init_ray
from .typed import build_section, read_yaml

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform")


@dataclass
class SweepConfig:
    base: str = "tiny.yaml"
    set: list[str] = field(default_factory=list)
    space: dict = field(default_factory=dict)
    metric: str = "loss/total"
    mode: str = "min"
    samples: int = 1
    scheduler: str = "asha"
    asha: dict = field(default_factory=lambda: {"grace_period": 1, "reduction_factor": 2})
    max_concurrent: int = 1
    name: str = "sweep"
    storage: str = "runs"


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepConfig, dict]:
    """The sweep and its base training config (as a dict, overrides applied), checked."""
    path = Path(path)
    raw = read_yaml(path, "sweep file")
    for key in ("space", "asha"):  # free-form mappings: checked below
        if key in raw and not isinstance(raw[key], dict):
            raise ConfigError(f"{path}: {key} must be a mapping")
    free = {k: raw.pop(k) for k in ("space", "asha") if k in raw}
    sweep = build_section(SweepConfig, raw, "sweep", lambda section, key: str(path))
    for k, v in free.items():
        setattr(sweep, k, v)
    if sweep.mode not in ("min", "max"):
        raise ConfigError(f"{path}: sweep.mode = {sweep.mode!r}: must be min or max")
    if sweep.scheduler not in ("asha", "fifo"):
        raise ConfigError(f"{path}: sweep.scheduler = {sweep.scheduler!r}: must be asha or fifo")
    if not sweep.space:
        raise ConfigError(f"{path}: sweep.space is empty: name at least one config key to search")
    base = (path.parent / sweep.base) if not Path(sweep.base).is_absolute() else Path(sweep.base)
    base_cfg = load_config(base, [*sweep.set, *overrides])
    task = sweep.metric.split("/")[1] if sweep.metric.startswith("eval/") else None
    if task and task not in base_cfg.evaluation.tables():
        raise ConfigError(f"{path}: sweep.metric = {sweep.metric}: the base config evaluates no {task!r} "
                          f"table (set evaluation.{task}_table)")
    for key, spec in sweep.space.items():  # every sampled value must make a valid config
        for value in _examples(spec, key, path):
            _apply(base_cfg.to_dict(), key, value, str(path))
    return sweep, base_cfg.to_dict()


def search_space(space: dict, source: str = "<sweep>") -> dict:
    from ray import tune

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
    return out


def trial_config(base: dict, params: dict, source: str = "<trial>"):
    """The training Config of one trial: the base with the sampled values applied."""
    config = {section: dict(values) for section, values in base.items()}
    for key, value in params.items():
        _apply(config, key, value, source)
    return from_dict(config, source)


def run_sweep(sweep: SweepConfig, base: dict) -> dict:
    """Run (or resume) the sweep; returns the best trial's metric and parameters."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    storage = absolute(sweep.storage)
    base_cfg = check(from_dict(base, "<sweep base>"))  # fails before Ray starts
    sweep_dir = f"{storage}/{sweep.name}"
    parent = open_run(base_cfg, sweep_dir, run_name=f"sweep {sweep.name}", params=_sweep_params(sweep))
    print(f"make-dist: sweep {sweep.name}: MLflow parent run {parent.id} at {parent.uri}")
    init_ray()
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base_cfg.to_dict(), storage=sweep_dir, parent=parent),
        {"CPU": 0, "memory": 2**20})  # the trial only drives: no CPU, so its Train workers get them all
    scheduler = (ASHAScheduler(time_attr="training_iteration", **sweep.asha) if sweep.scheduler == "asha"
                 else FIFOScheduler())
    path = f"{sweep_dir}/tune"
    if tune.Tuner.can_restore(path):
        print(f"make-dist: sweep {sweep.name}: resuming from {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep.space),
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.samples,
                                        scheduler=scheduler, max_concurrent_trials=sweep.max_concurrent),
            run_config=tune.RunConfig(name="tune", storage_path=sweep_dir),
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
    best = grid.get_best_result(metric=sweep.metric, mode=sweep.mode)
    summary = {"metric": sweep.metric, "value": best.metrics.get(sweep.metric), "params": dict(best.config),
               "trials": len(grid), "errors": len(grid.errors)}
    _log_best(parent, summary)
    parent.finish("FAILED" if grid.errors else "FINISHED")
    print(f"make-dist: sweep {sweep.name}: {len(grid)} trials ({len(grid.errors)} failed); best "
          f"{sweep.metric} = {summary['value']} with " + ", ".join(f"{k}={v}" for k, v in best.config.items()))
    return summary


def _trial(params: dict, base: dict, storage: str, parent: Run) -> None:
    """One trial: a whole training run, named after the trial, nested in MLflow."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = tune.get_context().get_trial_name()
    cfg = trial_config(base, params, f"<trial {trial}>")
    cfg.train.name, cfg.train.storage = trial, f"{storage}/trials"
    fit(cfg, parent=parent, callbacks=[TuneReportCallback()], params=params)


def _log_best(parent: Run, summary: dict) -> None:
    """The best trial's metric and parameters, on the sweep's parent run."""
    if summary.get("value") is not None:
        parent.log_metrics({f"best/{summary['metric']}": summary["value"]})
    parent.log_params({f"best.{k}": v for k, v in summary["params"].items()})


def _sweep_params(sweep: SweepConfig) -> dict[str, Any]:
    return {"sweep.metric": sweep.metric, "sweep.mode": sweep.mode, "sweep.scheduler": sweep.scheduler,
            "sweep.samples": sweep.samples, **{f"sweep.space.{k}": v for k, v in sweep.space.items()}}


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
    """Set `section.key` to value, or merge a mapping into `section`."""
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
