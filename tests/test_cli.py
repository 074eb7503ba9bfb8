"""The `make-dist` command line, run as a user runs it."""

import subprocess
import sys
from pathlib import Path

import yaml

EXE = Path(sys.executable).parent / "make-dist"  # the installed console script


def run(*args, cwd=None):
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_help_lists_subcommands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("config", "model", "synth", "shards", "train", "demo", "eval", "sweep", "wheelhouse"):
        assert command in out.stdout


def test_config_prints_resolved_yaml(repo_root):
    out = run("config", "--config", str(repo_root / "configs/tiny.yaml"), "--set", "loss.lam=0.25")
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["loss"]["lam"] == 0.25 and resolved["model"]["name"] == "make-tiny"


def test_config_prints_the_steps_of_the_epochs(repo_root, tmp_path):
    import json

    (tmp_path / "manifest.json").write_text(json.dumps({"samples": 403_563, "shards": ["a.tar"], "subtexts": 8}))
    out = run("config", "--config", str(repo_root / "configs/paper.yaml"),
              "--set", f"data.train_shards={tmp_path / 'manifest.json'}")
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["train"]["steps"] == 2956
    assert "train.steps = 2956: 15 epochs of 403,563 samples at 2,048 a step (1 x 2048)" in out.stdout
    out = run("config", "--config", str(repo_root / "configs/paper.yaml"))  # no shards named: says so
    assert out.returncode == 0 and "train.steps follows from the sample count" in out.stdout


def test_bad_config_fails_naming_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: fast\n")
    out = run("config", "--config", str(path))
    assert out.returncode == 2
    assert f"{path}: optim.lr = 'fast': expected a number" in out.stderr
    assert "Traceback" not in out.stderr


def test_model_export(repo_root, tmp_path):
    out = run("model", "--config", str(repo_root / "configs/tiny.yaml"), "--export", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr
    assert "M parameters" in out.stdout
    assert (tmp_path / "m/open_clip_config.json").is_file() and (tmp_path / "m/open_clip_pytorch_model.bin").is_file()


def test_synth_then_shards(repo_root, tmp_path):
    out = run("synth", "--out", str(tmp_path / "synth"), "--n", "20", "--n-eval", "5", "--size", "64", "--workers", "1")
    assert out.returncode == 0, out.stderr
    assert "20 training and 5 held-out images" in out.stdout
    out = run("shards", "--table", str(tmp_path / "synth/train.csv"), "--images-root", str(tmp_path / "synth"),
              "--out", str(tmp_path / "shards"), "--columns", str(repo_root / "configs/columns/synthetic.yaml"),
              "--shard-size", "8", "--workers", "1")
    assert out.returncode == 0, out.stderr
    assert "20 samples in 3 shards" in out.stdout and "skipped 0 rows" in out.stdout


def test_shards_with_missing_table_fails_clearly(repo_root, tmp_path):
    out = run("shards", "--table", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o"),
              "--columns", str(repo_root / "configs/columns/synthetic.yaml"))
    assert out.returncode == 2 and "table not found" in out.stderr and "Traceback" not in out.stderr


def test_demo_end_to_end_small(tmp_path):
    """The README's first command, at a small size (the default run is timed in docs/BENCHMARKS.md)."""
    out = subprocess.run([str(EXE), "demo", "--out", str(tmp_path / "demo"), "--n", "120", "--steps", "4"],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for line in ("[1/4] synthesising 120", "[2/4] writing shards", "[3/4] training the tiny model with the MAKE",
                 "[4/4] training the tiny model with the CLIP objective", "make-dist demo: done",
                 "120 training samples in", "4 steps x 2 workers", "zero-shot on", "classify/top1",
                 "retrieval/mean_recall", "x chance"):
        assert line in out.stdout, line
    models = list((tmp_path / "demo/runs").glob("demo-*/model/open_clip_pytorch_model.bin"))
    assert len(models) == 2  # MAKE and the CLIP objective
    assert (tmp_path / "mlflow.db").is_file()  # the default store, in the working directory
