"""Typed configuration: one dataclass per part of a job, parsed once.

A YAML file holds any subset of the sections below; `--set a.b=value`
overrides single keys (the value is read as YAML: `--set loss.dkw=false`).
An unknown key, a wrong type or a bad value raises ConfigError naming the
key and the file, before any work starts.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .typed import build_section, parse_yaml, read_yaml

# The choices of the keys below that take one of a few values.
TEXT_BATCHING = ("buckets", "longest", "full")
CAPTIONS = ("raw", "knowledge")  # slot 0: the caption, or the aspect texts + caption (make_dist/data/schema.py)
BACKENDS = ("torch", "triton", "auto")
TASKS = ("classify", "concepts", "retrieval")  # the zero-shot tasks (make_dist/evaluate/tasks.py)
GRAD_CHECKPOINTING = (False, True, "image", "text")


@dataclass
class ModelConfig:
    # An open_clip architecture name (e.g. ViT-B-16) or a path to a model
    # config JSON (open_clip's format; make_dist/model_configs/ has ours).
    name: str = "ViT-B-16"
    # An open_clip pretrained tag (e.g. "openai"; needs the internet) or a
    # local checkpoint file. None: random initialisation.
    pretrained: str | None = None
    # Recompute activations in the backward to save memory: false, true (both
    # towers), "image" or "text". Costs about a third more compute per tower:
    # use it only where the batch does not fit without.
    grad_checkpointing: bool | str = False
    # How the valid text slots are batched through the text tower (the
    # exactness rule of docs/spec.md, section 2: causal attention and EOT
    # pooling make every choice give the same embeddings). "buckets": grouped
    # by length, each group cut to its bucket's edge (a multiple of
    # text_bucket); "longest": one group cut to the batch's longest text;
    # "full": every slot, missing ones too, at the full context (the
    # straightforward baseline). Under ZeRO-3 buckets become "longest"
    # (Config.text_batching).
    text_batching: str = "buckets"
    text_bucket: int = 16
    # torch.compile each transformer block of both towers (compiled once,
    # reused by every block of a tower).
    compile: bool = False

    def validate(self) -> None:
        _require(bool(self.name), "name", "must not be empty")
        _require(self.grad_checkpointing in GRAD_CHECKPOINTING, "grad_checkpointing",
                 "must be false, true, image or text")
        _require(self.text_batching in TEXT_BATCHING, "text_batching", f"must be one of {list(TEXT_BATCHING)}")
        _require(self.text_bucket >= 1, "text_bucket", "must be >= 1")

    def checkpointed(self, tower: str) -> bool:
        """Whether the tower ("image" or "text") recomputes its activations."""
        return self.grad_checkpointing is True or self.grad_checkpointing == tower


@dataclass
class DataConfig:
    # A manifest.json (written by `make-dist shards`), a WebDataset URL or brace
    # pattern, or a list of them: any fsspec URL.
    train_shards: str | list[str] | None = None
    batch_size: int = 32  # per rank
    num_workers: int = 2
    subtexts: int = 8  # K: at most K sentences per caption (N = K + 3 slots)
    allow_pipe: bool = False  # `pipe:` URLs run shell commands: opt in explicitly
    shuffle_buffer: int = 1000  # samples per loader worker; 0: keep the shards' order
    augment: bool = True  # the paper's augmentation (docs/spec.md, section 6); off: resize + centre crop
    # Slot 0: "raw", the caption as written; "knowledge", the disease and
    # concept texts put before it (the paper's knowledge-augmented CLIP
    # baseline, Derm1M-dagger: train it with the CLIP objective).
    caption: str = "raw"
    # True: shards drawn at random by every rank, the same step count everywhere.
    # False: each rank reads its share of the shards in order, epoch after epoch
    # (reproducible; an epoch ends for all ranks when the first runs out).
    resampled: bool = True
    # A loader worker stops the run (naming the shards) after this many reads
    # in a row fail (corrupt samples, unreadable shards) with no good sample
    # between them, or as soon as every shard it draws from has failed.
    max_failures_in_a_row: int = 1000

    def validate(self) -> None:
        _require(self.batch_size > 0, "batch_size", "must be > 0")
        _require(self.max_failures_in_a_row >= 1, "max_failures_in_a_row", "must be >= 1")
        _require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")
        _require(self.num_workers >= 0, "num_workers", "must be >= 0")
        _require(self.subtexts >= 1, "subtexts", "must be >= 1")
        _require(self.caption in CAPTIONS, "caption", f"must be one of {list(CAPTIONS)}")


@dataclass
class LossConfig:
    """The objective's settings (make_dist/objective.py builds MakeLoss from them)."""

    lam: float = 0.7  # weight of the fine-grained loss L_slra
    sigma: float = 0.0  # patch-relevance threshold of the knowledge pooling
    dkw: bool = True  # diagnosis-guided weights
    slra: bool = True  # fine-grained subtext-to-region loss
    mkcl_subtexts: bool = True  # subtexts (slots 3..) in L_mkcl
    mkcl_aspects: bool = True  # disease and concept texts (slots 1, 2) in L_mkcl; all four off: CLIP
    backend: str = "auto"  # torch (dense), triton (fused kernels), auto (the kernels on CUDA)

    def validate(self) -> None:
        _require(self.lam >= 0, "lam", "must be >= 0")
        # sigma thresholds a cosine similarity: below -1 it keeps every patch (as -1 does), from 1 up none
        _require(-1 <= self.sigma < 1, "sigma", "must lie in [-1, 1) (a threshold on a cosine similarity)")
        _require(self.backend in BACKENDS, "backend", f"must be one of {list(BACKENDS)}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.1  # none on biases, norms and the logit scale
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 1500  # then cosine decay to 0 at the last step
    fused: bool | None = None  # torch's fused AdamW kernel; None: on GPU

    def validate(self) -> None:
        _require(self.lr > 0, "lr", "must be > 0")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(all(0 <= b < 1 for b in self.betas), "betas", "must lie in [0, 1)")
        _require(self.eps > 0, "eps", "must be > 0")
        _require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")


@dataclass
class TrainConfig:
    name: str = "make"  # the run: rerunning the same name in the same storage resumes it
    steps: int = 1000  # optimizer steps in all
    # Or the run's length in passes over the data: steps = ceil(epochs * samples
    # / (data.batch_size * workers)), the samples counted by the shards'
    # manifest.json (`make-dist config` prints the result). Set one of the two.
    epochs: float | None = None
    workers: int = 1  # data-parallel ranks (Ray Train workers)
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # with use_gpu
    cpus_per_worker: float = 1.0  # reserved per worker (its loader processes share them)
    zero_stage: int = 2
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    checkpoint_every: int = 500
    storage: str = "runs"  # checkpoints and results: a folder or any fsspec URL
    max_failures: int = 0  # workers lost and replaced before the run fails (-1: no limit)
    max_nonfinite: int = 5  # consecutive non-finite losses (each step skipped) before the run stops
    log_every: int = 1
    seed: int = 0

    def validate(self) -> None:
        _require(is_folder_name(self.name), "name", FOLDER_NAME_RULE)
        _require(self.steps > 0, "steps", "must be > 0")
        _require(self.epochs is None or self.epochs > 0, "epochs", "must be > 0 (or null: train.steps decides)")
        _require(self.max_nonfinite >= 1, "max_nonfinite", "must be >= 1")
        _require(self.log_every >= 1, "log_every", "must be >= 1")
        _require(self.workers >= 1, "workers", "must be >= 1")
        _require(self.gpus_per_worker > 0, "gpus_per_worker", "must be > 0")
        _require(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        _require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        _require(self.precision in ("auto", "fp32", "bf16", "fp16"), "precision", "must be auto, fp32, bf16 or fp16")
        _require(self.checkpoint_every > 0, "checkpoint_every", "must be > 0")
        _require(self.max_failures >= -1, "max_failures", "must be >= -1 (-1: retry forever)")


@dataclass
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; None: a local sqlite store
    experiment: str = "make-dist"
    run_name: str | None = None
    log_model: bool = True  # the trained model as an MLflow (pyfunc) Logged Model; sweep trials never do
    register: str | None = None  # and registered under this name in the model registry

    def validate(self) -> None:
        _require(bool(self.experiment), "experiment", "must not be empty")
        _require(not self.register or self.log_model, "register", "needs tracking.log_model = true")


@dataclass
class EvalConfig:
    """Zero-shot evaluation during training, on held-out tables (any may be unset)."""

    every_steps: int = 0  # 0: only after the last step
    classify_table: str | None = None  # image, label
    classes: str | None = None  # YAML: class name -> synonyms
    concepts_table: str | None = None  # image, one 0/1 column per concept
    retrieval_table: str | None = None  # image, caption
    images_root: str | None = None
    # Read image paths of the tables that leave images_root (absolute paths,
    # '..', URLs) as written; by default such a row is skipped with its reason.
    images_anywhere: bool = False
    suite: str | None = None  # "paper": the paper's seven benchmark sets (make_dist/evaluate/paper.py)
    suite_data: str | None = None  # the authors' data/ folder (PAD/, F17K/, ..., skin_cap/)
    concept_terms: str | None = None  # the suite's concept terms JSON (default: make-dist's own)

    def tables(self) -> dict[str, str]:
        """{task: table} of the tasks configured."""
        tables = dict(zip(TASKS, (self.classify_table, self.concepts_table, self.retrieval_table)))
        return {task: table for task, table in tables.items() if table}

    def enabled(self) -> bool:
        """Whether anything is evaluated: a table or the suite."""
        return bool(self.tables() or self.suite)

    def validate(self) -> None:
        _require(self.every_steps >= 0, "every_steps", "must be >= 0")
        _require(self.suite in (None, "paper"), "suite", "must be paper (or unset)")
        _require(not self.suite or bool(self.suite_data), "suite_data",
                 "must name the authors' data/ folder when suite is set")
        _require(not self.classify_table or bool(self.classes), "classes",
                 "must name the class list when classify_table is set")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- ZeRO-3: what it rules out or changes, decided here -------------------

    @property
    def zero3(self) -> bool:
        """Parameters sharded over ranks: each block's forward gathers its own
        (a collective), and a full copy exists only inside a gather."""
        return self.train.zero_stage == 3

    def text_batching(self) -> str:
        """The text batching the model runs: model.text_batching, except that
        under ZeRO-3 length buckets become one pass cut to the longest text
        (buckets differ between ranks, and every rank must run the same
        passes of the text tower)."""
        if self.zero3 and self.model.text_batching == "buckets":
            return "longest"
        return self.model.text_batching

    def objective(self) -> str:
        """The arm of the paper's Table 1 this config trains: "clip" (every MAKE
        term off, the raw caption), "clip-knowledge" (the same on the
        knowledge-augmented caption, Derm1M-dagger) or "make" (any MAKE term on)."""
        loss = self.loss
        if loss.dkw or loss.slra or loss.mkcl_subtexts or loss.mkcl_aspects:
            return "make"
        return "clip-knowledge" if self.data.caption == "knowledge" else "clip"

    def flat(self) -> dict[str, Any]:
        """{"section.key": value}: the form experiment trackers log as params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


# A run's (or a sweep's) name is a folder of its storage: it must name one
# folder there, never a parent, the folder itself or a hidden file.
FOLDER_NAME_RULE = "must be a name of letters, digits, '.', '_', '-' that starts with a letter or digit"
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def is_folder_name(name: str) -> bool:
    return bool(_FOLDER_NAME.fullmatch(name or "")) and len(name) <= 200


# ---------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or the defaults), apply `a.b=value` overrides, check it."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = read_yaml(path, "config file") if path is not None else {}
    overridden = {apply_override(raw, item) for item in overrides}
    _one_length(raw, source, overridden)
    return from_dict(raw, source, overridden)


def _one_length(raw: dict[str, Any], source: str, overridden: set[str]) -> None:
    """train.steps and train.epochs are two ways to say one thing: a --set of
    one replaces the file's other; both from the same place is an error."""
    train = raw.get("train")
    if not isinstance(train, dict) or train.get("steps") is None or train.get("epochs") is None:
        return
    by_set = {key for key in ("steps", "epochs") if f"train.{key}" in overridden}
    if len(by_set) == 1:
        del train[({"steps", "epochs"} - by_set).pop()]
        return
    where = "--set" if by_set else source
    raise ConfigError(f"{where}: train.steps = {train['steps']!r} and train.epochs = {train['epochs']!r} "
                      f"both set: the run's length is one of them")


def from_dict(raw: dict[str, Any], source: str = "<dict>", overridden: set[str] = frozenset()) -> Config:
    """A checked Config from nested dicts; `overridden` keys came from --set."""

    def where(section: str, key: str) -> str:
        return "--set" if f"{section}.{key}" in overridden else source

    sections = {}
    hints = typing.get_type_hints(Config)
    for name, value in raw.items():
        if name not in hints:
            src = "--set" if any(k.startswith(f"{name}.") for k in overridden) else source
            raise ConfigError(f"{src}: unknown section {name!r} (known: {', '.join(hints)})")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping, got {type(value).__name__}")
        sections[name] = build_section(hints[name], value, name, where)
    config = Config(**sections)
    for name in hints:
        section = getattr(config, name)
        try:
            section.validate()
        except _Invalid as e:
            where_ = where(name, e.key)
            raise ConfigError(f"{where_}: {name}.{e.key} = {getattr(section, e.key)!r}: {e.why}") from None
    if config.model.compile and config.zero3:
        raise ConfigError(f"{where('model', 'compile')}: model.compile = true does not work with "
                          f"train.zero_stage = 3 (its parameter-gathering hooks); use stage 0, 1 or 2")
    return config


def apply_override(raw: dict[str, Any], item: str) -> str:
    """Set `section.key=value` (the value read as YAML) in nested dicts; returns the key."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. loss.lam=0.5")
    section = raw.setdefault(parts[0], {})
    if section is None:
        section = raw[parts[0]] = {}
    if not isinstance(section, dict):
        raise ConfigError(f"--set {item!r}: section {parts[0]!r} is not a mapping")
    try:
        section[parts[1]] = parse_yaml(value)
    except yaml.YAMLError:
        section[parts[1]] = value
    return ".".join(parts)


class _Invalid(Exception):
    def __init__(self, key: str, why: str):
        self.key, self.why = key, why


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise _Invalid(key, why)


def dump_config(config: Config) -> str:
    """The resolved config as YAML (tuples written as lists)."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return list(x)
        return x

    return yaml.safe_dump(plain(config.to_dict()), sort_keys=False)
