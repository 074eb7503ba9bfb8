"""A run's hold on its folder: a lease file in the folder, local or on an object store.

Two runs of one `train.storage/train.name` (or two sweeps of one name) would
mix their checkpoints in one folder and overwrite each other's model. So a
run writes FOLDER/.lease.json before it starts (created only if absent: an
exclusive create, which local disks, S3 and fsspec's memory store each make
atomic), rewrites it every RENEW_S seconds while it lives, and removes it at
its end. A second run of the folder is refused, in one line naming the holder.

A holder that was killed leaves its lease behind. A successor takes it over
at once when the holder ran on the same machine and its process is gone, and
otherwise once the lease has not been renewed for TTL_S seconds (the holder's
clock against the successor's: a few seconds of skew between hosts is well
inside it). Two successors racing for one stale lease: each removes it and
creates its own, and only the one that reads its own back a moment later goes on.
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

LEASE = ".lease.json"
TTL_S = 90.0  # a lease not renewed for this long is a dead holder's
RENEW_S = 15.0
SETTLE_S = 1.0  # after taking over a stale lease: a rival's create would show by then


@dataclass
class Holder:
    what: str  # "make-dist train", "make-dist sweep"
    host: str
    boot: str  # the machine's boot id: a pid is only comparable within one boot
    pid: int
    process_started: float  # the process's start time: a pid reused since names another process
    token: str
    acquired: str
    renewed: float  # time.time() of the holder's last renewal
    command: str

    @classmethod
    def me(cls, what: str) -> "Holder":
        return cls(what, socket.gethostname(), _boot_id(), os.getpid(), _started(os.getpid()), uuid.uuid4().hex,
                   time.strftime("%Y-%m-%d %H:%M:%S %z"), time.time(), " ".join(sys.argv)[:300])

    def alive(self) -> bool:
        """Whether the holder may still run: its process, on this machine;
        a renewal within TTL_S, elsewhere."""
        if self.host == socket.gethostname() and self.boot == _boot_id():
            started = _started(self.pid)
            return started is not None and abs(started - self.process_started) < 1.0
        return time.time() - self.renewed < TTL_S

    def describe(self) -> str:
        age = max(0.0, time.time() - self.renewed)
        return (f"{self.what} on host {self.host}, pid {self.pid}, started {self.acquired}, lease renewed "
                f"{age:.0f} s ago")


class Lease:
    """`with Lease(folder, what, rename=...)`: hold the folder for the block,
    or raise UserError naming its holder. `rename` tells the user what to
    change to run beside the holder (e.g. "give this run another train.name")."""

    def __init__(self, folder: str, what: str, rename: str):
        self.folder, self.what, self.rename = folder.rstrip("/"), what, rename
        self.url = f"{self.folder}/{LEASE}"
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.me = Holder.me(what)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost: str | None = None  # why the lease was lost while held (it was taken over), if it was

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- acquiring ---------------------------------------------------------------

    def acquire(self) -> None:
        try:
            self.fs.makedirs(self.path.rpartition("/")[0], exist_ok=True)
            for _ in range(3):  # each round: free, or the holder dead; a rival that wins sends us round once more
                holder = self.read()
                took_over = False
                if holder is not None:
                    if holder.alive():
                        self._refuse(holder)
                    print(f"make-dist: {self.folder}: taking over the lease of a run that ended without giving it "
                          f"back ({holder.describe()})", file=sys.stderr)
                    self._remove()
                    took_over = True
                if self._create():
                    if took_over:
                        time.sleep(SETTLE_S)
                    if self._mine():
                        break
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{self.folder}: cannot hold the run's lease there ({storage_problem(e)})") from None
        else:
            if not self._mine():
                self._refuse(self.read())
            self._renewer = threading.Thread(target=self._renew, name="make-dist-lease", daemon=True)
            self._renewer.start()

    def read(self) -> Holder | None:
        """The lease's holder; None when there is no lease. One that does not
        parse (not written by make-dist, or damaged) names nobody: it is taken over."""
        try:
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            return Holder(**json.loads(raw))
        except (ValueError, TypeError):
            return Holder("an unreadable lease", "?", "?", -1, 0.0, "", "?", 0.0, "")

    def _create(self) -> bool:
        """The lease file with our holder in it, if none is there (atomically)."""
        data = json.dumps(asdict(self.me), indent=1).encode()
        if type(self.fs).__name__ == "LocalFileSystem":  # written whole beside, then linked: no reader sees it half-written
            tmp = f"{self.path}.{self.me.token}"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            with self.fs.open(self.path, "xb") as f:  # S3: a conditional put (If-None-Match)
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):  # a store without exclusive create: write, then read back
            if self.fs.exists(self.path):
                return False
            write_atomic(self.url, data)
            time.sleep(SETTLE_S)
            return True

    def _mine(self) -> bool:
        holder = self.read()
        return holder is not None and holder.token == self.me.token

    def _remove(self) -> None:
        try:
            self.fs.rm(self.path)
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
                holder = self.read()
                if holder is None or holder.token != self.me.token:
                    self.lost = f"taken over by {holder.describe() if holder else 'nobody (removed)'}"
                    print(f"make-dist: {self.folder}: this run's lease was {self.lost}", file=sys.stderr)
                    return
                self.me.renewed = time.time()
                write_atomic(self.url, json.dumps(asdict(self.me), indent=1))
            except Exception as e:  # storage briefly unreachable: try again at the next round
                print(f"make-dist: {self.folder}: could not renew the run's lease ({storage_problem(e)})",
                      file=sys.stderr)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)
            self._renewer = None
            try:
                if self._mine():
                    self._remove()
            except Exception:  # left behind, it is taken over later: never fail a finished run for it
                pass


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _started(pid: int) -> float | None:
    """When process `pid` started (None: there is none)."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None
