"""The trainer: MAKE's training on one rank, under any launcher.

    trainer = Trainer(cfg, rank, world, device, resume_from=[...], reporter=...)
    trainer.fit()            # steps -> evaluations -> checkpoints -> export

It needs a process group (`engine.init_distributed`, or one process of its
own: `engine.init_single_process`) and nothing else: Ray Train runs it on
every worker through a thin adapter (train/ray_worker.py), `make-dist train
--no-ray` in the command's own process, bench/step.py times its `step`, and
the tests drive it directly. What it reads from its launcher: the
checkpoints to resume from, newest first (train/checkpoints.py), and a
reporter that takes each report (metrics, and the folder of a checkpoint
this rank wrote).
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace

import torch

from .. import distributed, overrides
from ..config import Config
from ..data.stream import Batch, make_loader
from ..evaluate.evaluation import Evaluation
from ..files import atomic_writer
from ..model import EXPORT_CONFIG, EXPORT_WEIGHTS, build_model, export_open_clip, tokenizer
from ..objective import MakeLoss
from ..progress import say
from ..slots import n_slots
from ..tracking import Run
from . import engine as ds
from .checkpoints import Reporter, Stored, resume
from .plan import MIDRUN_STEP
from .prefetch import prefetch


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    """One rank's model, engine, loss and progress, and what it does with
    them: `step`, `evaluate`, `save`, `export`, and `fit`, which composes them.

    run: the MLflow run rank 0 logs into (None elsewhere, or to log nothing);
    run_dir: where the trained model is exported (RUN_DIR/model); log_export:
    the export also among the run's artifacts (not when the driver logs it as
    a Logged Model, which holds the weights itself).
    """

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device, *,
                 resume_from: list[Stored] = (), reporter: Reporter | None = None, run: Run | None = None,
                 run_dir: str | None = None, log_export: bool = True):
        logging.getLogger().setLevel(logging.WARNING)  # open_clip narrates model building at INFO
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.reporter, self.run, self.run_dir, self.log_export = reporter, run, run_dir, log_export
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model, text_batching=cfg.text_batching())
        self.engine = ds.build_engine(self.model, cfg, world)
        self.loss = MakeLoss.from_config(cfg.loss)
        self.evaluation = Evaluation.from_config(cfg.evaluation)  # checked by the driver
        self.start_step = self.nonfinite_total = self.samples_seen = 0
        # Steps up to these are in the MLflow run already (a run resumed after a crash replays them):
        self.logged_through = self.evaluated_through = 0  # the step metrics; the held-out evaluations
        if resume_from:
            state = resume(self.engine, list(resume_from), rank, device)
            self.start_step, self.nonfinite_total = state["step"], state.get("nonfinite", 0)
            self.samples_seen = state.get("samples_seen", self.start_step * cfg.data.batch_size * world)
            if rank == 0:
                say(f"make-dist: resumed from the checkpoint of step {self.start_step}")

    # -- the pieces ------------------------------------------------------------

    def batches(self) -> Iterator[Batch]:
        """The rank's batches until the run's last step, each with `rows_per_rank`
        (every rank's batch size, which the loss's gather needs).

        Resampled (the default): shards drawn at random, with a seed from the
        step the run (re)starts at, so a resumed run continues with fresh
        draws; every rank gets the same number of full batches. In order
        (data.resampled = false): each rank reads its share of the shards epoch
        after epoch; a rank's last batch of an epoch may be short, and an epoch
        ends for every rank as soon as one rank runs out.
        """
        cfg = self.cfg
        remaining = cfg.train.steps - self.start_step
        loader = make_loader(
            cfg.data, tokenizer(cfg.model), image_size=self.model.image_size,
            read=self.loss.slots_read(n_slots(cfg.data.subtexts)),  # the CLIP baseline tokenises one text a sample
            rank=self.rank, world=self.world, seed=cfg.train.seed * 100_003 + self.start_step,
            batches_per_worker=math.ceil(remaining / max(1, cfg.data.num_workers)))
        if cfg.data.resampled:  # full batches everywhere: the sizes are known without asking
            full = [cfg.data.batch_size] * self.world
            for batch in loader:
                yield replace(batch, rows_per_rank=full)
            return
        while True:
            produced = 0
            epoch = iter(loader)
            while True:
                batch = next(epoch, None)
                sizes = distributed.batch_sizes(len(batch) if batch is not None else 0, self.device)
                if 0 in sizes:
                    break
                produced += 1
                yield replace(batch, rows_per_rank=sizes)
            if produced == 0:
                raise RuntimeError("an epoch of data.train_shards gave no batch on some rank: too few shards "
                                   "or samples for data.batch_size on every rank")

    def step(self, batch: Batch) -> dict[str, torch.Tensor] | None:
        """One optimiser step on a batch on the device; None when the loss was
        not finite (step skipped).

        The loss is the global batch's on every rank (MakeLoss sums it over
        ranks), so every rank takes the same decision and the collectives stay
        in step.
        """
        out = self.engine(batch.image, batch.tokens, batch.mask, batch.lengths)
        terms = self.loss(out["image"], out["patches"], out["texts"], batch.mask, out["scale"],
                          rows_per_rank=batch.rows_per_rank)
        if not torch.isfinite(terms["total"]).item():
            return None
        self.engine.backward(terms["total"])
        self.engine.step()
        return {**{f"loss/{k}": v.detach() for k, v in terms.items()}, "logit_scale": out["scale"].detach()}

    def save(self, metrics: dict, checkpoint: bool) -> None:
        """Report `metrics` (every rank), with a checkpoint when asked: this
        rank writes its part of the state into a folder of its own and hands
        it to the reporter (Ray Train keeps a checkpoint only once every
        rank's part is in storage)."""
        if self.reporter is None:
            return
        if not checkpoint:
            self.reporter.report(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix="make-dist-ckpt-") as directory:
            ds.save_checkpoint(self.engine, directory, metrics["step"],
                               {"nonfinite": self.nonfinite_total, "samples_seen": self.samples_seen})
            self.reporter.report(metrics, directory)

    def evaluate(self, step: int) -> dict[str, float]:
        """The zero-shot tasks on the held-out tables, and the paper's suite if
        configured, logged to the run at this step; returns their metrics as
        `eval/<task>/<metric>` and `eval/paper/...` (rank 0; {} elsewhere).

        Rank 0 evaluates while the others wait; under ZeRO-3 every rank runs the
        same forward passes inside a parameter gather, and rank 0 logs.
        """
        flat = {}
        if self.rank == 0 or self.cfg.zero3:
            with ds.full_parameters(self.model, self.cfg):
                results = self.evaluation.run(self.model, tokenizer(self.cfg.model), say=None)
            self.model.train()
            if self.rank == 0:
                say(f"step {step}: evaluation: {results.summary()}")
                if self.run is not None and step > self.evaluated_through:
                    results.log(self.run, step, "eval")
                flat = results.flat("eval")
        distributed.barrier()
        return flat

    def export(self) -> None:
        """The trained model, open_clip-loadable, at RUN_DIR/model and, with
        log_export, in the MLflow run's artifacts (rank 0 writes both; all
        ranks gather under ZeRO-3)."""
        with ds.full_parameters(self.model, self.cfg):
            if self.rank != 0 or self.run_dir is None:
                return
            with tempfile.TemporaryDirectory() as local:
                export_open_clip(self.model, local)
                for name in (EXPORT_WEIGHTS, EXPORT_CONFIG):  # the config last, as export_open_clip writes them
                    with open(f"{local}/{name}", "rb") as src, \
                            atomic_writer(f"{self.run_dir}/model/{name}") as dst:
                        dst.write(src.read())
                if self.run is not None and self.log_export:
                    self.run.log_folder(local, "model")

    # -- the run ---------------------------------------------------------------

    def fit(self) -> None:
        """Train to `train.steps`: step, log, evaluate and checkpoint on their
        cadences, export at the end; rank 0 logs the machine's CPU, memory,
        disk, network and GPU use to the run (MLflow's system metrics, every
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s, 10 by default)."""
        with system_metrics(self.run, resumed=self.start_step > 0):
            self._fit()

    def _fit(self) -> None:
        cfg, run = self.cfg, self.run
        if run is not None:
            run.set_tags({f"system.{k}": v for k, v in device_facts(self).items()})
            if self.start_step > 0:  # a crash may have come after steps past the checkpoint were logged
                self.logged_through, self.evaluated_through = run.last_step("loss/total"), run.last_step("eval/")
        step, nonfinite_run = self.start_step, 0
        if step >= cfg.train.steps:  # resumed a finished run (a sweep trial restarted, say): report, export
            held_out = self.evaluate(step) if self.evaluation else {}
            self.save({"step": step, **held_out}, checkpoint=False)
            self.export()
            return
        skipped = torch.zeros(2, dtype=torch.int64)  # samples, shards the loaders skipped so far (this rank)
        wait_start = time.perf_counter()
        for batch in prefetch(self.batches(), self.device):
            if step >= cfg.train.steps:
                break
            data_wait = time.perf_counter() - wait_start
            skipped += torch.tensor([batch.skipped_samples, batch.skipped_shards])
            step_start = time.perf_counter()
            result = self.step(batch)
            if result is None:
                nonfinite_run += 1
                self.nonfinite_total += 1
                if self.rank == 0:
                    say(f"make-dist: step {step + 1}: non-finite loss, step skipped "
                        f"({nonfinite_run} in a row, {self.nonfinite_total} in all)")
                if nonfinite_run >= cfg.train.max_nonfinite:
                    raise NonFiniteLoss(f"{nonfinite_run} non-finite losses in a row (train.max_nonfinite = "
                                        f"{cfg.train.max_nonfinite}): lower optim.lr or check the data")
                wait_start = time.perf_counter()
                continue
            nonfinite_run = 0
            step += 1
            step_time = time.perf_counter() - step_start
            samples = sum(batch.rows_per_rank)  # the global batch; short at the end of an epoch read in order
            self.samples_seen += samples
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                self.log_step(step, result, {
                    "samples_seen": self.samples_seen,
                    "samples_per_s": samples / max(step_time + data_wait, 1e-9),
                    "data_wait_s": data_wait,
                    **dict(zip(("skipped_samples", "skipped_shards"),
                               distributed.sum_detached(skipped.to(self.device)).tolist())),
                })
            every = cfg.evaluation.every_steps
            evaluated = bool(self.evaluation) and bool((every and step % every == 0) or step == cfg.train.steps)
            held_out = self.evaluate(step) if evaluated else {}
            checkpoint = step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps
            if checkpoint or evaluated:  # what the launcher (and a sweep's scheduler) sees; this step's only
                reported = {"step": step, "loss/total": float(result["loss/total"]), **held_out}
                if step < cfg.train.steps:
                    reported[MIDRUN_STEP] = step
                self.save(reported, checkpoint)
            wait_start = time.perf_counter()
        if step < cfg.train.steps:
            raise RuntimeError(f"the data stream ended at step {step} of {cfg.train.steps}")
        self.export()

    def log_step(self, step: int, result: dict, timing: dict) -> None:
        """Rank 0: the step's metrics to MLflow and a progress line."""
        if self.rank != 0:
            return
        metrics = {k: float(v) for k, v in result.items()}
        metrics.update(timing, lr=self.engine.get_lr()[0], nonfinite_steps=float(self.nonfinite_total))
        if self.run is not None and step > self.logged_through:
            self.run.log_metrics(metrics, step)
        say(f"step {step}/{self.cfg.train.steps}  loss {metrics['loss/total']:.4f}  mkcl {metrics['loss/mkcl']:.4f}  "
            f"slra {metrics['loss/slra']:.4f}  lr {metrics['lr']:.2e}  {metrics['samples_per_s']:.1f} samples/s")


@contextlib.contextmanager
def system_metrics(run: Run | None, resumed: bool) -> Iterator[None]:
    if run is None:
        yield
        return
    monitor = overrides.mlflow_system_metrics(run.id, run.uri, resumed)
    try:
        yield
    finally:
        overrides.mlflow_system_metrics_stop(monitor)  # with a closing sample


def device_facts(trainer: Trainer) -> dict[str, str]:
    import platform

    import deepspeed

    device = (torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda"
              else platform.processor() or "cpu")
    return {"device": device, "world_size": str(trainer.world), "deepspeed": deepspeed.__version__,
            "precision": ds.precision(trainer.cfg), "zero_stage": str(trainer.cfg.train.zero_stage),
            "torch_threads": str(torch.get_num_threads())}
