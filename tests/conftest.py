import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors.
# It is chosen when a kernel is defined, so this must precede any import of
# `kernels` (test modules are imported after this file).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

from make_dist.train.cluster import LOCAL_POLL_INTERVAL_S, POLL_INTERVAL  # noqa: E402  (after the interpreter's switch)

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def _empty_tracking_store() -> Path:
    from mlflow.tracking import MlflowClient

    db = Path(tempfile.mkdtemp(prefix="make-dist-tests-")) / "empty.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # MLflow makes its tables
    return db


def tracking_db(path: Path) -> str:
    """`sqlite:///PATH`: a real MLflow store in SQLite, its tables made. Made
    once per session and copied: MLflow's migrations take 2-3 s for every new
    database. (The demo test, the MLflow server and every user start from
    none.) Only for a client's store: its default experiment keeps artifacts
    in the creating process's folder, a server's in its own."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_tracking_store(), path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def process_group():
    """A process group of one in this process, for the Trainer driven here:
    made once and kept for the session (DeepSpeed keeps its groups, so one
    destroyed and made again breaks it). Of the environment it sets, only
    what DeepSpeed reads again later (LOCAL_RANK) stays: the tests' other
    processes must not inherit a rendezvous."""
    from make_dist.train import engine

    saved = dict(os.environ)
    engine.init_single_process(use_gpu=False)
    os.environ.clear()
    os.environ.update(saved)
    os.environ.setdefault("LOCAL_RANK", "0")
    yield


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, repo_root) -> str:
    """96 synthetic 64-px samples in 12 shards of 8 (the training tests' data),
    beside the synthetic set with 40 held-out images in ../synth."""
    from make_dist.data.schema import load_column_map
    from make_dist.data.shards import write_shards
    from make_dist.data.synth import synthesize

    root = tmp_path_factory.mktemp("data")
    synthesize(root / "synth", n=96, n_eval=40, size=64, seed=0, workers=2, progress=False)
    write_shards(str(root / "synth/train.csv"), str(root / "shards"),
                 load_column_map(repo_root / "configs/columns/synthetic.yaml"), images_root=str(root / "synth"),
                 shard_size=8, workers=2, progress=False)
    return str(root / "shards/manifest.json")


def run_command(args: list[str], timeout: float = 540, **kwargs):
    """subprocess.run with its output captured; on a timeout the test fails
    with what the command printed so far (kept under pytest's own 600 s, which
    would show only pytest's stack)."""
    import subprocess

    try:
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"{args[0]} {args[1] if len(args) > 1 else ''} ran past {timeout} s; it printed:\n"
                    f"{out[-4000:]}\n{err[-4000:]}")


# For a cluster started here: Ray Train's controller collects the workers' reports 4
# times a second, not every 2 s, as docs/cluster.md tells a user who checkpoints often.
FAST_REPORTS = {POLL_INTERVAL: LOCAL_POLL_INTERVAL_S}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_dashboard(address: str, head, timeout: float = 180) -> None:
    """Until the Ray head started as process `head` answers at its dashboard address."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # it answers (401 without the token): it is up
            return
        except OSError as e:
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start --head did not come up ({e})") from None
            time.sleep(1)


@pytest.fixture(scope="module")
def ray_head():
    """A real local cluster: `ray start --head --block` on 127.0.0.1, with token
    auth, shared by a module's jobs; stopping that process group stops this
    cluster alone (`ray stop` would stop every Ray on the machine)."""
    import secrets
    import signal
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    dashboard = free_port()
    # The head and the submitting client share one token (RAY_AUTH_MODE must be
    # set for both, see docs/cluster.md).
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RAY_TMPDIR=f"/tmp/mdj{dashboard}",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), **FAST_REPORTS)
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
         "--num-cpus=2", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    wait_for_dashboard(address, head)
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)  # a clean stop takes half a minute; the jobs are done by now
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
