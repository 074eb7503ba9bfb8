"""A run's lease on its folder: one holder at a time, a dead holder's lease taken over.

Real files and real processes (holders killed for real, rivals racing); two
`make-dist train` runs racing for one name are in test_train.py, the lease on
S3 in test_object_storage.py.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from make_dist import lease
from make_dist.errors import UserError
from make_dist.lease import Lease

HOLD = textwrap.dedent("""
    import sys, time
    from make_dist.lease import Lease
    from make_dist.errors import UserError
    try:
        with Lease(sys.argv[1], "a test holder", rename="pick another name"):
            print("won", flush=True)
            time.sleep(float(sys.argv[2]))
    except UserError as e:
        print("refused:", e, flush=True)
""")


def hold(folder, seconds):
    return subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True)


def written(folder, generation=0, **changes):
    """A lease file as another holder would have left it."""
    record = dataclasses.asdict(lease.Holder.me("make-dist training run"))
    record.update(changes)
    (folder / f".lease-{generation:06d}.json").write_text(json.dumps(record))
    return record


def holder(folder):
    """The lease's current holder, as its file says (None: no lease)."""
    files = sorted(folder.glob(".lease-*.json"))
    return json.loads(files[-1].read_text()) if files else None


def test_a_second_holder_is_refused_naming_the_first_until_it_ends(tmp_path):
    with Lease(str(tmp_path / "run"), "make-dist training run", rename="give this run another train.name"):
        assert holder(tmp_path / "run")["what"] == "make-dist training run"
        with pytest.raises(UserError) as refused:
            Lease(str(tmp_path / "run"), "make-dist training run", rename="give this run another train.name").acquire()
        message = str(refused.value)
        assert f"{tmp_path}/run is in use by another run (make-dist training run on host " in message
        assert f"pid {os.getpid()}" in message and "give this run another train.name" in message
    assert holder(tmp_path / "run") is None  # given back
    with Lease(str(tmp_path / "run"), "make-dist training run", rename="-"):
        pass


def test_a_killed_holders_lease_is_taken_over_at_once_on_its_machine(tmp_path, capfd):
    proc = hold(tmp_path, 600)
    assert proc.stdout.readline().strip() == "won"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert holder(tmp_path)["what"] == "a test holder"  # left behind
    start = time.time()
    with Lease(str(tmp_path), "make-dist training run", rename="-"):
        assert time.time() - start < 5
    assert "taking over the lease of a run that ended without giving it back (a test holder on host" in \
        capfd.readouterr().err


def test_a_lease_from_another_machine_is_taken_over_only_once_it_is_old(tmp_path, capfd):
    written(tmp_path, host="node-7", boot="another-boot", pid=1, renewed=time.time() - 10)
    with pytest.raises(UserError, match=r"in use by another run \(make-dist training run on host node-7, pid 1, "
                                        r".*lease renewed 1\d s ago\)"):
        Lease(str(tmp_path), "make-dist training run", rename="-").acquire()
    written(tmp_path, host="node-7", boot="another-boot", pid=1, renewed=time.time() - lease.TTL_S - 5)
    with Lease(str(tmp_path), "make-dist training run", rename="-"):
        assert holder(tmp_path)["host"] != "node-7" and [p.name for p in tmp_path.glob(".lease-*")] == [
            ".lease-000001.json"]  # the next generation; the dead one's file gone
    assert "taking over the lease" in capfd.readouterr().err


def test_rivals_racing_for_one_folder_leave_one_holder(tmp_path):
    rivals = [hold(tmp_path, 4) for _ in range(4)]
    outcomes = [r.communicate(timeout=60)[0].strip() for r in rivals]
    assert sum(o == "won" for o in outcomes) == 1, outcomes
    assert all(o == "won" or o.startswith("refused:") and "a test holder on host" in o for o in outcomes), outcomes


def test_successors_racing_for_a_dead_holders_lease_leave_one_holder(tmp_path):
    written(tmp_path, generation=3, host="node-7", boot="another-boot", pid=1, renewed=time.time() - lease.TTL_S - 5)
    rivals = [hold(tmp_path, 4) for _ in range(4)]
    outcomes = [r.communicate(timeout=60)[0].strip() for r in rivals]
    assert sum(o == "won" for o in outcomes) == 1, outcomes
    assert [p.name for p in tmp_path.glob(".lease-*")] == []  # the winner's generation 4, given back


def test_a_held_lease_is_renewed_and_a_lost_one_stops_its_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "RENEW_S", 0.2)
    told = []
    with Lease(str(tmp_path), "make-dist training run", rename="-", on_lost=told.append) as held:
        first = holder(tmp_path)["renewed"]
        time.sleep(0.7)
        assert holder(tmp_path)["renewed"] > first
        written(tmp_path, generation=1, host="node-7", pid=1, token="someone-else")  # took over a stalled holder
        time.sleep(0.7)
        assert held.lost and "taken over by make-dist training run on host node-7" in held.lost
        assert told == [held.lost]
    assert holder(tmp_path)["token"] == "someone-else"  # not removed: not ours


def test_a_pid_in_another_pid_namespace_is_judged_by_its_lease_age(tmp_path):
    """Containers may share a host name and a boot: a pid there says nothing here."""
    written(tmp_path, pid=1, pid_namespace="pid:[1]", renewed=time.time())
    with pytest.raises(UserError, match="in use by another run"):
        Lease(str(tmp_path), "make-dist training run", rename="-").acquire()
