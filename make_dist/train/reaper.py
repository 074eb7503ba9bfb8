"""The embedded Ray's undertaker: ends its processes when its driver dies.

A driver that exits, or is stopped by Ctrl-C or SIGTERM, shuts its embedded
Ray down itself. One killed outright (SIGKILL, the OOM killer) cannot: Ray's
core processes notice within seconds, but its dashboard agent and runtime-env
agent lived on for a minute and more (seen: 60-70 s), holding ports and
memory. So `init_ray` starts this watcher beside an embedded Ray: it records
the driver's descendants every second while the driver lives, and when the
driver is gone it stops those still running (SIGTERM, then SIGKILL after
5 s). It runs in a session of its own, so the signal that killed the driver's
process group does not take it along. Joining a cluster starts none: that
cluster's processes are not the driver's to end.

    python -m make_dist.train.reaper DRIVER_PID
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 5.0


def watch(driver_pid: int) -> None:
    """Start the watcher of this process's descendants (returns at once)."""
    subprocess.Popen([sys.executable, "-m", "make_dist.train.reaper", str(driver_pid)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def reap(driver_pid: int) -> int:
    """Wait for the driver to end, then end what it left; returns how many were stopped."""
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return 0
    seen: dict[int, float] = {}  # pid -> start time (a pid reused later names another process)
    while True:
        try:
            for child in driver.children(recursive=True):
                if child.pid != os.getpid():
                    seen.setdefault(child.pid, child.create_time())
            if driver.status() == psutil.STATUS_ZOMBIE:  # killed, not yet waited for by its parent
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    left = []
    for pid, started in seen.items():
        try:
            process = psutil.Process(pid)
            if abs(process.create_time() - started) < 1e-3:
                left.append(process)
        except psutil.NoSuchProcess:
            pass
    for process in left:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=GRACE_S)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return len(left)


if __name__ == "__main__":
    reap(int(sys.argv[1]))
