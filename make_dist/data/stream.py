"""Streaming: WebDataset shards from any fsspec URL -> finished batches on every rank.

A `Batch` leaves the loader as the training step reads it: uint8 images (the
model scales them on its device), the tokens of the slots the configured loss
reads (the others are neither tokenised nor marked valid: the CLIP baseline
tokenises one text a sample), and each text's real length, counted as it is
tokenised, so the text tower can be planned without reading anything back
from the GPU.

Two modes:
- resampled (training): every loader worker of every rank draws shards at
  random with its own seed, forever, and an epoch is a fixed number of
  batches per worker, so every rank runs the same number of steps however
  uneven the shards are (a rank that ran out first would hang the others);
- exact (evaluation, tests): the shard list is split by rank, then by loader
  worker: each sample is seen exactly once per pass over all ranks.

What cannot be read is skipped and counted, by what it is: a sample (a
corrupt image or json) in `skipped_samples`, a shard (missing, unreadable, or
broken part-way, its remaining samples unknown) in `skipped_shards`, each
batch carrying the counts since the worker's previous batch for the trainer
to sum and log. A stream that can make no batch stops (`ReadFailures`): a
loader worker whose every shard failed since its last good sample, or that
met `data.max_failures_in_a_row` failures without one, raises DataError
naming the shards, where it would otherwise draw and skip forever.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial

import fsspec
import torch

from .. import distributed
from ..config import DataConfig
from ..errors import DataError, UserError
from ..files import open_image
from ..slots import DEFAULT_K, n_slots
from ..tokens import token_lengths
from .schema import Sample
from .shards import MANIFEST, read_manifest

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


# ---------------------------------------------------------------------------
# Shard lists and opening them


def shard_urls(spec: str | list[str], allow_pipe: bool = False) -> list[str]:
    """Shard URLs from a manifest.json, a brace pattern, or a list of either."""
    import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = []
    for s in specs:
        if s.endswith(MANIFEST):
            base = s[: -len(MANIFEST)]
            urls += [base + name for name in read_manifest(s)["shards"]]
        else:
            urls += list(braceexpand.braceexpand(s))
    if not urls:
        raise UserError(f"no shards in {spec!r}")
    piped = [u for u in urls if u.startswith("pipe:")]
    if piped and not allow_pipe:
        raise UserError(f"{piped[0]!r}: pipe: URLs run shell commands; set data.allow_pipe=true to allow them")
    return urls


def open_shard(url: str):
    """A shard's byte stream: fsspec for every scheme (local, file://, memory://,
    s3://, gs://, ...), webdataset's own opener for pipe: (checked allowed before)."""
    import webdataset as wds

    return wds.gopen(url) if url.startswith("pipe:") else fsspec.open(url, "rb").open()


# What a shard that fails with these is: gone, forbidden or not a tar, for good. Anything else
# (a reset connection, a timeout, a store's 503) may pass: the shard is tried again first.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, EOFError, ValueError)
RETRY_WAITS_S = (1.0, 2.0, 4.0)


def shard_samples(sources, failures: "ReadFailures"):
    """The samples of each shard (its tar members grouped by key). A shard
    that cannot be opened, holds no sample, or breaks part-way (the rest of
    it is lost) is counted once and skipped; one that fails for a reason
    that may pass is tried again (RETRY_WAITS_S) before it counts, and does
    not count as unreadable. A malformed group of members is a sample skipped."""
    import tarfile

    from webdataset.tariterators import group_by_keys, tar_file_expander

    for source in sources:
        url = source["url"]
        for retry in range(len(RETRY_WAITS_S) + 1):
            count = 0
            try:
                members = tar_file_expander([dict(source, stream=open_shard(url))])
                for sample in group_by_keys(members, handler=lambda e, url=url: failures.sample(url, e)):
                    count += 1
                    yield sample
                if count == 0:
                    failures.shard(url, ValueError("the shard holds no sample"), unreadable=True)
                break
            except Exception as e:
                permanent = isinstance(e, (*PERMANENT, tarfile.TarError))
                if count == 0 and not permanent and retry < len(RETRY_WAITS_S):
                    log.warning("reading %s failed (%s); trying again in %.0f s", url, e, RETRY_WAITS_S[retry])
                    time.sleep(RETRY_WAITS_S[retry])
                    continue
                failures.shard(url, e, unreadable=count == 0 and permanent)
                break


def decoded(samples, decoder: "SampleDecoder", failures: "ReadFailures"):
    """Each sample decoded; one that fails is counted and skipped."""
    for sample in samples:
        try:
            out = decoder(sample)
        except Exception as e:
            failures.sample(sample.get("__url__"), e)
            continue
        failures.good()
        yield out


# ---------------------------------------------------------------------------
# Samples and batches


def image_transform(size: int, train: bool):
    """The paper's augmentation for training (docs/spec.md, section 6); resize +
    centre crop for evaluation. Gives uint8 (3, size, size): the model scales and normalises
    on its device (`MakeModel.normalize`), so a batch crosses to the GPU at a
    quarter of the float size."""
    from torchvision import transforms as T

    if train:
        return T.Compose([
            T.RandomResizedCrop(size, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomApply([T.ColorJitter(0.32, 0.32, 0.32, 0.08)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.PILToTensor(),
        ])
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.PILToTensor(),
    ])


@dataclass
class Batch:
    """One rank's batch, finished in the loader."""

    image: torch.Tensor  # (B, 3, H, W) uint8
    tokens: torch.Tensor  # (B, N, L) int64, zeros where a slot is not encoded
    mask: torch.Tensor  # (B, N) bool: slot n of sample b holds a text the loss reads
    lengths: torch.Tensor  # (B, N) int64: real tokens of each encoded text, 0 elsewhere
    keys: list[str]
    skipped_samples: int = 0  # corrupt samples the loader worker skipped since its previous batch
    skipped_shards: int = 0  # shards it could not read (or that broke part-way) since then
    rows_per_rank: list[int] | None = None  # every rank's batch size, when the trainer knows them

    # What the device reads. The lengths stay on the host: the text tower's
    # length groups are planned from them without a sync.
    DEVICE_FIELDS = ("image", "tokens", "mask")

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device) -> "Batch":
        return replace(self, **{k: getattr(self, k).to(device, non_blocking=True) for k in self.DEVICE_FIELDS})

    def pin_memory(self) -> "Batch":  # the DataLoader calls it (pin_memory=True) for a faster copy
        return replace(self, **{k: getattr(self, k).pin_memory() for k in self.DEVICE_FIELDS})


class SampleDecoder:
    """Shard members of one sample -> image tensor, tokens (N, L), mask (N,), lengths (N,).

    Only the slots in `read` are tokenised; the others stay empty and invalid."""

    CACHE_SIZE = 20_000  # texts; about 12 MB of tokens per loader worker

    def __init__(self, tokenizer, transform, size: int, k: int = DEFAULT_K, read: Sequence[bool] | None = None,
                 caption: str = "raw"):
        self.tokenizer, self.transform, self.size, self.k, self.caption = tokenizer, transform, size, k, caption
        self.read = list(read) if read is not None else [True] * n_slots(k)
        if len(self.read) != n_slots(k):
            raise ValueError(f"read names {len(self.read)} slots; K = {k} makes {n_slots(k)}")
        self.context_length = tokenizer.context_length
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, sample: dict) -> dict:
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None or "json" not in sample:
            raise ValueError(f"sample {sample.get('__key__')} lacks an image or json member")
        image = self.transform(open_image(sample[ext], fit=self.size).convert("RGB"))
        tokens, mask = self.texts(Sample.from_json(json.loads(sample["json"])))
        return {"image": image, "tokens": tokens, "mask": mask, "lengths": token_lengths(tokens) * mask,
                "key": sample["__key__"]}

    def texts(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        slots = sample.texts(self.k, self.caption)
        tokens = torch.zeros(n_slots(self.k), self.context_length, dtype=torch.long)
        mask = torch.zeros(n_slots(self.k), dtype=torch.bool)
        for n, text in enumerate(slots):
            if text and self.read[n]:
                tokens[n] = self.tokenize(text)
                mask[n] = True
        return tokens, mask

    def tokenize(self, text: str) -> torch.Tensor:
        """Tokens of one text, cached: aspect texts come from a small ontology and
        repeat across samples, and a one-sentence caption is also its own subtext."""
        cached = self._cache.get(text)
        if cached is None:
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            cached = self._cache[text] = self.tokenizer([text])[0]
        return cached


class ReadFailures:
    """What one loader worker could not read, counted by kind, and the rule
    that stops a stream from which no batch can be made: since the last good
    sample, either every shard the worker draws from (`shards`, when it draws
    at random; None in order, where a finite stream ends by itself) was
    unreadable, or `limit` reads failed in a row (samples or shards)."""

    SHOWN = 3  # shards named in the error

    def __init__(self, shards: Sequence[str] | None, limit: int):
        self.all_shards, self.limit = (set(shards) if shards is not None else None), limit
        self.skipped_samples = self.skipped_shards = 0  # since the last batch
        self.total = 0
        # since the last good sample:
        self.in_a_row = 0
        self.failed: dict[str, str] = {}  # shard -> its first failure
        self.unreadable: set[str] = set()  # shards that gave no sample at all

    def shard(self, url: str, exn: Exception, unreadable: bool) -> None:
        """A shard that could not be opened, or broke part-way (`unreadable`: before its first sample)."""
        self.skipped_shards += 1
        if unreadable:
            self.unreadable.add(url)
        self._failed(url, exn, "shard")

    def sample(self, url: str | None, exn: Exception) -> bool:
        self.skipped_samples += 1
        self._failed(url or "?", exn, "sample")
        return True  # a handler's answer: go on

    def good(self) -> None:
        self.in_a_row = 0
        self.failed.clear()
        self.unreadable.clear()

    def take(self) -> tuple[int, int]:
        """(samples, shards) skipped since the previous call."""
        counts = (self.skipped_samples, self.skipped_shards)
        self.skipped_samples = self.skipped_shards = 0
        return counts

    def _failed(self, url: str, exn: Exception, what: str) -> None:
        self.total += 1
        self.in_a_row += 1
        self.failed.setdefault(url, f"{type(exn).__name__}: {str(exn).splitlines()[0] if str(exn) else ''}"[:200])
        if self.total <= 5 or self.total % 1000 == 0:
            log.warning("skipped a %s of %s (%d failures so far): %s", what, url, self.total, exn)
        every_shard = self.all_shards is not None and self.all_shards <= self.unreadable
        if every_shard or self.in_a_row >= self.limit:
            named = "; ".join(f"{u}: {why}" for u, why in list(self.failed.items())[: self.SHOWN])
            more = len(self.failed) - self.SHOWN
            why = (f"every one of its {len(self.all_shards)} shards is unreadable" if every_shard else
                   f"{self.in_a_row} reads failed in a row (data.max_failures_in_a_row = {self.limit})")
            raise DataError(f"data.train_shards: no batch can be made: {why}, and no sample was read ({named}"
                            f"{f'; and {more} more shards' if more > 0 else ''}). Check the shards, or write "
                            f"them again with `make-dist shards`")


class Batcher:
    def __init__(self, failures: ReadFailures):
        self.failures = failures

    def __call__(self, samples: list[dict]) -> Batch:
        skipped_samples, skipped_shards = self.failures.take()
        return Batch(
            image=torch.stack([s["image"] for s in samples]),
            tokens=torch.stack([s["tokens"] for s in samples]),
            mask=torch.stack([s["mask"] for s in samples]),
            lengths=torch.stack([s["lengths"] for s in samples]),
            keys=[s["key"] for s in samples],
            skipped_samples=skipped_samples,
            skipped_shards=skipped_shards,
        )


# ---------------------------------------------------------------------------
# The pipeline


def rank_and_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """The ones given, else the process group's, else RANK / WORLD_SIZE (a launcher's)."""
    if rank is not None and world is not None:
        return rank, world
    if distributed.world_size() > 1:
        return distributed.rank(), distributed.world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shuffled(samples, *, bufsize: int, initial: int, epochs):
    """webdataset's buffered shuffle, its order drawn from the loader's seeds
    (webdataset's default draws from the pid and the clock): in a loader
    process from its torch seed, which the loader's generator gives each
    process of each epoch; here from this process's seed and the epoch."""
    import webdataset as wds

    rng = random.Random(torch.initial_seed() * 1_000_003 + next(epochs))
    return wds.shuffle(bufsize, initial=initial, rng=rng)(samples)


def build_dataset(data: DataConfig, tokenizer, *, image_size: int, read: Sequence[bool] | None = None,
                  rank: int | None = None, world: int | None = None, seed: int = 0,
                  batches_per_worker: int | None = None):
    """The webdataset pipeline of one rank (an iterable of Batch)."""
    import webdataset as wds

    urls = shard_urls(data.train_shards, data.allow_pipe)
    rank, world = rank_and_world(rank, world)
    failures = ReadFailures(urls if data.resampled else None, data.max_failures_in_a_row)
    decoder = SampleDecoder(tokenizer, image_transform(image_size, data.augment), image_size, data.subtexts, read,
                           data.caption)

    if data.resampled:
        def worker_seed():  # distinct per (rank, loader worker), the same on every run
            info = torch.utils.data.get_worker_info()
            return rank * 1000 + (info.id if info else 0)

        stages = [wds.ResampledShards(urls, seed=seed, worker_seed=worker_seed, deterministic=True)]
    else:
        if len(urls) < world:
            log.warning("%d shards for %d ranks: some ranks get none", len(urls), world)
        stages = [wds.SimpleShardList(urls[rank::world]), wds.split_by_worker]
    stages.append(partial(shard_samples, failures=failures))
    if data.shuffle_buffer > 0:
        stages.append(partial(shuffled, bufsize=data.shuffle_buffer, initial=min(data.shuffle_buffer, 100),
                              epochs=itertools.count()))
    stages += [
        partial(decoded, decoder=decoder, failures=failures),
        wds.batched(data.batch_size, collation_fn=Batcher(failures), partial=not data.resampled),
    ]
    dataset = wds.DataPipeline(*stages)
    if data.resampled:
        if not batches_per_worker:
            raise ValueError("resampled streaming needs batches_per_worker (the epoch length)")
        dataset = dataset.with_epoch(batches_per_worker)
    return dataset


def make_loader(data: DataConfig, tokenizer, *, image_size: int, read: Sequence[bool] | None = None,
                rank: int | None = None, world: int | None = None, seed: int = 0,
                batches_per_worker: int | None = None) -> torch.utils.data.DataLoader:
    """Batches of one rank from `data.train_shards`, `data.*` as configured.

    read: the slots to tokenise (None: all). Resampled (`data.resampled`):
    `batches_per_worker` x max(1, num_workers) full batches per epoch; in
    order: each sample of the rank's shards once, the last batch maybe short.
    rank and world default to torch.distributed's (or RANK / WORLD_SIZE)."""
    dataset = build_dataset(data, tokenizer, image_size=image_size, read=read, rank=rank, world=world, seed=seed,
                            batches_per_worker=batches_per_worker)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=data.num_workers,
        # the loader processes' torch seeds (the augmentation's and the shuffle's draws) from `seed` and the
        # rank, not from whatever the caller's generator holds: the same config and seed give the same batches
        generator=torch.Generator().manual_seed(seed * 1000 + rank_and_world(rank, world)[0]),
        persistent_workers=data.num_workers > 0 and data.resampled,
        pin_memory=torch.cuda.is_available(),
        # batches held ahead per worker: fewer of the big ones (shared memory)
        prefetch_factor=(4 if data.batch_size < 256 else 2) if data.num_workers > 0 else None,
    )
