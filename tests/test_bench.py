"""bench/step.py, the GPU step benchmark, runs here at tiny size (CPU smoke):
every lever it times leaves the first step's loss as the baseline's."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from make_dist.train.trainer import Trainer


@pytest.mark.slow
def test_step_bench_runs_and_levers_keep_the_loss(repo_root, tmp_path, monkeypatch, process_group):
    """...and what it times is the users' step: its first loss of make-dist's
    variant is the Trainer's own `step` on the same batch."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "bench/step.py", "--small", "--only", "1,2,3,4,6,8", "--out", str(tmp_path),
                          "--work", str(tmp_path / "work")],
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

    spec = importlib.util.spec_from_file_location("bench_step", repo_root / "bench/step.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_step", bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["step.py", "--small", "--work", str(tmp_path / "work")])
    args = bench.parse_args()
    manifest = bench.make_data(args, tmp_path / "work")  # the bench's own shards, already there
    variant = bench.variants(args.batch, args.large, args.loader)[1]
    assert variant.name == "make-dist"
    trainer = Trainer(bench.variant_config(variant, bench.base_config(args, manifest)), 0, 1, torch.device("cpu"))
    batch = bench.memory_batches(trainer.cfg, trainer.model, manifest, variant.batch, args.batches,
                                 args.loader_workers)[0]
    assert float(trainer.step(batch)["loss/total"]) == pytest.approx(results[1]["first_loss"], abs=1e-6)
