"""Ray Train's side of a run: its worker context, checkpoints and reports
mapped onto the Trainer (train/trainer.py), which knows nothing of Ray.

Ray Train calls `run_worker` on every worker with the driver's WorkerPlan;
after a worker is lost it calls it again on a new group, and
`ray.train.get_checkpoint()` hands back the latest checkpoint every rank
finished writing.
"""

from __future__ import annotations

import contextlib
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import ray.train

from .plan import WorkerPlan


def run_worker(plan: WorkerPlan) -> None:
    """Ray Train's entry point on every worker: join the process group Ray
    Train set up, build the Trainer, fit."""
    import torch

    # here, not above: the driver imports this module, and the trainer's libraries load on the workers only
    from . import engine
    from .trainer import Trainer

    cfg = plan.config
    ctx = ray.train.get_context()
    engine.init_distributed(cfg.train.use_gpu)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.train.use_gpu else torch.device("cpu")
    latest = ray.train.get_checkpoint()
    trainer = Trainer(cfg, ctx.get_world_rank(), ctx.get_world_size(), device,
                      resume_from=[RayCheckpoint(c) for c in ([latest, *older_checkpoints(latest)] if latest else [])],
                      reporter=RayReporter(), run=plan.run if ctx.get_world_rank() == 0 else None,
                      run_dir=plan.run_dir, log_export=plan.log_export)
    trainer.fit()


class RayReporter:
    """Reports to Ray Train, a checkpoint folder as a Ray Train checkpoint."""

    def report(self, metrics: dict, checkpoint: str | None) -> None:
        if checkpoint is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint))


@dataclass(frozen=True)
class RayCheckpoint:
    """A checkpoint Ray Train keeps, as train/checkpoints.py's `Stored`."""

    checkpoint: ray.train.Checkpoint

    @property
    def location(self) -> str:
        """Where it is stored, as a user names it (s3://... or a path)."""
        import pyarrow.fs

        if isinstance(self.checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            return self.checkpoint.path
        return f"{self.checkpoint.filesystem.type_name}://{self.checkpoint.path}"

    @contextlib.contextmanager
    def restored(self) -> Iterator[str]:
        """A local folder holding the checkpoint, private to this process.

        Not `Checkpoint.as_directory()`: its download folder is shared by the
        node's workers, and a worker that starts late downloads again over
        files another is still reading (ray-project/ray#48726; seen as a
        torch.load "file read failed" when resuming from s3://). A checkpoint
        on the local file system is read in place.
        """
        import pyarrow.fs

        if isinstance(self.checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            yield self.checkpoint.path
            return
        with tempfile.TemporaryDirectory(prefix="make-dist-restore-") as directory:
            yield self.checkpoint.to_directory(directory)


def older_checkpoints(latest: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The run's other checkpoints older than `latest`, newest first (Ray
    Train names its checkpoint folders by the time they were made)."""
    import pyarrow.fs

    parent, name = posixpath.split(latest.path.rstrip("/"))
    found = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
    older = sorted((f.base_name for f in found if f.type == pyarrow.fs.FileType.Directory
                    and f.base_name.startswith("checkpoint_") and f.base_name < name), reverse=True)
    return [ray.train.Checkpoint(f"{parent}/{n}", filesystem=latest.filesystem) for n in older]
