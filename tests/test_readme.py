"""The README's commands as written: the local-cluster recipe, command for
command, in a shell where the project's environment is not activated, in a
checkout of its own (the tracked files, the environment beside them, and
the small shards `make demo` would have left)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
MARKER = "<!-- the local-cluster recipe: tests/test_readme.py runs these lines as they stand -->"


def recipe(readme: Path) -> str:
    """The bash block right after the marker."""
    text = readme.read_text()
    assert MARKER in text, "the README lost its recipe's marker"
    block = text.split(MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return block


def checkout(repo_root: Path, into: Path) -> Path:
    """The tracked files, and a `.venv` that is this environment (its bin entries and libraries linked)."""
    files = subprocess.run(["git", "-C", str(repo_root), "ls-files", "-z"], capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((repo_root / name).read_bytes())
        target.chmod((repo_root / name).stat().st_mode)
    venv = Path(sys.prefix)
    (into / ".venv/bin").mkdir(parents=True)
    (into / ".venv/pyvenv.cfg").write_text((venv / "pyvenv.cfg").read_text())
    (into / ".venv/lib").symlink_to(venv / "lib")
    for entry in (venv / "bin").iterdir():
        (into / ".venv/bin" / entry.name).symlink_to(entry)
    return into


def test_the_local_cluster_recipe_runs_as_written(tmp_path, repo_root):
    root = checkout(repo_root, tmp_path / "make-dist")
    exe = root / ".venv/bin/make-dist"
    for args in (["synth", "--out", "demo/data", "--n", "64", "--n-eval", "16", "--size", "64"],
                 ["shards", "--table", "demo/data/train.csv", "--images-root", "demo/data", "--out", "demo/shards",
                  "--columns", "configs/columns/synthetic.yaml", "--shard-size", "16"]):
        subprocess.run([exe, *args, "--workers", "2"], cwd=root, check=True, capture_output=True, timeout=300)
    bare = {"HOME": os.environ["HOME"], "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    try:
        out = subprocess.run(["bash", "-e", "-x", "-c", recipe(repo_root / "README.md")], cwd=root, env=bare,
                             capture_output=True, text=True, timeout=540)
    finally:
        subprocess.run([root / ".venv/bin/ray", "stop"], cwd=root, env=bare, capture_output=True, timeout=120)
    said = out.stdout + out.stderr
    assert out.returncode == 0, said[-5000:]
    assert "succeeded" in said and "+ .venv/bin/ray stop" in said
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("make-dist-tiny").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["ray.job_submission_id"].startswith("raysubmit_")
    assert (root / "runs/make/model/open_clip_pytorch_model.bin").is_file()

