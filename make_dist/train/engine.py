"""DeepSpeed: the process group, the engine of one worker, its checkpoints, and
the mechanics of ZeRO-3 (what it changes is decided by Config.zero3 and
Config.text_batching).

Traps this module steps around (docs/traps.md): the shared-memory comm
extension DeepSpeed would JIT-compile for 2+ minutes on a CPU machine (skipped
by make_dist/overrides.py, like every reach into DeepSpeed's internals); its own
fused Adam (another JIT compile), replaced by a torch AdamW; parameters used
outside their module's forward under ZeRO-3 (registered as external); and
DeepSpeed's checkpoint loader, which unpickles whatever a checkpoint file
holds (`torch.load(weights_only=False)`): a run folder on shared storage
could run code on every worker that resumes from it. Checkpoints are read
with torch's weights-only unpickler instead, which admits tensors, builtin
containers and numbers, and the few DeepSpeed types
`overrides.deepspeed_checkpoint_types` lists.
"""

from __future__ import annotations

import contextlib
import enum
import os
import pickle
import re
import zipfile

import torch

from .. import overrides
from ..config import Config
from ..errors import RefusedFile
from ..model import MakeModel
from .optim import build_optimizer


def init_distributed(use_gpu: bool) -> None:
    """Join the process group Ray Train set up (gloo on CPU, NCCL on GPU)."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    overrides.deepspeed_without_shm_extension()
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def init_single_process(use_gpu: bool) -> None:
    """A process group of one, as a launcher would set it up, for a trainer
    run in this process alone (`make-dist train --no-ray`, bench/step.py, the
    tests); nothing when this process has one already."""
    import socket

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_WORLD_SIZE="1")
    init_distributed(use_gpu)


def precision(cfg: Config) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if cfg.train.use_gpu else "fp32"


def deepspeed_config(cfg: Config, world: int) -> dict:
    prec = precision(cfg)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "train_batch_size": cfg.data.batch_size * world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16"},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,  # make-dist prints its own progress
        "wall_clock_breakdown": False,
    }


def register_zero3_externals(model: MakeModel) -> None:
    """ZeRO-3 gathers a parameter only inside its owner's forward. These are
    read outside it (the fast text path, the patch projection, the scale), so
    the top-level forward gathers them."""
    import deepspeed

    clip = model.clip
    for param in (clip.positional_embedding, clip.text_projection, clip.logit_scale, clip.visual.proj):
        if isinstance(param, torch.nn.Parameter):
            deepspeed.zero.register_external_parameter(model, param)


def full_parameters(model: MakeModel, cfg: Config):
    """Under ZeRO-3 each rank holds a shard of every parameter: gather them all
    (every rank enters together). A no-op for the other stages."""
    if not cfg.zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


def build_engine(model: MakeModel, cfg: Config, world: int):
    """The DeepSpeed engine around the model, optimiser and schedule."""
    import deepspeed

    if cfg.zero3:
        register_zero3_externals(model)
    fused = cfg.train.use_gpu if cfg.optim.fused is None else cfg.optim.fused
    optimizer, schedule = build_optimizer(model, cfg.optim, cfg.train.steps, fused=fused)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                      config=deepspeed_config(cfg, world))
    return engine


def save_checkpoint(engine, directory: str, step: int, state: dict) -> None:
    """Every rank writes its shard of the model and optimiser state."""
    engine.save_checkpoint(directory, tag="state", client_state={"step": step, **state})


class UnreadableCheckpoint(RuntimeError):
    """A checkpoint whose files are damaged or missing (truncated, not a torch file)."""


def checkpoint_files(directory: str, rank: int) -> list[str]:
    """The files of a checkpoint that `rank`'s load reads: the model states
    (one file for all ranks, or the rank's own under ZeRO-3) and the rank's
    part of the optimiser state."""
    state = os.path.join(directory, "state")
    names = sorted(os.listdir(state)) if os.path.isdir(state) else []
    mine = [os.path.join(state, n) for n in names
            if n.endswith(".pt") and (n.startswith("mp_rank_") or f"zero_pp_rank_{rank}_" in n)]
    if not mine:
        raise UnreadableCheckpoint(f"no checkpoint files of rank {rank} in {state}")
    return mine


def verify_checkpoint(directory: str, rank: int) -> None:
    """Read every file `rank` will load, weights-only, and load nothing: a
    foreign object raises RefusedFile, damage UnreadableCheckpoint. Every
    rank verifies and the ranks agree before any calls DeepSpeed's load,
    whose collectives (ZeRO-3 gathers) would wait for a rank that failed."""
    for path in checkpoint_files(directory, rank):
        try:
            safe_load(path, map_location="cpu")
        except RefusedFile:
            raise
        except Exception as e:  # a truncated zip, an empty file
            first = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else ""
            raise UnreadableCheckpoint(f"{path}: {type(e).__name__}: {first}") from e


def load_checkpoint(engine, directory: str) -> dict:
    """Model, optimiser and schedule restored, every file read weights-only;
    returns the client state (step, ...). Verify the files first
    (`verify_checkpoint`): an error here is not damage but a checkpoint that
    does not fit (another world size, another model)."""
    overrides.deepspeed_checkpoint_reader(engine, safe_load)  # its own unpickles anything (weights_only=False)
    path, client_state = engine.load_checkpoint(directory, tag="state")
    if path is None:
        raise UnreadableCheckpoint(f"no DeepSpeed checkpoint files in {directory}")
    return client_state


def _enum_member(*args):
    """What `builtins.getattr` means in a checkpoint, and all it may mean: a
    member of an admitted Enum class. Some Python releases (3.11.2, Debian
    12's, among them) pickle an Enum member as getattr(class, name), and
    DeepSpeed's files hold one (ZeroStageEnum); any other use is refused."""
    cls, name = args if len(args) == 2 else (None, args)
    if (isinstance(cls, type) and issubclass(cls, enum.Enum) and cls in overrides.deepspeed_checkpoint_types()
            and isinstance(name, str) and name in cls.__members__):
        return cls[name]
    raise pickle.UnpicklingError(f"GLOBAL getattr({getattr(cls, '__qualname__', type(cls).__name__)},{name!r}) "
                                 f"is not a member of an admitted Enum")


def safe_load(path: str, map_location=None):
    """torch.load with the weights-only unpickler and the types DeepSpeed's
    files hold (`overrides.deepspeed_checkpoint_types()`, and their Enum
    members however pickled); a file holding any other object is refused,
    naming the file and the object."""
    try:
        with torch.serialization.safe_globals([*overrides.deepspeed_checkpoint_types(),
                                               (_enum_member, "builtins.getattr")]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        foreign = re.search(r"GLOBAL (\S+)", str(e))
        if foreign is None and not zipfile.is_zipfile(path):  # bytes that do not parse, in a broken file: damage
            raise
        what = (f"a Python object make-dist's checkpoints never hold ({foreign.group(1)})" if foreign else
                f"pickled data beyond tensors, numbers and containers ({_unpickler_says(e)})")
        raise RefusedFile(f"{path} holds {what}: refused, since loading it could run code. If this run folder "
                          f"is not yours, do not resume from it; if it is, someone else changed it") from None


def _unpickler_says(e: Exception) -> str:
    """The weights-only unpickler's own reason, from its long message."""
    _, _, said = str(e).partition("WeightsUnpickler error:")
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    return lines[0] if lines else str(e).splitlines()[0]
