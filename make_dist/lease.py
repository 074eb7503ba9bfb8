"""A run's hold on its folder: a lease file in the folder, local or on an object store.

Two runs of one `train.storage/train.name` (or two sweeps of one name) would
mix their checkpoints in one folder and overwrite each other's model. So a
run holds its folder by a lease while it runs: FOLDER/.lease-NNNNNN.json,
rewritten every RENEW_S seconds and removed at the run's end. A second run
of the folder is refused, in one line naming the holder.

Leases come in generations, and a generation's file is only ever created
if absent (an exclusive create, which local disks, S3 and fsspec's memory
store each make atomic): the lease is the newest generation's file. A
holder that was killed leaves its file behind; a successor takes over by
creating the next generation, at once when the holder ran on the same
machine (and pid namespace) and its process is gone, otherwise once the
lease has not been renewed for TTL_S seconds (the holder's clock against
the successor's: a few seconds of skew between hosts is well inside it).
Of two successors racing for one stale lease, one creates the next
generation and the other is refused; nothing is ever deleted but by its
owner, or once superseded. A holder that finds a newer generation than
its own has lost its lease: it says so and stops (`on_lost`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import fsspec

from .errors import UserError
from .files import storage_problem, write_atomic

PREFIX = ".lease-"  # FOLDER/.lease-000000.json, .lease-000001.json, ...: generations
TTL_S = 90.0  # a lease not renewed for this long is a dead holder's
RENEW_S = 15.0
SETTLE_S = 1.0  # a store without exclusive create: a rival's write would show by then


@dataclass
class Holder:
    what: str  # "make-dist train", "make-dist sweep"
    host: str
    boot: str  # the machine's boot id: a pid is only comparable within one boot
    pid_namespace: str  # and within one pid namespace (containers may share a host name and a boot)
    pid: int
    process_started: float  # the process's start time: a pid reused since names another process
    token: str
    acquired: str
    renewed: float  # time.time() of the holder's last renewal
    command: str

    @classmethod
    def me(cls, what: str) -> "Holder":
        return cls(what, socket.gethostname(), _boot_id(), _pid_namespace(), os.getpid(), _started(os.getpid()),
                   uuid.uuid4().hex, time.strftime("%Y-%m-%d %H:%M:%S %z"), time.time(), " ".join(sys.argv)[:300])

    def alive(self) -> bool:
        """Whether the holder may still run: its process, where this process
        can see it (the same machine, boot and pid namespace); a renewal within
        TTL_S, elsewhere."""
        if (self.host, self.boot, self.pid_namespace) == (socket.gethostname(), _boot_id(), _pid_namespace()):
            return _running(self.pid, self.process_started)
        return time.time() - self.renewed < TTL_S

    def describe(self) -> str:
        age = max(0.0, time.time() - self.renewed)
        return (f"{self.what} on host {self.host}, pid {self.pid}, started {self.acquired}, lease renewed "
                f"{age:.0f} s ago")


class Lease:
    """`with Lease(folder, what, rename=...)`: hold the folder for the block,
    or raise UserError naming its holder. `rename` tells the user what to
    change to run beside the holder (e.g. "give this run another train.name");
    `on_lost(reason)` is called (from the renewing thread) if another run
    takes the lease over while it is held."""

    def __init__(self, folder: str, what: str, rename: str, on_lost=None):
        self.folder, self.what, self.rename, self.on_lost = folder.rstrip("/"), what, rename, on_lost
        self.fs, self.path = fsspec.core.url_to_fs(self.folder)
        self.path = self.path.rstrip("/")
        self.me = Holder.me(what)
        self.generation: int | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost: str | None = None  # why the lease was lost while held (taken over), if it was

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- acquiring ---------------------------------------------------------------

    def acquire(self) -> None:
        try:
            self.fs.makedirs(self.path, exist_ok=True)
            for _ in range(5):  # a rival that creates the generation we aimed at sends us round once more
                current = self.current()
                if current is None:
                    generation = 0
                else:
                    generation, holder = current
                    if holder.alive():
                        self._refuse(holder)
                    print(f"make-dist: {self.folder}: taking over the lease of a run that ended without giving it "
                          f"back ({holder.describe()})", file=sys.stderr)
                    generation += 1
                if self._create(generation) and self._mine(generation):
                    self.generation = generation
                    self._forget_older()
                    break
            else:
                current = self.current()
                self._refuse(current[1] if current else None)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{self.folder}: cannot hold the run's lease there ({storage_problem(e)})") from None
        self._renewer = threading.Thread(target=self._renew, name="make-dist-lease", daemon=True)
        self._renewer.start()

    def current(self) -> tuple[int, Holder] | None:
        """The newest generation and its holder; None when there is no lease.
        A file that does not parse (not written by make-dist, or damaged) names
        a holder long dead: it is taken over."""
        generations = self._generations()
        if not generations:
            return None
        newest = max(generations)
        try:
            return newest, Holder(**json.loads(self.fs.cat_file(self._file(newest))))
        except FileNotFoundError:  # given back meanwhile
            return self.current() if newest in self._generations() else None
        except (ValueError, TypeError):
            return newest, Holder("an unreadable lease", "?", "?", "?", -1, 0.0, "", "?", 0.0, "")

    def _generations(self) -> list[int]:
        found = []
        for path in self.fs.glob(f"{self.path}/{PREFIX}*.json"):
            number = path.rpartition(PREFIX)[2][: -len(".json")]
            if number.isdigit():
                found.append(int(number))
        return found

    def _file(self, generation: int) -> str:
        return f"{self.path}/{PREFIX}{generation:06d}.json"

    def _create(self, generation: int) -> bool:
        """This generation's file with our holder in it, if there is none (atomically)."""
        path, data = self._file(generation), json.dumps(asdict(self.me), indent=1).encode()
        if type(self.fs).__name__ == "LocalFileSystem":  # written whole beside, then linked: never seen half-written
            tmp = f"{path}.{self.me.token}"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            with self.fs.open(path, "xb") as f:  # S3: a conditional put (If-None-Match)
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):  # a store without exclusive create: write, then read back
            if self.fs.exists(path):
                return False
            write_atomic(self.fs.unstrip_protocol(path), data)
            time.sleep(SETTLE_S)
            return True

    def _mine(self, generation: int) -> bool:
        current = self.current()
        return current is not None and current[0] == generation and current[1].token == self.me.token

    def _forget_older(self) -> None:
        """Superseded generations (dead holders' files) are removed."""
        for generation in self._generations():
            if generation < self.generation:
                self._remove(generation)

    def _remove(self, generation: int) -> None:
        try:
            self.fs.rm(self._file(generation))
        except FileNotFoundError:
            pass

    def _refuse(self, holder: Holder | None) -> None:
        who = holder.describe() if holder is not None else "another run"
        raise UserError(f"{self.folder} is in use by another run ({who}). Wait for it to end, or {self.rename}. "
                        f"(The lease of a run that died is taken over at once on its own machine, elsewhere once "
                        f"it is {TTL_S:.0f} s old.)")

    # -- holding and giving back -------------------------------------------------

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                if not self._mine(self.generation):
                    current = self.current()
                    self.lost = f"taken over by {current[1].describe() if current else 'nobody (removed)'}"
                    print(f"make-dist: {self.folder}: this run's lease was {self.lost}", file=sys.stderr)
                    if self.on_lost is not None:
                        self.on_lost(self.lost)
                    return
                self.me.renewed = time.time()
                write_atomic(self.fs.unstrip_protocol(self._file(self.generation)),
                             json.dumps(asdict(self.me), indent=1))
            except Exception as e:  # storage briefly unreachable: try again at the next round
                print(f"make-dist: {self.folder}: could not renew the run's lease ({storage_problem(e)})",
                      file=sys.stderr)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)
            self._renewer = None
            try:
                if self._mine(self.generation):
                    self._remove(self.generation)
            except Exception:  # left behind, it is taken over later: never fail a finished run for it
                pass


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _started(pid: int) -> float:
    """When process `pid` (one that runs: this one) started."""
    import psutil

    return psutil.Process(pid).create_time()


def _running(pid: int, started: float) -> bool:
    """Whether process `pid`, started at `started`, still runs (a pid reused
    since names another process). One this process may not look at (hidepid,
    another user's) counts as running: nothing says it is not."""
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.AccessDenied:
        return True
    except (psutil.NoSuchProcess, ValueError):
        return False
