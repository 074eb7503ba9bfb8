"""The driver: check the config, open the MLflow run, start (or join) Ray, fit.

Under `ray job submit --address ...` RAY_ADDRESS is set and the job joins
that cluster; run directly, it starts an embedded local Ray bound to
127.0.0.1, its dashboard too (a dashboard runs whatever is submitted to it).
Rerunning the same `train.name` in the same `train.storage` resumes the run
from its latest checkpoint.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import fsspec

from ..config import Config
from ..data.shards import MANIFEST, read_manifest
from ..data.stream import shard_urls
from ..errors import UserError
from .tracking import RunTracker, tracking_uri


@dataclass
class FitResult:
    run_dir: str
    run_id: str
    tracking_uri: str
    metrics: dict


def absolute(url: str) -> str:
    """Local paths made absolute (Ray workers do not share the driver's cwd)."""
    return url if "://" in url or url.startswith("pipe:") else os.path.abspath(url)


def check(cfg: Config) -> Config:
    """Everything that can be checked before Ray starts; paths made absolute."""
    if not cfg.data.train_shards:
        raise UserError("data.train_shards is not set: point it at shards (a manifest.json, a brace "
                        "pattern or a URL), e.g. written by `make-dist shards`")
    ev = cfg.evaluation
    cfg = replace(cfg, data=replace(cfg.data, train_shards=absolute(cfg.data.train_shards)),
                  train=replace(cfg.train, storage=absolute(cfg.train.storage)),
                  tracking=replace(cfg.tracking, uri=tracking_uri(cfg)),  # the driver's store, for every process
                  evaluation=replace(ev, **{k: absolute(getattr(ev, k)) for k in
                                            ("classify_table", "classes", "concepts_table", "retrieval_table",
                                             "images_root") if getattr(ev, k)}))
    for key in ("classify_table", "classes", "concepts_table", "retrieval_table"):
        path = getattr(cfg.evaluation, key)
        if path and not _exists(path):
            raise UserError(f"evaluation.{key}: {path} does not exist")
    urls = shard_urls(cfg.data.train_shards, cfg.data.allow_pipe)
    if not urls[0].startswith("pipe:") and not _exists(urls[0]):
        raise UserError(f"data.train_shards: {urls[0]} does not exist")
    cfg = with_shards_manifest(cfg)
    if cfg.train.use_gpu and cfg.train.zero_stage == 0 and cfg.train.precision == "fp16":
        raise UserError("train.precision = fp16 needs a ZeRO stage >= 1 with DeepSpeed's loss scaling")
    return cfg


def with_shards_manifest(cfg: Config) -> Config:
    """What the shards' manifest decides: train.steps from train.epochs, and
    whether the shards hold the K sentences data.subtexts asks for."""
    shards = cfg.data.train_shards
    manifest = read_manifest(shards) if shards and shards.endswith(MANIFEST) else None
    if manifest is None:
        if cfg.train.epochs is not None:
            raise UserError(f"train.epochs = {cfg.train.epochs}: needs data.train_shards to name a {MANIFEST} "
                            f"(written by `make-dist shards`), which counts the samples; got {shards!r}. "
                            f"Set train.steps instead.")
        return cfg
    written_k = manifest.get("subtexts")
    if written_k is not None and written_k < cfg.data.subtexts:
        raise UserError(f"data.subtexts = {cfg.data.subtexts}, but the shards at {shards} were written with "
                        f"--subtexts {written_k}: their captions keep at most {written_k} sentences. Set "
                        f"data.subtexts={written_k}, or write the shards again with --subtexts {cfg.data.subtexts}.")
    if cfg.train.epochs is None:
        return cfg
    samples = int(manifest.get("samples") or 0)
    if samples <= 0:
        raise UserError(f"train.epochs: the manifest {shards} counts no samples")
    steps = steps_for_epochs(cfg.train.epochs, samples, cfg.data.batch_size * cfg.train.workers)
    return replace(cfg, train=replace(cfg.train, steps=steps))


def steps_for_epochs(epochs: float, samples: int, global_batch: int) -> int:
    """Optimiser steps of `epochs` passes over `samples` at `global_batch` a step (the last one may be short)."""
    return max(1, math.ceil(epochs * samples / global_batch - 1e-9))  # 1e-9: float noise of an exact division


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # a cluster (ray job submit or an exported address)
    else:
        # The dashboard serves Ray's state API, which Ray Train polls; it listens on 127.0.0.1 only.
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1")


def fit(cfg: Config, *, parent_run_id: str | None = None, callbacks: list | None = None,
        params: dict | None = None) -> FitResult:
    """Train. A sweep's trial passes its parent MLflow run, Tune's report
    callback and the sampled parameters (logged beside the config)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from .loop import train_worker

    cfg = check(cfg)
    run_dir = f"{cfg.train.storage}/{cfg.train.name}"
    tracker = RunTracker(cfg, run_dir, parent_run_id=parent_run_id,
                         params={**cfg.flat(), **{f"trial.{k}": v for k, v in (params or {}).items()}})
    print(f"make-dist: MLflow run {tracker.run_id} at {tracker.uri}")
    if tracker.uri.startswith("sqlite:"):
        print(f"make-dist: see it with  mlflow ui --backend-store-uri {tracker.uri}")
    init_ray()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "run_id": tracker.run_id, "tracking_uri": tracker.uri,
                           "run_dir": run_dir},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker=_resources(cfg)),
        run_config=ray.train.RunConfig(
            name=cfg.train.name,
            storage_path=cfg.train.storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracker.finish(ok=False)
        raise
    tracker.finish(ok=True)
    metrics = dict(result.metrics or {})
    return FitResult(run_dir, tracker.run_id, tracker.uri, metrics)


def _resources(cfg: Config) -> dict:
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    return resources
