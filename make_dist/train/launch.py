"""The driver: check the config, start (or join) Ray (train/cluster.py),
open the MLflow run, fit.

Rerunning the same `train.name` in the same `train.storage` resumes the run
from its latest checkpoint.
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, replace

from ..config import Config
from ..data.shards import with_shards_manifest
from ..data.stream import shard_urls
from ..errors import Interrupted, UserError
from ..evaluate.evaluation import Evaluation
from ..files import check_writable, missing_files, within
from ..lease import Lease
from ..progress import StepBar
from ..tracking import RAY_JOB_TAG, Run, log_curves, open_run, tracking_uri
from .cluster import init_ray, ray_job, ray_logs
from .plan import WorkerPlan


@dataclass
class FitResult:
    run_dir: str  # checkpoints and the exported model (RUN_DIR/model)
    run: Run  # the MLflow run
    metrics: dict  # the last report (step, loss, held-out metrics)


def absolute(url: str | list[str]) -> str | list[str]:
    """Local paths made absolute (Ray workers do not share the driver's cwd)."""
    if isinstance(url, list):
        return [absolute(u) for u in url]
    return url if "://" in url or url.startswith("pipe:") else os.path.abspath(url)


def check(cfg: Config) -> Config:
    """Everything that can be checked before Ray starts; paths made absolute."""
    if not cfg.data.train_shards:
        raise UserError("data.train_shards is not set: point it at shards (a manifest.json, a brace "
                        "pattern or a URL), e.g. written by `make-dist shards`")
    written = {"train.storage": cfg.train.storage, "tracking.uri": cfg.tracking.uri}  # as the user gave them
    ev = cfg.evaluation
    if ev.tables() and not ev.images_root:  # relative image paths mean the driver's folder, on every worker too
        ev = replace(ev, images_root=os.getcwd())
    cfg = replace(cfg, data=replace(cfg.data, train_shards=absolute(cfg.data.train_shards)),
                  train=replace(cfg.train, storage=absolute(cfg.train.storage)),
                  tracking=replace(cfg.tracking, uri=tracking_uri(cfg.tracking.uri)),  # the driver's store, for all
                  evaluation=replace(ev, **{k: absolute(getattr(ev, k)) for k in
                                            ("classify_table", "classes", "concepts_table", "retrieval_table",
                                             "images_root", "suite_data", "concept_terms") if getattr(ev, k)}))
    checked = Evaluation.from_config(cfg.evaluation).check()  # the suite's terms resolved for every worker
    cfg = replace(cfg, evaluation=replace(cfg.evaluation, concept_terms=checked.concept_terms))
    urls = shard_urls(cfg.data.train_shards, cfg.data.allow_pipe)
    missing = missing_files([u for u in urls if not u.startswith("pipe:")], "data.train_shards")
    if missing:  # found now, not by a loader worker mid-run (or never, when shards are drawn at random)
        raise UserError(f"data.train_shards: {len(missing)} of its {len(urls)} shards do not exist: "
                        f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    cfg = with_shards_manifest(cfg)
    outside_ray_jobs_copy("train.storage", written["train.storage"], cfg.train.storage)
    outside_ray_jobs_copy("tracking.uri", written["tracking.uri"], cfg.tracking.uri)
    check_tracking(cfg.tracking.uri)
    check_writable(cfg.train.storage, "train.storage")
    if cfg.train.use_gpu and cfg.train.zero_stage == 0 and cfg.train.precision == "fp16":
        raise UserError("train.precision = fp16 needs a ZeRO stage >= 1 with DeepSpeed's loss scaling")
    return cfg


def outside_ray_jobs_copy(key: str, given: str | None, resolved: str) -> None:
    """Under `ray job submit --working-dir`, the job runs in Ray's copy of
    that folder, deleted with the Ray session: a run's checkpoints or MLflow
    store written there (a relative path, or the default store) would be
    lost once the run ends. Refused before any worker starts."""
    _, copy = ray_job()
    path = resolved.removeprefix("sqlite:///")
    if copy is None or "://" in path or not within(path, copy):
        return
    said = f"{key} = {given}" if given else f"{key} is not set"
    raise UserError(f"{said}: this job runs in Ray's copy of its working directory ({copy}), deleted with the Ray "
                    f"session, so {resolved} would be lost; give {key} an absolute path on storage that lasts, or a "
                    f"URL ({'an MLflow server, http://HOST:PORT' if key == 'tracking.uri' else 's3://BUCKET/PATH'})")


def check_tracking(uri: str) -> None:
    """The MLflow store can take the run, checked in seconds before Ray
    starts: a server answers its API (not only its health check: a server
    whose store is down answers /health and 503 elsewhere, and MLflow's client
    would retry for minutes), a SQLite file takes a write, any other store opens."""
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        for url in (f"{base}/health", f"{base}/api/2.0/mlflow/experiments/search?max_results=1"):
            try:
                urllib.request.urlopen(url, timeout=10)
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):
                    return  # it answers: authentication is for MLflow's own client to handle
                raise UserError(f"tracking.uri = {uri}: the MLflow server answers {url.removeprefix(base)} with "
                                f"HTTP {e.code} ({e.reason}); check the server (its log, its backend store) or point "
                                f"tracking.uri at one that works") from None
            except OSError as e:
                raise UserError(f"tracking.uri = {uri}: no MLflow server answers ({getattr(e, 'reason', e)}); "
                                f"start one (mlflow server ...) or point tracking.uri at one that runs") from None
    elif uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        folder = os.path.dirname(path) or "."
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise UserError(f"tracking.uri = {uri}: cannot write in {folder} ({e.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise UserError(f"tracking.uri = {uri}: cannot write in {folder}")
        if os.path.exists(path):
            _check_sqlite_writable(uri, path)
    else:  # MLflow's file store (file:, a folder), databricks, ...: open it as the run will
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as e:
            first = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else type(e).__name__
            hint = (" (MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE=true: use "
                    "sqlite:///PATH/mlflow.db)" if "://" not in uri or uri.startswith("file:") else "")
            raise UserError(f"tracking.uri = {uri}: MLflow cannot use this store: {first}{hint}") from None


def _check_sqlite_writable(uri: str, path: str) -> None:
    """A write, rolled back: a read-only file (its mode, a read-only mount, an
    immutable flag) fails here, not in a worker. (Taking the write lock alone
    succeeds on a read-only file.)"""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("CREATE TABLE make_dist_write_probe (x)")
            finally:
                db.execute("ROLLBACK")
    except sqlite3.Error as e:
        raise UserError(f"tracking.uri = {uri}: MLflow cannot write this store ({e})") from None


def fit(cfg: Config, *, parent: Run | None = None, callbacks: list | None = None,
        params: dict | None = None, quiet: bool = False, tags: dict | None = None, ray: bool = True) -> FitResult:
    """Train: check -> the run folder's lease -> Ray -> MLflow run -> Ray
    Train's fit -> curves and status. A sweep's trial passes its parent MLflow
    run, Tune's report callback and the sampled parameters (logged beside the
    config). quiet: a step bar on the terminal instead of the workers' lines
    (those go to Ray's logs). tags: on the MLflow run (the demo nests its
    arms under its own run so). ray=False: the Trainer in this process, one
    worker, no Ray at all (`make-dist train --no-ray`)."""
    cfg = check(cfg)
    run_dir = f"{cfg.train.storage}/{cfg.train.name}"
    # Another run that takes the folder over (this driver seemed dead to it) stops this one: Ctrl-C's path.
    # Only a command's main thread can be stopped so; a sweep's trial says so and goes on.
    in_main = threading.current_thread() is threading.main_thread()
    lease = Lease(run_dir, "make-dist training run", rename="give this run another train.name",
                  on_lost=(lambda reason: _thread.interrupt_main()) if in_main else None)
    if not ray and cfg.train.workers != 1:
        raise UserError(f"train.workers = {cfg.train.workers}: a run without Ray trains in this process alone "
                        f"(one worker); set train.workers=1 or leave out --no-ray")
    with lease:
        try:
            if not ray:
                return _fit_here(cfg, run_dir, parent, params, tags)
            return _fit(cfg, run_dir, parent, callbacks, params, quiet, tags)
        except Interrupted:
            if lease.lost:
                raise UserError(f"stopped: {run_dir} was {lease.lost}; two runs must not share a folder, so this "
                                f"one stopped (its checkpoints so far are there)") from None
            raise


def _open(cfg: Config, run_dir: str, parent: Run | None, params: dict | None, tags: dict | None,
          quiet: bool) -> Run:
    run = open_run(cfg, run_dir, parent=parent,
                   params={**cfg.flat(), **{f"trial.{k}": v for k, v in (params or {}).items()}}, tags=tags)
    if not quiet:
        print(f"make-dist: MLflow run {run.id} at {run.uri}")
        if run.uri.startswith("sqlite:"):
            print(f"make-dist: see it with  mlflow ui --backend-store-uri {run.uri}")
    return run


def _fit_here(cfg: Config, run_dir: str, parent: Run | None, params: dict | None, tags: dict | None) -> FitResult:
    """The Trainer in this process: a process group of one, the run folder's
    checkpoints (train/checkpoints.RunFolder), the same MLflow run and export."""
    import torch

    from . import engine
    from .checkpoints import RunFolder
    from .trainer import Trainer

    run = _open(cfg, run_dir, parent, params, tags, quiet=False)
    logged_model = cfg.tracking.log_model and parent is None
    with _marked(run, parent, run_dir):
        engine.init_single_process(cfg.train.use_gpu)
        device = torch.device("cuda", torch.cuda.current_device()) if cfg.train.use_gpu else torch.device("cpu")
        folder = RunFolder(run_dir)
        Trainer(cfg, 0, 1, device, resume_from=folder.checkpoints(), reporter=folder, run=run, run_dir=run_dir,
                log_export=not logged_model).fit()
    return _finish(cfg, run, run_dir, folder.metrics, logged_model, quiet=False)


@contextlib.contextmanager
def _marked(run: Run, parent: Run | None, run_dir: str):
    """The MLflow run's status when the fit does not end: KILLED on Ctrl-C or
    SIGTERM (Ray's handler exits), with how to resume; FAILED otherwise (a
    sweep's trial is marked by its sweep: a trial its scheduler stops fails here too)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        run.finish("KILLED")
        raise Interrupted(f"stopped: the checkpoints written so far are in {run_dir}; run the same command "
                          f"again to resume from the last one") from None
    except BaseException:
        if parent is None:
            run.finish("FAILED")
        raise


def _fit(cfg: Config, run_dir: str, parent: Run | None, callbacks: list | None, params: dict | None,
         quiet: bool, tags: dict | None) -> FitResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    from .ray_worker import run_worker

    init_ray(quiet)  # before the MLflow run: a cluster that cannot run workers leaves no run behind
    job, _ = ray_job()
    run = _open(cfg, run_dir, parent, params, {**(tags or {}), **({RAY_JOB_TAG: job} if job else {})}, quiet)
    logged_model = cfg.tracking.log_model and parent is None  # a sweep's trials leave their exports in storage only
    trainer = TorchTrainer(
        functools.partial(run_worker, WorkerPlan(cfg, run_dir, run, log_export=not logged_model)),
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
    with _marked(run, parent, run_dir):
        try:
            with StepBar(run, cfg.train.steps, f"  {cfg.train.name}") if quiet else contextlib.nullcontext():
                result = trainer.fit()
        except Exception as e:
            said = workers_user_error(e)
            if said is not None:  # a worker's own words (data that makes no batch, a refused checkpoint): one line
                raise UserError(f"{said} (MLflow run {run.id}; Ray's logs: {ray_logs()})") from None
            raise
    return _finish(cfg, run, run_dir, dict(result.metrics or {}), logged_model, quiet)


def _finish(cfg: Config, run: Run, run_dir: str, metrics: dict, logged_model: bool, quiet: bool) -> FitResult:
    """The run's curves as plots, its model logged (and registered), its status."""
    log_curves(run, cfg.train.name)
    if logged_model:
        from ..serving import log_model  # mlflow.pyfunc takes seconds to import: only where a model is logged

        model_uri = log_model(run, f"{run_dir}/model", cfg.tracking.register,
                              {k: v for k, v in metrics.items() if k.startswith("eval/")}, int(metrics.get("step", 0)),
                              name=cfg.objective())
        if not quiet:
            print(f"make-dist: model logged as {model_uri}"
                  + (f", registered as {cfg.tracking.register}" if cfg.tracking.register else ""))
    run.finish("FINISHED")
    return FitResult(run_dir, run, metrics)


def workers_user_error(e: BaseException) -> str | None:
    """The message of a UserError a worker raised, if Ray Train's error carries one."""
    failures = getattr(e, "worker_failures", None) or {}
    for rank in sorted(failures):
        failure = failures[rank]
        cause = getattr(failure, "cause", None) or failure  # a RayTaskError wraps what the worker raised
        if isinstance(cause, UserError):
            return str(cause.args[0]) if cause.args else str(cause)
    return None


def _resources(cfg: Config) -> dict:
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    return resources
