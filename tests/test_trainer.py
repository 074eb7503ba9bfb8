"""The Trainer in this process, no Ray: its step, checkpoints, resume and
export, driven directly (real DeepSpeed on a gloo group of one, real shards,
a real MLflow store), and `make-dist train --no-ray`."""

import os
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import run_command, tracking_db
from mlflow.tracking import MlflowClient

from make_dist.config import load_config
from make_dist.train.checkpoints import KEEP, RunFolder
from make_dist.train.trainer import Trainer

CPU = torch.device("cpu")
EXE = Path(sys.executable).parent / "make-dist"


def config(tmp_path, shards, repo_root, **extra):
    values = {"data.train_shards": shards, "train.storage": str(tmp_path / "runs"), "train.workers": 1,
              "tracking.uri": tracking_db(tmp_path / "mlflow.db"), "train.steps": 2, "train.checkpoint_every": 1,
              "data.num_workers": 0, "tracking.log_model": False, "data.resampled": "false",
              "data.shuffle_buffer": 0, **extra}
    return load_config(repo_root / "configs/tiny.yaml", [f"{k}={v}" for k, v in values.items()])


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.clip.state_dict().items()}


def test_a_step_moves_the_weights_and_reports_the_losses(process_group, tmp_path, tiny_shards, repo_root):
    trainer = Trainer(config(tmp_path, tiny_shards, repo_root), 0, 1, CPU)
    before = weights(trainer)
    batch = next(trainer.batches())
    assert batch.rows_per_rank == [16]
    result = trainer.step(batch)
    assert set(result) >= {"loss/total", "loss/mkcl", "loss/slra", "logit_scale"}
    assert torch.isfinite(result["loss/total"])
    after = weights(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_fit_checkpoints_resumes_and_exports(process_group, tmp_path, tiny_shards, repo_root):
    """Three steps with a checkpoint each: the run folder keeps the newest two
    and the export; a trainer built from them resumes at step 3 with the
    weights the run ended with, and one told to go on to step 4 does."""
    cfg = config(tmp_path, tiny_shards, repo_root, **{"train.steps": 3})
    run_dir = f"{cfg.train.storage}/{cfg.train.name}"
    folder = RunFolder(run_dir)
    first = Trainer(cfg, 0, 1, CPU, reporter=folder, run_dir=run_dir)
    first.fit()
    kept = folder.checkpoints()
    assert len(kept) == KEEP and folder.metrics["step"] == 3
    assert sorted(p.name for p in Path(run_dir).iterdir() if not p.name.startswith("checkpoint_")) == ["model"]
    exported = open_clip.create_model(f"local-dir:{run_dir}/model")
    ended = weights(first)
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in ended.items() if v.is_floating_point())

    again = Trainer(cfg, 0, 1, CPU, resume_from=kept, reporter=folder, run_dir=run_dir)
    assert again.start_step == 3 and again.samples_seen == 3 * 16
    assert all(torch.equal(weights(again)[k], v) for k, v in ended.items())
    longer = Trainer(config(tmp_path, tiny_shards, repo_root, **{"train.steps": 4}), 0, 1, CPU,
                     resume_from=folder.checkpoints(), reporter=folder, run_dir=run_dir)
    longer.fit()
    assert folder.metrics["step"] == 4 and longer.samples_seen == 4 * 16


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(process_group, tmp_path, tiny_shards, repo_root,
                                                                  capsys):
    cfg = config(tmp_path, tiny_shards, repo_root)
    run_dir = f"{cfg.train.storage}/{cfg.train.name}"
    folder = RunFolder(run_dir)
    Trainer(cfg, 0, 1, CPU, reporter=folder, run_dir=run_dir).fit()
    newest, older = folder.checkpoints()
    for f in Path(newest.location, "state").glob("*.pt"):
        f.write_bytes(f.read_bytes()[:100])  # a truncated upload
    resumed = Trainer(cfg, 0, 1, CPU, resume_from=folder.checkpoints())
    assert resumed.start_step == 1
    said = capsys.readouterr().out
    assert f"the checkpoint {newest.location} could not be read" in said and older.location in said


def test_nonfinite_losses_skip_steps_then_stop_the_run(process_group, tmp_path, tiny_shards, repo_root, capsys):
    """A learning rate of 1e8 blows the weights up after the first step: the
    next steps are skipped, the run stops after train.max_nonfinite in a row,
    its MLflow run marked FAILED with the one step it took."""
    from make_dist.train.launch import fit
    from make_dist.train.trainer import NonFiniteLoss

    cfg = config(tmp_path, tiny_shards, repo_root, **{"optim.lr": 1e8, "optim.warmup_steps": 1, "train.steps": 10,
                                                       "train.max_nonfinite": 2, "train.checkpoint_every": 100})
    with pytest.raises(NonFiniteLoss, match="2 non-finite losses in a row"):
        fit(cfg, ray=False)
    assert "non-finite loss, step skipped (1 in a row, 1 in all)" in capsys.readouterr().out
    client = MlflowClient(cfg.tracking.uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "make-dist-tiny"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")] == [1]


def test_train_without_ray(tmp_path, tiny_shards, repo_root):
    """`make-dist train --no-ray`: one process, no Ray session folder written,
    the MLflow run and the export as a Ray run leaves them; run again with
    more steps, it resumes from its checkpoint."""
    sets = {"data.train_shards": tiny_shards, "train.storage": f"{tmp_path}/runs", "train.workers": 1,
            "tracking.uri": tracking_db(tmp_path / "mlflow.db"), "train.steps": 2, "train.checkpoint_every": 1,
            "data.num_workers": 0, "tracking.log_model": "false", "train.name": "here"}

    def train(**more):
        args = [EXE, "train", "--config", repo_root / "configs/tiny.yaml", "--no-ray"]
        for key, value in {**sets, **more}.items():
            args += ["--set", f"{key}={value}"]
        return run_command(args, env=dict(os.environ, RAY_TMPDIR=str(tmp_path / "ray")), timeout=300)

    out = train()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 2/2" in out.stdout and not (tmp_path / "ray").exists()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "make-dist-tiny"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")] == [1, 2]
    assert (tmp_path / "runs/here/model/open_clip_config.json").is_file()
    out = train(**{"train.steps": 3})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from the checkpoint of step 2" in out.stdout and "step 3/3" in out.stdout
    bad = train(**{"train.workers": 2})
    assert bad.returncode == 2 and "train.workers = 2: a run without Ray trains in this process alone" in bad.stderr
    assert not (tmp_path / "ray").exists()


def test_the_run_folder_keeps_ray_trains_checkpoints_and_prunes_its_own_by_step(tmp_path):
    """A run without Ray in a folder a Ray run used: Ray Train's snapshot file
    is no checkpoint, Ray Train's checkpoint folders are never pruned (its
    next run lists them), and its own are pruned by step, so a clock set back
    cannot make the checkpoint just written look old."""
    run_dir = tmp_path / "run"
    ray_own = run_dir / "checkpoint_2026-12-06_10-00-00.000000"
    (ray_own / "state").mkdir(parents=True)
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")
    folder = RunFolder(str(run_dir))
    assert [c.location for c in folder.checkpoints()] == [str(ray_own)]
    written = tmp_path / "written"
    written.mkdir()
    for step in (1, 2, 3):
        (written / "step").write_text(str(step))
        folder.report({"step": step}, str(written))
    names = sorted(p.name for p in run_dir.iterdir())
    assert ray_own.name in names and "checkpoint_manager_snapshot.json" in names
    kept = [c for c in folder.checkpoints() if c.location != str(ray_own)]
    assert sorted(Path(c.location, "step").read_text() for c in kept) == ["2", "3"]
    newest = max(kept, key=lambda c: Path(c.location, "step").read_text())
    newest_path = Path(newest.location)
    newest_path.rename(run_dir / "checkpoint_2000-01-01_00-00-00.000000")  # as if the clock had been set back
    (written / "step").write_text("4")
    folder.report({"step": 4}, str(written))
    steps = sorted(Path(c.location, "step").read_text() for c in folder.checkpoints()
                   if c.location != str(ray_own))
    assert steps == ["3", "4"]
