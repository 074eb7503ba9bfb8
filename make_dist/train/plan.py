"""What the driver hands every worker, and what a worker reports.

The driver (`make-dist train`, a sweep's trial) imports this module, not the
trainer: the trainer's imports (the model's open_clip and torchvision,
DeepSpeed) load in the workers only, a couple of seconds less to start every
run and every trial.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..tracking import Run

# On every report but the last: a sweep's scheduler (ASHA) counts time in it,
# so it can stop a trial mid-run but never at its last report, while the
# trial exports its model.
MIDRUN_STEP = "midrun_step"


@dataclass
class WorkerPlan:
    """What the driver hands every worker."""

    config: Config  # checked, paths absolute, steps resolved
    run_dir: str  # train.storage/train.name: checkpoints and the exported model
    run: Run | None  # the MLflow run rank 0 logs into
    # The export also among the run's artifacts (model/): not when the driver logs it as a Logged Model,
    # which holds the weights itself (two full copies otherwise)
    log_export: bool = True
