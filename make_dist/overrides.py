"""Every place make-dist reaches into another library's private code: a
function it patches, a private attribute or option it reads, an internal
setting it sets, a forward it re-implements.

Each entry says what it does, why, and the library versions its assumptions
were checked against (`CHECKED`, the versions pyproject.toml pins);
tests/test_overrides.py checks each assumption and fails naming the library,
the installed and the checked version and the entry when an upgrade changes
what an entry patches or reads. After an upgrade: rerun those tests, re-read
each entry they name against the new version, then update its CHECKED.

A floor of its own: it imports no make-dist module, and the libraries only
inside the entries (they are heavy, and most commands need one or two).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn

ENTRIES: list[Callable] = []  # every override, in the order below


def checked(versions: dict[str, str]):
    """Mark an override with the versions (distribution name -> version) it
    was checked against: read back as `entry.CHECKED`."""
    def mark(entry):
        entry.CHECKED = dict(versions)
        ENTRIES.append(entry)
        return entry
    return mark


# ---------------------------------------------------------------------------
# open_clip


@checked({"open_clip_torch": "3.3.0"})
def open_clip_text_forward(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The text embeddings (T, D), not normalised, of token rows (T, L) cut to
    any L <= the context: open_clip's `CLIP.encode_text` with the positional
    embedding and the causal mask cut to L.

    Why: make-dist encodes each text cut near its real length (model.py's
    buckets); open_clip's own forward always runs the full 77 positions.
    Causal attention and end-of-text pooling make the cut exact. Reads the
    CLIP's text parts (token_embedding, positional_embedding, transformer,
    attn_mask, ln_final, text_pool_type, text_eos_id, text_projection) and
    calls `open_clip.transformer.text_global_pool`, which open_clip does not
    export. Checked: equal to `CLIP.encode_text` on full-length tokens."""
    import open_clip
    from torch import nn

    L = tokens.shape[1]
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:L].to(cast)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:L, :L])
    x = clip.ln_final(x)
    x = open_clip.transformer.text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=clip.text_eos_id)
    if isinstance(clip.text_projection, nn.Linear):
        x = clip.text_projection(x)
    elif clip.text_projection is not None:
        x = x @ clip.text_projection
    return x


@checked({"open_clip_torch": "3.3.0"})
def open_clip_image_forward(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (B, D), patch tokens (B, P, D)), neither normalised, of a
    `VisionTransformer` built or set with `output_tokens = True`: the patch
    tokens after the same final norm as the pooled token, projected by the
    same `proj`.

    Why: MAKE pools patch tokens in the embedding space; open_clip returns
    them un-projected and, with `final_ln_after_pool`, un-normed (its private
    `_pool` decides which). Checked: the tokens are `ln_post` of the
    transformer's output after the class token, the pooled output is
    `CLIP.encode_image`'s."""
    pooled, tokens = visual(images)
    if visual.final_ln_after_pool:  # tokens left un-normed by that variant
        tokens = visual.ln_post(tokens)
    return pooled, tokens @ visual.proj


# ---------------------------------------------------------------------------
# DeepSpeed


def _no_shm_op():
    return None


@checked({"deepspeed": "0.19.8"})
def deepspeed_without_shm_extension() -> None:
    """Keep DeepSpeed from building its shared-memory comm extension: its
    torch backend calls the module function `deepspeed.comm.torch.build_shm_op`
    when the process group starts, which JIT-compiles C++ for minutes on a
    CPU machine (docs/traps.md); replaced by one that returns None (no
    extension: DeepSpeed's fallback, plain torch.distributed).

    Patched through sys.modules: `import deepspeed.comm.torch as m` binds
    `deepspeed.comm`'s attribute `torch` (the torch library), and the patch
    would silently miss. Call before `deepspeed.init_distributed`."""
    import deepspeed.comm.torch  # noqa: F401  (loads the module patched below)

    sys.modules["deepspeed.comm.torch"].build_shm_op = _no_shm_op


@checked({"deepspeed": "0.19.8"})
def deepspeed_checkpoint_types() -> list[type]:
    """The only types beyond tensors and builtins that DeepSpeed's checkpoint
    files hold (ZeRO 0-3 in fp32 and bf16 seen, the fp16 loss scalers from
    its source): classes from DeepSpeed's internals, which the weights-only
    unpickler is told to admit. Checked: each still imports from where it
    is named (a file of a newer DeepSpeed holding another type is refused
    by name, not run)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


@checked({"deepspeed": "0.19.8"})
def deepspeed_checkpoint_reader(engine, load: Callable) -> None:
    """Make `engine.load_checkpoint` read every file with `load(path,
    map_location=...)`: the engine's `TorchCheckpointEngine.load` is
    replaced on that object (DeepSpeed's own calls `torch.load(...,
    weights_only=False)`, which runs whatever a file holds). Another
    checkpoint engine reads otherwise, unchecked: refused.

    Checked: TorchCheckpointEngine.load takes (path, map_location); the
    engine's and the state-dict loader's modules read checkpoints only
    through `checkpoint_engine.load`, never torch.load directly."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    reader = engine.checkpoint_engine
    if type(reader) is not TorchCheckpointEngine:  # another engine reads otherwise: not checked, so not used
        raise RuntimeError(f"DeepSpeed's checkpoint engine is {type(reader).__name__}; make-dist reads checkpoints "
                           f"through TorchCheckpointEngine only")
    reader.load = load


@checked({"deepspeed": "0.19.8"})
def deepspeed_full_numel(p: torch.Tensor) -> int:
    """The number of elements of a parameter, whole even when ZeRO-3 holds
    only this rank's shard: DeepSpeed keeps the full count in the
    undocumented attribute `ds_numel` of the parameters it partitions (their
    own numel() is then 0). For model FLOPs. Checked: a parameter made under
    `deepspeed.zero.Init` carries it, equal to the module's full size."""
    return getattr(p, "ds_numel", p.numel())


# ---------------------------------------------------------------------------
# Ray

RAY_TRAIN_POLL_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # how often Ray Train's controller polls its workers


@checked({"ray": "2.60.0"})
def ray_embedded_options(dashboard_port: int, poll_interval_s: str) -> dict:
    """ray.init's options for the embedded local Ray beyond its documented
    ones: `_node_ip_address="127.0.0.1"` (a private option of ray.init), and
    for its workers three settings Ray reads from internal constants:
    RAY_API_SERVER_ADDRESS (where the state API finds the dashboard, rather
    than scanning the machine), RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 (no
    preemption watcher actor), and RAY_TRAIN_POLL_INTERVAL (how often Ray
    Train's controller polls its workers). Why each: train/cluster.py.

    Checked: ray.init still reads `_node_ip_address`; each setting's name is
    the one Ray's constants read (ray._private.ray_constants,
    ray.train.v2._internal.constants)."""
    return {"_node_ip_address": "127.0.0.1",
            "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
                                         "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                                         RAY_TRAIN_POLL_INTERVAL: poll_interval_s}}}


@checked({"ray": "2.60.0"})
def ray_job_submission() -> tuple[str | None, bool]:
    """(the submission id, whether Ray copied a working directory) of this
    process when it is the entry point of `ray job submit` ((None, False)
    when not). Ray's job supervisor tells its entry point in an internal
    variable, RAY_JOB_CONFIG_JSON_ENV_VAR: JSON with `runtime_env`
    (`working_dir` when one was sent) and `metadata` (`job_submission_id`).
    No public API says either to the entry point itself.

    Checked: the variable's name and the keys are Ray's constants
    (ray._private.runtime_env.constants, the job module's metadata key)."""
    import json
    import os

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None, False
    try:
        config = json.loads(raw)
    except ValueError:
        return None, False
    copied = (config.get("runtime_env") or {}).get("working_dir")
    return (config.get("metadata") or {}).get("job_submission_id"), bool(copied)


@checked({"ray": "2.60.0"})
def ray_raylet_messages_to_log() -> None:
    """Send the raylet's messages that Ray's driver prints to stdout (such
    as "8 PYTHON worker processes have been started", whenever trials start
    together) to the logger "raylet" instead, whatever log_to_driver says:
    Ray has no setting for it. Its printer, the private
    `ray._private.worker.print_to_stdstream`, is wrapped: the raylet's
    messages go to logging, everything else to the printer as before. Once
    per process; call before ray.init.

    Checked: the printer exists, takes (data, ignore_prefix), and Ray's error
    listener looks it up by name when it prints (so the wrapper is what runs)."""
    import ray._private.worker as ray_worker

    printer = ray_worker.print_to_stdstream
    if getattr(printer, "make_dist_quiet", False):
        return

    def print_to_stdstream(data, ignore_prefix):
        if data.get("pid") == "raylet":
            for line in data.get("lines", []):
                logging.getLogger("raylet").warning(line)  # not under "ray": quiet, that logs errors only
        else:
            printer(data, ignore_prefix)

    print_to_stdstream.make_dist_quiet = True
    ray_worker.print_to_stdstream = print_to_stdstream


@checked({"ray": "2.60.0"})
def ray_logs_dir() -> str:
    """The folder of this Ray session's logs (workers' output included): no
    public API says it, so read from the driver's private node object
    (`ray._private.worker._global_node.get_logs_dir_path()`), and Ray's
    usual place when that is missing.

    Checked: `_global_node` is a module attribute of ray._private.worker and
    Ray's Node class has `get_logs_dir_path()`."""
    import ray

    try:
        return ray._private.worker._global_node.get_logs_dir_path()
    except AttributeError:
        return "/tmp/ray/session_latest/logs"


# ---------------------------------------------------------------------------
# Ray and MLflow


@checked({"ray": "2.60.0", "mlflow": "3.17.2"})
def library_terminal_handlers_off() -> None:
    """Remove the terminal handlers libraries put on their own loggers, and
    let those loggers' records reach the root's handlers (the log file
    progress.logs_to_file sets up). Ray and MLflow add theirs when imported
    (to "ray", "mlflow", "alembic", ... with propagate off): they are
    imported first, so that theirs are among those removed.

    Checked: imported in a fresh process, Ray and MLflow put a StreamHandler
    on "ray" and "mlflow" with propagate off, and none is left after this."""
    import mlflow  # noqa: F401
    import ray  # noqa: F401

    for logger in [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]:
        if isinstance(logger, logging.Logger):
            for h in list(logger.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    logger.removeHandler(h)
            logger.propagate = True


# ---------------------------------------------------------------------------
# MLflow


@checked({"mlflow": "3.17.2"})
def mlflow_dataset_entity(dataset):
    """The `mlflow.entities.Dataset` of an `mlflow.data` dataset, for
    `MlflowClient.log_inputs` (which logs to a run by id; the public
    `mlflow.log_input` logs only to the active run). Through the dataset's
    private `_to_mlflow_entity()`.

    Checked: it exists and gives an entities.Dataset with the dataset's
    name, digest and source."""
    return dataset._to_mlflow_entity()


@checked({"mlflow": "3.17.2"})
def mlflow_system_metrics(run_id: str, tracking_uri: str, resumed: bool):
    """A started monitor of the machine's CPU, memory, disk, network and GPU
    use, logged to a run by id (`mlflow.start_run(log_system_metrics=True)`,
    the public way, needs an active run in this process, which a Ray worker
    logging to its driver's run does not have); `stop(monitor)` ends it.
    Through MLflow's `SystemMetricsMonitor` (mlflow.system_metrics, not
    exported) and, on stop, its `collect_metrics`, `aggregate_metrics`,
    `publish_metrics` and `mlflow_logger.flush`: a closing sample, since
    MLflow drops what it sampled since its last interval (a run shorter than
    one interval, 10 s, would show an empty System metrics tab).

    Checked: those methods exist with these signatures, and a monitor started
    and stopped so logs system/* metrics to the run."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri, resume_logging=resumed)
    monitor.start()
    return monitor


def mlflow_system_metrics_stop(monitor) -> None:
    """Stop a monitor of `mlflow_system_metrics`, with its closing sample."""
    monitor.finish()
    monitor.collect_metrics()
    monitor.publish_metrics(monitor.aggregate_metrics())
    monitor.mlflow_logger.flush()
