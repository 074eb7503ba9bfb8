"""`make-dist demo`: the whole path on a laptop, with nothing to download.

    synthesise a dermatology set -> write shards -> train the tiny model with
    2 Ray workers under ZeRO-2 on the CPU, tracked in MLflow -> summary
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"


def run_demo(out: str = "demo", n: int = 2000, steps: int = 300, workers: int = 2) -> dict:
    from .data.schema import load_columns
    from .data.shards import write_shards
    from .data.synth import synthesize
    from .train.launch import fit
    from .train.tracking import tracking_uri

    out_dir = Path(out).resolve()
    started = time.time()
    print(f"[1/3] synthesising {n} training images (64 px) in {out_dir}/data")
    synthesize(out_dir / "data", n=n, size=64, seed=0)
    print(f"[2/3] writing shards to {out_dir}/shards")
    manifest = write_shards(str(out_dir / "data/train.csv"), str(out_dir / "shards"),
                            load_columns(ROOT / "configs/columns/synthetic.yaml"),
                            images_root=str(out_dir / "data"), shard_size=max(50, n // 20))
    print(f"[3/3] training the tiny model: {workers} Ray workers, ZeRO-2, CPU, {steps} steps")
    cfg = load_config(CONFIG, [
        f"data.train_shards={out_dir}/shards/manifest.json", f"train.storage={out_dir}/runs",
        f"train.steps={steps}", f"train.workers={workers}", f"train.name=demo-{time.strftime('%Y%m%d-%H%M%S')}",
        f"train.checkpoint_every={max(1, steps // 3)}", "train.log_every=10",
    ])
    result = fit(cfg)
    history = _history(result.tracking_uri, result.run_id)
    first, last = history[0], history[-1]
    minutes = (time.time() - started) / 60
    print()
    print("make-dist demo: done in %.1f minutes" % minutes)
    print(f"  data      {manifest['samples']} samples in {len(manifest['shards'])} shards, "
          f"{len(manifest['skipped'])} skipped")
    print(f"  training  {steps} steps x {workers} workers x batch {cfg.data.batch_size}: "
          f"loss {first[1]:.3f} (step {first[0]}) -> {last[1]:.3f} (step {last[0]})")
    print(f"  model     {result.run_dir}/model (open_clip: create_model_and_transforms('local-dir:...'))")
    print(f"  MLflow    run {result.run_id}: mlflow ui --backend-store-uri {tracking_uri(cfg)}")
    return {"run_dir": result.run_dir, "run_id": result.run_id, "loss_first": first[1], "loss_last": last[1],
            "minutes": minutes}


def _history(uri: str, run_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    points = MlflowClient(uri).get_metric_history(run_id, "loss/total")
    return sorted((m.step, m.value) for m in points)
