"""What the job scripts share: the package found under --working-dir, and a
clear line when this Python cannot import make-dist's dependencies."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package, under --working-dir


def run(command: str) -> int:
    """`make-dist COMMAND` with this script's arguments."""
    try:
        from make_dist.cli import main

        return main([command, *sys.argv[1:]])
    except ModuleNotFoundError as e:  # the usual cause: a Ray head started outside the project's environment
        print(f"make-dist: this Python ({sys.executable}) cannot import make-dist's dependencies ({e}). "
              f"Under `ray job submit` a job runs in the `python` found on the PATH its Ray head was started "
              f"with (`.venv/bin/ray start` alone leaves the system's first): start the head with the "
              f"environment on its PATH (PATH=$PWD/.venv/bin:$PATH ray start --head ...), or name that Python "
              f"in the job (-- $PWD/.venv/bin/python jobs/...), or give the job an environment "
              f"(--runtime-env-json '{{\"pip\": \"requirements.lock\"}}').", file=sys.stderr)
        return 2
