"""Hyperparameter sweeps: Ray Tune over training configs (`make-dist sweep`).

    schema.py   the sweep file: `SweepConfig`, `load_sweep` and its checks, what a space key means
    tune.py     `run_sweep`: the search space and generator Tune is given, the Tuner, start or resume
    guard.py    the sweep's folder holds one sweep: its lease, and the settings a rerun must match
    trials.py   one trial: its config, name and folder, its MLflow run, how it ended
    report.py   the lines per trial event, the summary (rows over seeds, the best trial), the parent run's tables

The command line calls `load_sweep` then `run_sweep`.
"""

from .guard import check_same_settings
from .report import TrialLines, summarize
from .schema import SweepConfig, load_sweep, trial_count
from .trials import trial_config, trial_records
from .tune import run_sweep, search_algorithm, search_space

# TrialLines: a sweep's saved Tune state (<sweep>/tune) pickles its callbacks; a sweep
# started before this package was split names the class make_dist.sweep.TrialLines.
__all__ = ["SweepConfig", "TrialLines", "check_same_settings", "load_sweep", "run_sweep", "search_algorithm",
           "search_space", "summarize", "trial_config", "trial_count", "trial_records"]
