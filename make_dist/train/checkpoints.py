"""Where a run's checkpoints are kept, and how a trainer resumes from them.

A checkpoint is a folder of DeepSpeed files (every rank writes its part).
The trainer neither knows nor cares who stores it: it gets the checkpoints
to resume from, newest first, each a `Stored` (where it is, and a local
folder holding it), and hands the folder it wrote to its reporter. Ray Train
stores them for a Ray run (train/ray_worker.py); `RunFolder` stores them in
the run folder for a run in one plain process (`make-dist train --no-ray`),
named as Ray Train names its own, so such a run also resumes from the
checkpoints a one-worker Ray run of the same folder left.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import ContextManager, Protocol

import fsspec
import torch

from .. import distributed
from ..errors import RefusedFile, UserError
from ..progress import say
from . import engine as ds

KEEP = 2  # checkpoints kept in a run folder, as Ray Train is told (CheckpointConfig(num_to_keep=2))
PREFIX = "checkpoint_"  # and a time stamp that sorts as it was made (Ray Train's own names)
NAME = re.compile(r"checkpoint_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d{6}")
# In each checkpoint a run without Ray writes: its step. Only those are pruned by it: Ray Train's own
# (listed in its checkpoint_manager_snapshot.json) stay for the next Ray run of the folder.
WRITTEN_HERE = "written_without_ray"


class Stored(Protocol):
    """A checkpoint where it is stored."""

    location: str  # as a user names it: a path or a URL

    def restored(self) -> ContextManager[str]:
        """A local folder holding the checkpoint, private to this process."""


class Reporter(Protocol):
    """Where a trainer's reports go: the step's metrics and, on checkpoint
    steps, the folder this rank just wrote (gone once `report` returns)."""

    def report(self, metrics: dict, checkpoint: str | None) -> None: ...


RESTORED, UNREADABLE, REFUSED = 1, 0, -1  # a rank's outcome of loading a checkpoint; the run takes the lowest


def resume(engine, candidates: list[Stored], rank: int, device: torch.device) -> dict:
    """Load the newest checkpoint every rank can read: the latest kept, else
    the one before it (a damaged file, say a truncated upload, costs the
    steps between the two, not the run). Every rank reads its files first
    and the ranks agree on the outcome before any loads, so all take the same
    one. A file that holds foreign objects stops the run (RefusedFile); a
    checkpoint that reads but does not fit (another world size, another
    model) stops it with DeepSpeed's error. Returns the checkpoint's state
    (step, ...)."""
    for i, checkpoint in enumerate(candidates):
        where = checkpoint.location
        with contextlib.ExitStack() as stack:
            outcome, problem, directory = RESTORED, None, ""
            try:
                directory = stack.enter_context(checkpoint.restored())
                ds.verify_checkpoint(directory, rank)
            except RefusedFile as e:  # named by where it is stored, not by this worker's copy
                outcome, problem = REFUSED, RefusedFile(f"resuming from {where}: "
                                                        + str(e).replace(directory, where))
            except Exception as e:  # damaged or missing files, a download that failed
                outcome, problem = UNREADABLE, e
            agreed = distributed.lowest(outcome, device)
            if agreed == RESTORED:
                return ds.load_checkpoint(engine, directory)
            if agreed == REFUSED:
                raise problem if outcome == REFUSED else RuntimeError(f"another rank refused the checkpoint {where}")
            if rank == 0:
                following = (f"resuming from the one before, {candidates[i + 1].location}"
                             if i + 1 < len(candidates) else "and no older one is kept")
                shown = str(problem).replace(directory or where, where) if outcome == UNREADABLE else None
                say(f"make-dist: the checkpoint {where} could not be read on every rank "
                    f"({shown or 'on another rank'}); {following}")
    raise UserError(f"no checkpoint of this run could be read ({', '.join(c.location for c in candidates)}): "
                    f"move them away to start the run afresh, or give it another train.name")


# ---------------------------------------------------------------------------
# Checkpoints in the run folder (a run in one process, no Ray)


@dataclass(frozen=True)
class FolderCheckpoint:
    """A checkpoint folder under a run folder, on any fsspec storage."""

    location: str

    @contextlib.contextmanager
    def restored(self) -> Iterator[str]:
        fs, path = fsspec.core.url_to_fs(self.location)
        if "file" in fs.protocol:
            yield path  # read in place
            return
        with tempfile.TemporaryDirectory(prefix="make-dist-restore-") as directory:
            fs.get(path.rstrip("/") + "/", directory, recursive=True)
            yield directory


class RunFolder:
    """The checkpoints of a run folder, and the reporter that adds to them:
    each written beside under a hidden name and renamed into place on a local
    disk (a folder that is there is whole), uploaded on object storage (a
    partial upload is what `resume` falls back from); the KEEP newest kept.
    The last report's metrics are the run's result."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.run_dir)
        self.local = "file" in self.fs.protocol
        self.metrics: dict = {}

    def checkpoints(self) -> list[FolderCheckpoint]:
        """The run's checkpoint folders (its own and Ray Train's), newest first."""
        try:
            found = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        names = [f["name"].rstrip("/").rpartition("/")[2] for f in found if f.get("type") == "directory"]
        return [FolderCheckpoint(f"{self.run_dir}/{n}") for n in sorted(filter(NAME.fullmatch, names), reverse=True)]

    def report(self, metrics: dict, checkpoint: str | None) -> None:
        self.metrics = dict(metrics)
        if checkpoint is None:
            return
        with open(os.path.join(checkpoint, WRITTEN_HERE), "w") as f:
            f.write(str(int(metrics["step"])))
        name = PREFIX + datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")  # local time, as Ray Train names its own
        if self.local:
            os.makedirs(self.root, exist_ok=True)
            hidden = os.path.join(self.root, f".{name}.partial")
            shutil.copytree(checkpoint, hidden)
            os.rename(hidden, os.path.join(self.root, name))
        else:
            self.fs.put(checkpoint.rstrip("/") + "/", f"{self.root}/{name}", recursive=True)
        self._prune()

    def _prune(self) -> None:
        """The checkpoints this run wrote beyond the KEEP of the highest steps
        (by step, not by name: a clock set back must not make the newest look old)."""
        own = []
        for c in self.checkpoints():
            path = fsspec.core.url_to_fs(c.location)[1]
            try:
                own.append((int(self.fs.cat_file(f"{path}/{WRITTEN_HERE}")), path))
            except (FileNotFoundError, ValueError):
                continue  # Ray Train's, or not whole: left alone
        for _, path in sorted(own, reverse=True)[KEEP:]:
            self.fs.rm(path, recursive=True)
