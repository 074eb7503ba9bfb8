"""Ray for make-dist: join the cluster the user names, or start an embedded one.

Under `ray job submit --address ...` RAY_ADDRESS is set and a command joins
that cluster, after checking that it answers and that every node's Python
imports the workers' dependencies. Run directly, a command starts its own
embedded local Ray, its dashboard and job API on 127.0.0.1 (a dashboard
runs whatever is submitted to it; Ray 2.60 binds its gRPC ports to every
interface whatever it is told: docs/cluster.md, Security), and never joins
another cluster found on the machine.
"""

from __future__ import annotations

import logging
import os
import socket

from .. import overrides
from ..errors import UserError
from . import reaper

POLL_INTERVAL = overrides.RAY_TRAIN_POLL_INTERVAL  # how often Ray Train's controller polls its workers
LOCAL_POLL_INTERVAL_S = "0.25"  # the embedded Ray's (Ray's default: 2 s)


def init_ray(quiet: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (checked: it answers, and every
    node can import the workers' dependencies), or start an embedded local Ray.
    quiet: the workers' output and Ray's own messages stay in Ray's log files
    (`ray_logs()`), off the terminal."""
    import ray

    if ray.is_initialized():
        return
    options = {"log_to_driver": False, "logging_level": logging.ERROR} if quiet else {}
    if quiet:  # the raylet's messages, which Ray's driver prints whatever log_to_driver says, go to the log
        overrides.ray_raylet_messages_to_log()
    address = os.environ.get("RAY_ADDRESS")
    if address:  # a cluster (ray job submit or an exported address)
        check_ray_address(address)
        ray.init(**options)
        check_nodes()
    else:
        # address="local": always a new embedded instance; without it ray.init joins the last
        # cluster recorded in Ray's temp folder or any live one on this machine (a stale one hangs).
        # The dashboard serves Ray's state API, which Ray Train polls; it listens on 127.0.0.1 only.
        # The workers are told where it is: left to find it, the state API scans the machine, and
        # with another Ray running here it finds two and fails; Ray Train's placement-group
        # cleaner then never frees a stopped trial's CPUs and the next trial waits forever.
        # Nothing preempts this one node: Ray Train's preemption watcher (one more actor
        # process per run, seconds of start-up on a laptop) is left out.
        # A worker's report (a checkpoint, an evaluation) waits until Ray Train's controller
        # polls it, every 2 s by default: on one machine polling costs nothing, so it polls
        # 4 times a second (a value the user exported is kept).
        port = _free_port()
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 **overrides.ray_embedded_options(port, os.environ.get(POLL_INTERVAL, LOCAL_POLL_INTERVAL_S)),
                 **options)
        reaper.watch(os.getpid())  # a driver killed outright leaves no Ray agent behind


def ray_job() -> tuple[str | None, str | None]:
    """(the job's submission id, Ray's copy of its working directory) when
    this process is the entry point of `ray job submit` (each None when not).
    The copy is where the job runs, and it goes with the Ray session: what a
    job writes there under a relative path is lost."""
    job, copied = overrides.ray_job_submission()
    return job, (os.getcwd() if copied else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ray_address(address: str, timeout: float = 10.0) -> None:
    """The named cluster takes a connection within seconds (ray.init would
    retry an address nobody answers for minutes, printing warnings)."""
    if address in ("auto", "local"):  # Ray's own discovery on this machine
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"RAY_ADDRESS = {address}: expected HOST:PORT (the head's GCS address, "
                        f"as `ray start --head` prints it)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"RAY_ADDRESS = {address}: no Ray cluster answers there ({e.strerror or e}). Start its "
                        f"head (.venv/bin/ray start --head ...), fix the address, or unset RAY_ADDRESS to run on "
                        f"an embedded local Ray") from None


# What every node's Python must import to run a worker; make_dist itself comes
# with the job's --working-dir.
WORKER_MODULES = ("torch", "deepspeed", "webdataset", "mlflow", "fsspec", "open_clip", "make_dist")


def check_nodes(modules: tuple[str, ...] = WORKER_MODULES, timeout: float = 180.0) -> None:
    """Every live node of the cluster imports `modules`: one zero-CPU task
    pinned to each, before any worker starts (else a worker dies deep in a
    traceback on the first node started from another Python)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0, max_retries=0)(_missing_modules)
    refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(modules): n["NodeManagerAddress"] for n in nodes}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    problems = []
    for ref in ready:
        python, missing = ray.get(ref)
        if missing:
            problems.append(f"node {refs[ref]} ({python}) cannot import {', '.join(missing)}")
    problems += [f"node {refs[ref]} did not run a probe task within {timeout:.0f} s" for ref in late]
    if problems:
        raise UserError("the cluster cannot run make-dist's workers: " + "; ".join(problems) + ". Start every "
                        "node's Ray with the project's environment on its PATH (PATH=$PWD/.venv/bin:$PATH ray "
                        "start ...), or give the job one (--runtime-env-json '{\"pip\": \"requirements.lock\"}')")


def _missing_modules(modules: tuple[str, ...]) -> tuple[str, list[str]]:
    import importlib
    import sys

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing.append(f"{name} ({e})")
    return sys.executable, missing


def ray_logs() -> str:
    """The folder of this Ray session's logs (workers' output included)."""
    return overrides.ray_logs_dir()
