"""A sweep's folder (`<storage>/<name>`) holds one sweep.

Run again with the same name, storage and settings, a sweep resumes: its Tune
state and its trials' checkpoints are in the folder. Two things keep another
sweep out of it: the lease (`hold`), which refuses a second sweep of the name
while the first runs, and the settings it was started with (`sweep.json`,
`check_same_settings`), which refuse a rerun with other settings: resuming it
would mix two experiments (a trial trained under two configs).
"""

from __future__ import annotations

import dataclasses
import json

from ..errors import UserError
from ..files import read_bytes, write_atomic
from ..lease import Lease
from .schema import SweepConfig

SETTINGS_FILE = "sweep.json"  # in the sweep's folder: what it was started with, checked on resume


def hold(sweep_dir: str) -> Lease:
    """The sweep's lease on its folder, held while it runs (a second sweep of the name is refused)."""
    return Lease(sweep_dir, "make-dist sweep", rename="give this sweep another name (--set sweep.name=NEW)")


def check_same_settings(sweep: SweepConfig, base: dict, sweep_dir: str) -> None:
    """A sweep folder resumes only the sweep it was started with: other
    settings would mix experiments (a trial trained under two configs)."""
    settings = {"sweep": dataclasses.asdict(sweep), "base": base}
    settings["sweep"].pop("set")  # folded into base
    path = f"{sweep_dir}/{SETTINGS_FILE}"
    try:
        recorded = json.loads(read_bytes(path))
    except FileNotFoundError:
        write_atomic(path, json.dumps(settings, indent=1, default=str))
        return
    now = json.loads(json.dumps(settings, default=str))
    differ = [k for k in sorted(set(_flat(recorded)) | set(_flat(now))) if _flat(recorded).get(k) != _flat(now).get(k)]
    if differ:
        shown = "; ".join(f"{k}: {_flat(recorded).get(k)!r} then, {_flat(now).get(k)!r} now" for k in differ[:5])
        raise UserError(f"sweep {sweep.name}: {sweep_dir} holds a sweep started with other settings ({shown}"
                        f"{' ...' if len(differ) > 5 else ''}). Resuming would mix the two: start this one "
                        f"under another name (--set sweep.name=NEW) or remove {sweep_dir}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "space":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
    return out
