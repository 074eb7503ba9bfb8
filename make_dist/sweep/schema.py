"""The sweep file: its typed schema, loading and the checks made before Ray starts.

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

What a space key means (`apply_value`) lives here too: loading applies every
value of the space to the base config, so a value that makes no valid config
is refused before any trial starts, and a trial's config is built the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import FOLDER_NAME_RULE, apply_override, from_dict, is_folder_name, load_config
from ..errors import ConfigError
from ..evaluate.evaluation import Evaluation
from ..evaluate.tasks import REPORTED
from ..typed import build_section, read_yaml

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform")
SCHEDULERS = ("asha", "fifo")
ASHA_KEYS = ("grace_period", "reduction_factor", "max_t", "brackets")
WHOLE = "config"  # a space key whose values set several sections at once (a row of a table)


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
            apply_value(base_cfg.to_dict(), key, value, str(path))
    return sweep, base_cfg.to_dict()


def _check_metric(sweep: SweepConfig, cfg, path: Path) -> None:
    """The metric must be one a trial reports: the loss, a held-out metric of a
    table the base config evaluates, or one of the paper suite's
    (eval/paper/<average> or eval/paper/<set>/<metric>); ASHA needs it before the last step."""
    if sweep.metric == "loss/total":
        return
    evaluation = Evaluation.from_config(cfg.evaluation)
    if not evaluation.reports(sweep.metric.removeprefix("eval/")) or not sweep.metric.startswith("eval/"):
        parts = sweep.metric.split("/")
        if parts[:2] == ["eval", "paper"] and not cfg.evaluation.suite:
            raise ConfigError(f"{path}: sweep.metric = {sweep.metric}: the base config runs no suite "
                              f"(set evaluation.suite = paper and evaluation.suite_data)")
        if parts[:2] == ["eval", "paper"]:
            averages = [f"eval/{n}" for n in evaluation.metric_names() if n.startswith("paper/")]
            raise ConfigError(f"{path}: sweep.metric = {sweep.metric}: not one of the suite's metrics "
                              f"({', '.join(averages)}, or eval/paper/<set>/<metric>)")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] in REPORTED.get(parts[1], ()):
            raise ConfigError(f"{path}: sweep.metric = {sweep.metric}: the base config evaluates no {parts[1]!r} "
                              f"table (set evaluation.{parts[1]}_table)")
        names = ", ".join(["loss/total"] + [f"eval/{name}" for name in evaluation.metric_names()])
        raise ConfigError(f"{path}: sweep.metric = {sweep.metric}: no trial reports it (reported: {names})")
    if sweep.scheduler == "asha" and not cfg.evaluation.every_steps:
        raise ConfigError(f"{path}: sweep.scheduler = asha compares trials on {sweep.metric} before their end, "
                          f"but evaluation.every_steps = 0 evaluates only after the last step: set it")


def trial_count(sweep: SweepConfig) -> int:
    """How many trials the sweep runs: every grid point (x seeds), `samples` times."""
    count = sweep.samples * sweep.seeds
    for key, spec in sweep.space.items():
        kind, values = distribution(spec, key, "<sweep>")
        if kind == "grid":
            count *= len(values)
    return count


def distribution(spec: Any, key: str, source: str) -> tuple[str, list]:
    """A space entry ({grid: [...]}, {loguniform: [low, high]}...) as its kind and values, checked."""
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
    kind, values = distribution(spec, key, str(source))
    return values


def apply_value(config: dict, key: str, value: Any, source: str) -> None:
    """Set `section.key` to value, merge a mapping into `section`, or (key
    `config`) merge several sections at once: {name: ..., loss: {...}, data: {...}}."""
    if key == WHOLE:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: space.{WHOLE}: each value is a mapping of sections, e.g. "
                              f"{{name: CLIP, loss: {{slra: false}}}}")
        for section, partial in value.items():
            if section != "name":
                apply_value(config, section, partial, source)
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
