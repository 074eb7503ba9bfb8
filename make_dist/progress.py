"""Progress lines for a person watching a run."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """One line on stdout, flushed. Written directly: inside a Ray Train
    worker `print` is patched and would log each line twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()
