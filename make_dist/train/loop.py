"""The training loop of one Ray Train worker: setup -> steps -> export.

Everything a step needs is built once in `setup`; `train_worker` composes the
pieces. Ray Train calls it on every worker (through `plan.run_worker`) with
the driver's `WorkerPlan`; after a worker is lost it calls it again on a new group, and
`ray.train.get_checkpoint()` hands back the latest checkpoint every rank
finished writing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import posixpath
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from .. import distributed
from ..config import Config
from ..data.stream import Batch, make_loader
from ..errors import RefusedFile, UserError
from ..evaluate import paper
from ..evaluate.report import COUNTS, log_results
from ..evaluate.tasks import run_task
from ..files import atomic_writer
from ..model import EXPORT_CONFIG, EXPORT_WEIGHTS, MakeModel, build_model, export_open_clip, tokenizer
from ..objective import MakeLoss
from ..progress import say
from ..slots import n_slots
from ..tracking import Run
from . import engine as ds
from .plan import MIDRUN_STEP, WorkerPlan
from .prefetch import prefetch


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Worker:
    """What one worker holds for the whole run."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    engine: object
    model: MakeModel
    loss: MakeLoss
    start_step: int
    nonfinite_total: int
    samples_seen: int = 0  # training samples of every rank so far (what the curves' progress is, beside the step)
    # Steps up to these are in the MLflow run already (a run resumed after a crash replays them):
    logged_through: int = 0  # the step metrics
    evaluated_through: int = 0  # the held-out evaluations (logged after their step's metrics)


def setup(cfg: Config) -> Worker:
    import ray.train

    logging.getLogger().setLevel(logging.WARNING)  # open_clip narrates model building at INFO
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ds.init_distributed(cfg.train.use_gpu)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.train.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, text_batching=cfg.text_batching())
    engine = ds.build_engine(model, cfg, world)
    start, nonfinite, seen = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = resume(engine, checkpoint, rank, device)
        start, nonfinite = state["step"], state.get("nonfinite", 0)
        seen = state.get("samples_seen", start * cfg.data.batch_size * world)  # a checkpoint of an older make-dist
        if rank == 0:
            say(f"make-dist: resumed from the checkpoint of step {start}")
    return Worker(cfg, rank, world, device, engine, model, MakeLoss.from_config(cfg.loss), start, nonfinite, seen)


RESTORED, UNREADABLE, REFUSED = 1, 0, -1  # a rank's outcome of loading a checkpoint; the run takes the lowest


def resume(engine, latest, rank: int, device: torch.device) -> dict:
    """Load the newest checkpoint every rank can read: the latest Ray Train
    kept, else the one before it (a damaged file, say a truncated upload,
    costs the steps between the two, not the run). Every rank reads its
    files first and the ranks agree on the outcome before any loads, so all
    take the same one. A file that holds foreign objects stops the run
    (RefusedFile); a checkpoint that reads but does not fit (another world
    size, another model) stops it with DeepSpeed's error."""
    candidates = [latest, *older_checkpoints(latest)]
    for i, checkpoint in enumerate(candidates):
        where = checkpoint_location(checkpoint)
        with contextlib.ExitStack() as stack:
            outcome, problem, directory = RESTORED, None, ""
            try:
                directory = stack.enter_context(restored(checkpoint))
                ds.verify_checkpoint(directory, rank)
            except RefusedFile as e:  # named by where it is stored, not by this worker's copy
                outcome, problem = REFUSED, RefusedFile(f"resuming from {where}: "
                                                        + str(e).replace(directory, where))
            except Exception as e:  # damaged or missing files, a download that failed
                outcome, problem = UNREADABLE, e
            agreed = distributed.lowest(outcome, device)
            if agreed == RESTORED:
                return ds.load_checkpoint(engine, directory)
            if agreed == REFUSED:
                raise problem if outcome == REFUSED else RuntimeError(f"another rank refused the checkpoint {where}")
            if rank == 0:
                following = (f"resuming from the one before, {checkpoint_location(candidates[i + 1])}"
                             if i + 1 < len(candidates) else "and no older one is kept")
                shown = str(problem).replace(directory or where, where) if outcome == UNREADABLE else None
                say(f"make-dist: the checkpoint {where} could not be read on every rank "
                    f"({shown or 'on another rank'}); {following}")
    raise UserError(f"no checkpoint of this run could be read ({', '.join(map(checkpoint_location, candidates))}): "
                    f"move them away to start the run afresh, or give it another train.name")


def older_checkpoints(latest) -> list:
    """The run's other checkpoints older than `latest`, newest first (Ray
    Train names its checkpoint folders by the time they were made)."""
    import pyarrow.fs
    import ray.train

    parent, name = posixpath.split(latest.path.rstrip("/"))
    found = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
    older = sorted((f.base_name for f in found if f.type == pyarrow.fs.FileType.Directory
                    and f.base_name.startswith("checkpoint_") and f.base_name < name), reverse=True)
    return [ray.train.Checkpoint(f"{parent}/{n}", filesystem=latest.filesystem) for n in older]


def checkpoint_location(checkpoint) -> str:
    """Where a checkpoint is stored, as a user names it (s3://... or a path)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    return f"{checkpoint.filesystem.type_name}://{checkpoint.path}"


@contextlib.contextmanager
def restored(checkpoint) -> Iterator[str]:
    """A local folder holding `checkpoint`, private to this process.

    Not `Checkpoint.as_directory()`: its download folder is shared by the
    node's workers, and a worker that starts late downloads again over files
    another is still reading (ray-project/ray#48726; seen as a torch.load
    "file read failed" when resuming from s3://). A checkpoint on the local
    file system is read in place.
    """
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory(prefix="make-dist-restore-") as directory:
        yield checkpoint.to_directory(directory)


def batches(w: Worker) -> Iterator[Batch]:
    """The rank's batches until the run's last step, each with `rows_per_rank`
    (every rank's batch size, which the loss's gather needs).

    Resampled (the default): shards drawn at random, with a seed from the step
    the run (re)starts at, so a resumed run continues with fresh draws; every
    rank gets the same number of full batches. In order (data.resampled =
    false): each rank reads its share of the shards epoch after epoch; a
    rank's last batch of an epoch may be short, and an epoch ends for every
    rank as soon as one rank runs out.
    """
    cfg = w.cfg
    remaining = cfg.train.steps - w.start_step
    loader = make_loader(
        cfg.data, tokenizer(cfg.model), image_size=w.model.image_size,
        read=w.loss.slots_read(n_slots(cfg.data.subtexts)),  # the CLIP baseline tokenises one text a sample
        rank=w.rank, world=w.world, seed=cfg.train.seed * 100_003 + w.start_step,
        batches_per_worker=math.ceil(remaining / max(1, cfg.data.num_workers)))
    if cfg.data.resampled:  # full batches everywhere: the sizes are known without asking
        full = [cfg.data.batch_size] * w.world
        for batch in loader:
            yield replace(batch, rows_per_rank=full)
        return
    while True:
        produced = 0
        epoch = iter(loader)
        while True:
            batch = next(epoch, None)
            sizes = distributed.batch_sizes(len(batch) if batch is not None else 0, w.device)
            if 0 in sizes:
                break
            produced += 1
            yield replace(batch, rows_per_rank=sizes)
        if produced == 0:
            raise RuntimeError("an epoch of data.train_shards gave no batch on some rank: too few shards "
                               "or samples for data.batch_size on every rank")


def train_step(w: Worker, batch: Batch) -> dict[str, torch.Tensor] | None:
    """One optimiser step on a batch on the device; None when the loss was
    not finite (step skipped).

    The loss is the global batch's on every rank (MakeLoss sums it over
    ranks), so every rank takes the same decision and the collectives stay in
    step.
    """
    out = w.engine(batch.image, batch.tokens, batch.mask, batch.lengths)
    terms = w.loss(out["image"], out["patches"], out["texts"], batch.mask, out["scale"],
                   rows_per_rank=batch.rows_per_rank)
    if not torch.isfinite(terms["total"]).item():
        return None
    w.engine.backward(terms["total"])
    w.engine.step()
    return {**{f"loss/{k}": v.detach() for k, v in terms.items()}, "logit_scale": out["scale"].detach()}


def report(w: Worker, metrics: dict, save: bool) -> None:
    """Report to Ray Train (every rank), with a checkpoint when `save`: this
    rank writes its part of the state, and Ray Train keeps the checkpoint only
    once every rank's part is in storage."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="make-dist-ckpt-") as directory:
        ds.save_checkpoint(w.engine, directory, metrics["step"],
                           {"nonfinite": w.nonfinite_total, "samples_seen": w.samples_seen})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def evaluate(w: Worker, step: int, run: Run | None) -> dict[str, float]:
    """The zero-shot tasks on the held-out tables, and the paper's suite if
    configured, logged to the run at this step; returns their metrics as
    `eval/<task>/<metric>` and `eval/paper/...` (rank 0; {} elsewhere).

    Rank 0 evaluates while the others wait; under ZeRO-3 every rank runs the
    same forward passes inside a parameter gather, and rank 0 logs.
    """
    ev = w.cfg.evaluation
    flat = {}
    if w.rank == 0 or w.cfg.zero3:
        tok = tokenizer(w.cfg.model)
        with ds.full_parameters(w.model, w.cfg):
            results = [run_task(task, w.model, tok, table, ev.images_root, ev.classes, ev.images_anywhere)
                       for task, table in ev.tables().items()]
            suite = (paper.run_suite(w.model, tok, ev.suite_data, ev.concept_terms, say=lambda _: None)
                     if ev.suite else [])
        w.model.train()
        if w.rank == 0:
            summary = "  ".join(f"{r.task} " + " ".join(f"{k} {v:.3f}" for k, v in r.metrics.items()
                                                       if "/" not in k and k not in COUNTS) for r in results)
            summary += "  ".join(f"  paper {k} {v:.3f}" for k, v in paper.averages(suite).items())
            notes = paper.caveats(suite)  # not the paper's protocol to the letter: said beside the numbers
            summary += f" ({'; '.join(notes)})" if notes else ""
            say(f"step {step}: evaluation: {summary.strip()}")
            logged = run is not None and step > w.evaluated_through
            if logged and results:
                log_results(run, results, step)
            if logged and suite:
                paper.log_suite(run, suite, step, prefix="eval/paper")
            flat = {f"eval/{r.task}/{k}": v for r in results for k, v in r.metrics.items() if "/" not in k}
            flat.update(paper.flat_metrics(suite, "eval/paper"))
    distributed.barrier()
    return flat


def export_final(w: Worker, plan: WorkerPlan) -> None:
    """The trained model, open_clip-loadable, at RUN_DIR/model and, unless the
    driver logs it as a Logged Model, in the MLflow run's artifacts (rank 0
    writes both; all ranks gather under ZeRO-3)."""
    with ds.full_parameters(w.model, w.cfg):
        if w.rank != 0:
            return
        with tempfile.TemporaryDirectory() as local:
            export_open_clip(w.model, local)
            for name in (EXPORT_WEIGHTS, EXPORT_CONFIG):  # the config last, as export_open_clip writes them
                with open(f"{local}/{name}", "rb") as src, atomic_writer(f"{plan.run_dir}/model/{name}") as dst:
                    dst.write(src.read())
            if plan.run is not None and plan.log_export:
                plan.run.log_folder(local, "model")


def train_worker(plan: WorkerPlan) -> None:
    """One worker's run (Ray Train calls it through `plan.run_worker`); rank 0
    logs the machine's CPU, memory, disk, network and GPU use to the run
    (MLflow's system metrics, every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s, 10 by default)."""
    w = setup(plan.config)
    run = plan.run if w.rank == 0 else None
    with system_metrics(run, resumed=w.start_step > 0):
        _train(w, plan, run)


@contextlib.contextmanager
def system_metrics(run: Run | None, resumed: bool) -> Iterator[None]:
    if run is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run.id, tracking_uri=run.uri, resume_logging=resumed)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        # and a closing sample: MLflow drops what it sampled since its last interval, so a run
        # shorter than one interval (10 s) would show an empty System metrics tab
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()


def _train(w: Worker, plan: WorkerPlan, run: Run | None) -> None:
    cfg = plan.config
    if run is not None:
        run.set_tags({f"system.{k}": v for k, v in device_facts(w).items()})
        if w.start_step > 0:  # a crash may have come after steps past the checkpoint were logged: log each step once
            w.logged_through, w.evaluated_through = run.last_step("loss/total"), run.last_step("eval/")
    step, nonfinite_run = w.start_step, 0
    if step >= cfg.train.steps:  # resumed a finished run (a sweep trial restarted, say): report, export
        held_out = evaluate(w, step, run) if cfg.evaluation.enabled() else {}
        report(w, {"step": step, **held_out}, save=False)
        export_final(w, plan)
        return
    skipped = torch.zeros(2, dtype=torch.int64)  # samples, shards the loaders skipped so far (this rank)
    wait_start = time.perf_counter()
    for batch in prefetch(batches(w), w.device):
        if step >= cfg.train.steps:
            break
        data_wait = time.perf_counter() - wait_start
        skipped += torch.tensor([batch.skipped_samples, batch.skipped_shards])
        step_start = time.perf_counter()
        result = train_step(w, batch)
        if result is None:
            nonfinite_run += 1
            w.nonfinite_total += 1
            if w.rank == 0:
                say(f"make-dist: step {step + 1}: non-finite loss, step skipped "
                    f"({nonfinite_run} in a row, {w.nonfinite_total} in all)")
            if nonfinite_run >= cfg.train.max_nonfinite:
                raise NonFiniteLoss(f"{nonfinite_run} non-finite losses in a row (train.max_nonfinite = "
                                    f"{cfg.train.max_nonfinite}): lower optim.lr or check the data")
            wait_start = time.perf_counter()
            continue
        nonfinite_run = 0
        step += 1
        step_time = time.perf_counter() - step_start
        samples = sum(batch.rows_per_rank)  # the global batch; short at the end of an epoch read in order
        w.samples_seen += samples
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            log_step(w, run, step, result, {
                "samples_seen": w.samples_seen,
                "samples_per_s": samples / max(step_time + data_wait, 1e-9),
                "data_wait_s": data_wait,
                **dict(zip(("skipped_samples", "skipped_shards"),
                           distributed.sum_detached(skipped.to(w.device)).tolist())),
            })
        every = cfg.evaluation.every_steps
        evaluated = cfg.evaluation.enabled() and bool((every and step % every == 0) or step == cfg.train.steps)
        held_out = evaluate(w, step, run) if evaluated else {}
        save = step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps
        if save or evaluated:  # what Ray Train (and a sweep's scheduler) sees; held-out metrics of this step only
            reported = {"step": step, "loss/total": float(result["loss/total"]), **held_out}
            if step < cfg.train.steps:
                reported[MIDRUN_STEP] = step
            report(w, reported, save)
        wait_start = time.perf_counter()
    if step < cfg.train.steps:
        raise RuntimeError(f"the data stream ended at step {step} of {cfg.train.steps}")
    export_final(w, plan)


def log_step(w: Worker, run: Run | None, step: int, result: dict, timing: dict) -> None:
    """Rank 0: the step's metrics to MLflow and a progress line."""
    if w.rank != 0:
        return
    metrics = {k: float(v) for k, v in result.items()}
    metrics.update(timing, lr=w.engine.get_lr()[0], nonfinite_steps=float(w.nonfinite_total))
    if run is not None and step > w.logged_through:
        run.log_metrics(metrics, step)
    say(f"step {step}/{w.cfg.train.steps}  loss {metrics['loss/total']:.4f}  mkcl {metrics['loss/mkcl']:.4f}  "
        f"slra {metrics['loss/slra']:.4f}  lr {metrics['lr']:.2e}  {metrics['samples_per_s']:.1f} samples/s")


def device_facts(w: Worker) -> dict[str, str]:
    import platform

    import deepspeed

    device = torch.cuda.get_device_name(w.device) if w.device.type == "cuda" else platform.processor() or "cpu"
    return {"device": device, "world_size": str(w.world), "deepspeed": deepspeed.__version__,
            "precision": ds.precision(w.cfg), "zero_stage": str(w.cfg.train.zero_stage),
            "torch_threads": str(torch.get_num_threads())}
