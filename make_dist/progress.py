"""Progress for a person watching a run: lines, a step bar, and a terminal
kept free of the libraries' own logs."""

from __future__ import annotations

import logging
import os
import sys
import threading

from . import overrides


def say(message: str) -> None:
    """One line on stdout, flushed. Written directly: inside a Ray Train
    worker `print` is patched and would log each line twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def logs_to_file(path: str) -> str:
    """Send this process's Python logging and warnings (Ray's, MLflow's,
    torch's, DeepSpeed's) to `path` instead of the terminal; returns the path."""
    overrides.library_terminal_handlers_off()  # Ray's, MLflow's, ...: their records come to the root's handler
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.captureWarnings(True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per artifact read
    return path


class StepBar:
    """A progress bar of a training run's steps, read from its MLflow metrics
    every few seconds (the workers' own output goes to Ray's log files)."""

    def __init__(self, run, total: int, label: str, key: str = "loss/total", every: float = 3.0):
        self.run, self.total, self.label, self.key, self.every = run, total, label, key, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "StepBar":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        from tqdm import tqdm

        with tqdm(total=self.total, desc=self.label, unit="step", file=sys.stdout, dynamic_ncols=True) as bar:
            while True:
                stopping = self._stop.wait(self.every)
                try:
                    history = self.run.history(self.key)
                except Exception:  # the store is busy or the run not yet written: try again
                    history = []
                if history:
                    step, value = history[-1]
                    bar.update(max(0, step - bar.n))
                    bar.set_postfix_str(f"{self.key} {value:.3f}")
                if stopping:
                    return
