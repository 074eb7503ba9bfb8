"""bench/step.py, the GPU step benchmark, runs here at tiny size (CPU smoke):
every lever it times leaves the first step's loss as the baseline's."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_step_bench_runs_and_levers_keep_the_loss(repo_root, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "bench/step.py", "--small", "--only", "1,2,3,4,6,8", "--out", str(tmp_path)],
                         cwd=repo_root, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "step.json").read_text())["results"]
    names = [r["variant"] for r in results]
    assert names[0].startswith("baseline") and names[1] == "make-dist" and len(names) == 6
    base = results[0]["first_loss"]
    for r in results:
        assert r["samples_per_s"] > 0
        assert r["first_loss"] == pytest.approx(base, abs=1e-4), r["variant"]  # fp32: the same objective
    table = (tmp_path / "step.md").read_text()
    assert "| make-dist | 8 |" in table and "vs baseline" in table
