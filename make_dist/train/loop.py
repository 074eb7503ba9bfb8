"""The training loop of one Ray Train worker: setup -> steps -> export.

Everything a step needs is built once in `setup`; `train_worker` composes the
pieces. Ray Train calls `train_worker` on every worker; after a worker is lost
it calls it again on a new group, and `ray.train.get_checkpoint()` hands back
the latest checkpoint every rank finished writing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..config import Config, from_dict
from ..data.stream import StreamConfig, make_loader, shard_urls
from ..model import MakeModel, build_model, export_open_clip, token_lengths, tokenizer
from ..objective import batch_sizes, make_loss, slots_read
from . import engine as ds
from .prefetch import prefetch
from .tracking import StepLogger

LOSS_KEYS = ("total", "mkcl", "i2t", "t2i", "slra")


class NonFiniteLoss(RuntimeError):
    pass


def say(message: str) -> None:
    """A progress line (sys.stdout: Ray Train's patched print would log it twice)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


@dataclass
class Worker:
    """What one worker holds for the whole run."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    engine: object
    model: MakeModel
    start_step: int
    nonfinite_total: int


def setup(cfg: Config) -> Worker:
    import ray.train

    logging.getLogger().setLevel(logging.WARNING)  # open_clip narrates model building at INFO
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ds.init_distributed(cfg.train.use_gpu)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.train.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg.model)
    engine = ds.build_engine(model, cfg, world)
    start, nonfinite = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = ds.load_checkpoint(engine, directory)
        start, nonfinite = state["step"], state.get("nonfinite", 0)
        if rank == 0:
            say(f"make-dist: resumed from the checkpoint of step {start}")
    return Worker(cfg, rank, world, device, engine, model, start, nonfinite)


def batches(w: Worker):
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
    loader_workers = max(1, cfg.data.num_workers)
    remaining = cfg.train.steps - w.start_step
    stream = StreamConfig(
        urls=shard_urls(cfg.data.train_shards, cfg.data.allow_pipe),
        batch_size=cfg.data.batch_size,
        image_size=w.model.image_size,
        k=cfg.data.subtexts,
        train=cfg.data.augment,
        resampled=cfg.data.resampled,
        batches_per_worker=math.ceil(remaining / loader_workers),
        num_workers=cfg.data.num_workers,
        rank=w.rank,
        world=w.world,
        seed=cfg.train.seed * 100_003 + w.start_step,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )
    tok = tokenizer(cfg.model)
    if cfg.data.resampled:  # full batches everywhere: the sizes are known without asking
        full = [cfg.data.batch_size] * w.world
        for batch in make_loader(stream, tok):
            yield {**batch, "rows_per_rank": full}
        return
    while True:
        produced = 0
        epoch = iter(make_loader(stream, tok))
        while True:
            batch = next(epoch, None)
            sizes = batch_sizes(len(batch["keys"]) if batch is not None else 0, w.device, w.world)
            if 0 in sizes:
                break
            produced += 1
            yield {**batch, "rows_per_rank": sizes}
        if produced == 0:
            raise RuntimeError("an epoch of data.train_shards gave no batch on some rank: too few shards "
                               "or samples for data.batch_size on every rank")


def step_inputs(w: Worker, batch: dict) -> dict:
    """The host batch as the step reads it: the mask narrowed to the slots the
    loss reads under its switches (the CLIP baseline encodes the caption
    alone), and every encoded text's real length, which groups the texts by
    length without reading anything back from the device."""
    mask = batch["mask"] & slots_read(batch["mask"].shape[1], **w.cfg.loss.switches())
    return {**batch, "mask": mask, "lengths": token_lengths(batch["tokens"]) * mask}


def device_batches(w: Worker, host_batches) -> Iterator[dict]:
    """The step's inputs on the device, the next batch copied during this step."""
    return prefetch((step_inputs(w, b) for b in host_batches), w.device)


def train_step(w: Worker, batch: dict) -> dict[str, torch.Tensor] | None:
    """One optimiser step on a batch from `device_batches`; None when the loss
    was not finite (step skipped).

    The loss is the global batch's on every rank (make_loss all-reduces it),
    so every rank takes the same decision and the collectives stay in step.
    """
    cfg, engine = w.cfg, w.engine
    out = engine(batch["image"], batch["tokens"], batch["mask"], batch["lengths"])
    terms = make_loss(out["image"], out["patches"], out["texts"], batch["mask"], out["scale"], lam=cfg.loss.lam,
                      sigma=cfg.loss.sigma, backend=cfg.loss.backend, rows_per_rank=batch.get("rows_per_rank"),
                      **cfg.loss.switches())
    if not torch.isfinite(terms["total"]).item():
        return None
    engine.backward(terms["total"])
    engine.step()
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
        ds.save_checkpoint(w.engine, directory, metrics["step"], {"nonfinite": w.nonfinite_total})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def full_parameters(w: Worker):
    """Under ZeRO-3 each rank holds a shard of every parameter: gather them all
    (every rank enters together). A no-op for the other stages."""
    if w.cfg.train.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(w.model.parameters()))


def evaluate(w: Worker, step: int, loop_config: dict) -> dict[str, float]:
    """The zero-shot tasks on the held-out tables, logged to the run at this
    step; returns their metrics as `eval/<task>/<metric>` (rank 0; {} elsewhere).

    Rank 0 evaluates while the others wait; under ZeRO-3 the parameters are
    sharded, so every rank runs the same forward passes and rank 0 logs.
    """
    from ..evaluate.report import log_mlflow
    from ..evaluate.tasks import run_task

    ev, zero3 = w.cfg.evaluation, w.cfg.train.zero_stage == 3
    flat = {}
    if w.rank == 0 or zero3:
        with full_parameters(w):
            results = [run_task(task, w.model, tokenizer(w.cfg.model), table, ev.images_root, ev.classes)
                       for task, table in ev.tables().items()]
        w.model.train()
        if w.rank == 0:
            summary = "  ".join(f"{r.task} " + " ".join(f"{k} {v:.3f}" for k, v in r.metrics.items()
                                                       if "/" not in k and k != "chance_top1") for r in results)
            say(f"step {step}: evaluation: {summary}")
            if loop_config.get("run_id"):
                log_mlflow(results, loop_config["tracking_uri"], loop_config["run_id"], step=step)
            flat = {f"eval/{r.task}/{k}": v for r in results for k, v in r.metrics.items() if "/" not in k}
    if w.world > 1:
        torch.distributed.barrier()
    return flat


def export_final(w: Worker, run_dir: str) -> None:
    """The trained model, open_clip-loadable, at RUN_DIR/model (rank 0 writes)."""
    import fsspec

    with full_parameters(w):
        if w.rank == 0:
            with tempfile.TemporaryDirectory() as local:
                export_open_clip(w.model, local)
                fs, root = fsspec.core.url_to_fs(f"{run_dir}/model")
                fs.makedirs(root, exist_ok=True)
                for name in os.listdir(local):
                    fs.put_file(os.path.join(local, name), f"{root}/{name}")


def train_worker(loop_config: dict) -> None:
    """Ray Train's entry point on every worker."""
    cfg = from_dict(loop_config["config"], source="<driver>")
    w = setup(cfg)
    log = StepLogger(loop_config.get("tracking_uri"), loop_config.get("run_id")) if w.rank == 0 else None
    if log is not None:
        log.facts(device_facts(w))
    step, nonfinite_run, last_eval = w.start_step, 0, {}
    if step >= cfg.train.steps:  # resumed a finished run (a sweep trial restarted, say): report, export
        if cfg.evaluation.tables():
            last_eval = evaluate(w, step, loop_config)
        report(w, {"step": step, **last_eval}, save=False)
        export_final(w, loop_config["run_dir"])
        return
    skipped = torch.zeros((), dtype=torch.long)
    wait_start = time.perf_counter()
    for batch in device_batches(w, batches(w)):
        if step >= cfg.train.steps:
            break
        data_wait = time.perf_counter() - wait_start
        skipped += batch["skipped"]
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
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            samples = sum(batch["rows_per_rank"])
            log_step(w, log, step, result, {
                "samples": samples,  # the global batch; short at the end of an epoch read in order
                "samples_per_s": samples / max(step_time + data_wait, 1e-9),
                "data_wait_s": data_wait,
                "skipped_samples": _sum_over_ranks(skipped, w),
            })
        every = cfg.evaluation.every_steps
        evaluated = bool(cfg.evaluation.tables()) and ((every and step % every == 0) or step == cfg.train.steps)
        if evaluated:
            last_eval = evaluate(w, step, loop_config)
        save = step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps
        if save or evaluated:  # what Ray Train (and a sweep's scheduler) sees
            report(w, {"step": step, "loss/total": float(result["loss/total"]), **last_eval}, save)
        wait_start = time.perf_counter()
    if step < cfg.train.steps:
        raise RuntimeError(f"the data stream ended at step {step} of {cfg.train.steps}")
    export_final(w, loop_config["run_dir"])


def log_step(w: Worker, log: StepLogger | None, step: int, result: dict, timing: dict) -> None:
    """Rank 0: the step's metrics to MLflow and a progress line."""
    if log is None:
        return
    metrics = {k: float(v) for k, v in result.items()}
    metrics.update(timing, lr=w.engine.get_lr()[0], nonfinite_steps=float(w.nonfinite_total))
    log.log(step, metrics)
    say(f"step {step}/{w.cfg.train.steps}  loss {metrics['loss/total']:.4f}  mkcl {metrics['loss/mkcl']:.4f}  "
        f"slra {metrics['loss/slra']:.4f}  lr {metrics['lr']:.2e}  {metrics['samples_per_s']:.1f} samples/s")


def device_facts(w: Worker) -> dict[str, str]:
    import platform

    import deepspeed

    device = torch.cuda.get_device_name(w.device) if w.device.type == "cuda" else platform.processor() or "cpu"
    return {"device": device, "world_size": str(w.world), "deepspeed": deepspeed.__version__,
            "precision": ds.precision(w.cfg), "zero_stage": str(w.cfg.train.zero_stage),
            "torch_threads": str(torch.get_num_threads())}


def _sum_over_ranks(count: torch.Tensor, w: Worker) -> float:
    if w.world > 1:
        count = count.to(w.device)
        torch.distributed.all_reduce(count)
    return float(count)
