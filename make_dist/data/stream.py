"""Streaming: WebDataset shards from any fsspec URL -> batches on every rank.

    batch = {"image": (B, 3, H, W) uint8, "tokens": (B, N, 77) int64,
             "mask": (B, N) bool, "keys": [B str], "skipped": () int64}

Two modes:
- resampled (training): every loader worker of every rank draws shards at
  random with its own seed, forever, and an epoch is a fixed number of
  batches per worker, so every rank runs the same number of steps however
  uneven the shards are (a rank that ran out first would hang the others);
- exact (evaluation, tests): the shard list is split by rank, then by loader
  worker: each sample is seen exactly once per pass over all ranks.

A sample that fails inside a shard (a corrupt image or json, a broken tar
member) is skipped and counted; `skipped` in each batch is the count since
the worker's previous batch, for the trainer to sum and log.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from functools import partial

import fsspec
import torch
from PIL import Image

from ..errors import UserError
from .schema import DEFAULT_K, Sample, n_slots
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


def open_shards(sources, handler):
    """Open each shard URL: fsspec for every scheme (local, file://, memory://,
    s3://, gs://, ...), webdataset's own opener for pipe: (checked allowed before)."""
    import webdataset as wds

    for source in sources:
        url = source["url"]
        try:
            stream = wds.gopen(url) if url.startswith("pipe:") else fsspec.open(url, "rb").open()
        except Exception as e:
            if handler(e):
                continue
            raise
        yield dict(source, stream=stream)


# ---------------------------------------------------------------------------
# Samples


def image_transform(size: int, train: bool):
    """SPEC section 6 augmentation for training; resize + centre crop for
    evaluation. Gives uint8 (3, size, size): the model scales and normalises
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


def decode_image(data: bytes, size: int) -> Image.Image:
    """RGB image; a JPEG is decoded at the smallest DCT scale that still covers `size`."""
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG":
        image.draft("RGB", (size, size))
    return image.convert("RGB")


class SampleDecoder:
    """Shard members of one sample -> image tensor, tokens (N, L), mask (N,)."""

    CACHE_SIZE = 20_000  # texts; about 12 MB of tokens per loader worker

    def __init__(self, tokenizer, transform, size: int, k: int = DEFAULT_K):
        self.tokenizer, self.transform, self.size, self.k = tokenizer, transform, size, k
        self.context_length = tokenizer.context_length
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, sample: dict) -> dict:
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None or "json" not in sample:
            raise ValueError(f"sample {sample.get('__key__')} lacks an image or json member")
        image = self.transform(decode_image(sample[ext], self.size))
        tokens, mask = self.texts(Sample.from_json(json.loads(sample["json"])))
        return {"image": image, "tokens": tokens, "mask": mask, "key": sample["__key__"]}

    def texts(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        slots = sample.texts(self.k)
        tokens = torch.zeros(n_slots(self.k), self.context_length, dtype=torch.long)
        mask = torch.zeros(n_slots(self.k), dtype=torch.bool)
        for n, text in enumerate(slots):
            if text:
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


class SkipCounter:
    """Exception handler that logs, counts and continues; the batcher reads the count."""

    def __init__(self):
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        if self.count <= 5 or self.count % 1000 == 0:
            log.warning("skipped a corrupt sample (%d so far): %s", self.count, exn)
        return True

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


class Batcher:
    def __init__(self, skips: SkipCounter):
        self.skips = skips

    def __call__(self, samples: list[dict]) -> dict:
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "tokens": torch.stack([s["tokens"] for s in samples]),
            "mask": torch.stack([s["mask"] for s in samples]),
            "keys": [s["key"] for s in samples],
            "skipped": torch.tensor(self.skips.take()),
        }


# ---------------------------------------------------------------------------
# The pipeline


@dataclass
class StreamConfig:
    urls: list[str]
    batch_size: int
    image_size: int
    k: int = DEFAULT_K
    train: bool = True  # training augmentation; False: resize + centre crop
    resampled: bool = True
    batches_per_worker: int | None = None  # resampled: the epoch length of each worker
    num_workers: int = 2
    rank: int | None = None  # None: from torch.distributed or RANK / WORLD_SIZE
    world: int | None = None
    seed: int = 0
    shuffle_buffer: int = 1000  # 0: no shuffling


def rank_and_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    if rank is not None and world is not None:
        return rank, world
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_dataset(cfg: StreamConfig, tokenizer):
    """The webdataset pipeline of one rank (iterable of batches)."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    rank, world = rank_and_world(cfg.rank, cfg.world)
    skips = SkipCounter()
    decoder = SampleDecoder(tokenizer, image_transform(cfg.image_size, cfg.train), cfg.image_size, cfg.k)

    if cfg.resampled:
        def worker_seed():  # distinct per (rank, loader worker), the same on every run
            info = torch.utils.data.get_worker_info()
            return rank * 1000 + (info.id if info else 0)

        stages = [wds.ResampledShards(cfg.urls, seed=cfg.seed, worker_seed=worker_seed, deterministic=True)]
    else:
        if len(cfg.urls) < world:
            log.warning("%d shards for %d ranks: some ranks get none", len(cfg.urls), world)
        stages = [wds.SimpleShardList(cfg.urls[rank::world]), wds.split_by_worker]
    stages += [
        partial(open_shards, handler=skips),
        partial(tar_file_expander, handler=skips),
        partial(group_by_keys, handler=skips),
    ]
    if cfg.shuffle_buffer > 0:
        stages.append(wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, 100)))
    stages += [
        wds.map(decoder, handler=skips),
        wds.batched(cfg.batch_size, collation_fn=Batcher(skips), partial=not cfg.resampled),
    ]
    dataset = wds.DataPipeline(*stages)
    if cfg.resampled:
        if not cfg.batches_per_worker:
            raise ValueError("resampled streaming needs batches_per_worker (the epoch length)")
        dataset = dataset.with_epoch(cfg.batches_per_worker)
    return dataset


def make_loader(cfg: StreamConfig, tokenizer) -> torch.utils.data.DataLoader:
    """Batches of one rank. Resampled: batches_per_worker * max(1, num_workers) per epoch."""
    dataset = build_dataset(cfg, tokenizer)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0 and cfg.resampled,
        pin_memory=torch.cuda.is_available(),
        # batches held ahead per worker: fewer of the big ones (shared memory)
        prefetch_factor=(4 if cfg.batch_size < 256 else 2) if cfg.num_workers > 0 else None,
    )
