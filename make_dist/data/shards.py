"""Ingestion: a table of images and captions -> WebDataset tar shards (`make-dist shards`).

    OUT/shard-000000.tar ...     {key}.jpg and {key}.json (schema.Sample.to_json)
    OUT/manifest.json            samples, shards, skipped [{row, image, reason}], ...
    OUT/_parts/shard-NNNNNN.json one record per finished shard (what a rerun skips)

Shard i holds the usable rows of table rows [i * shard_size, (i + 1) * shard_size).
A shard is written under a temporary name and renamed when complete, then
its part record is written: an interrupted run leaves no corrupt shard, and a
rerun redoes only the shards without a part record. A row that cannot become
a sample (missing or unreadable image, empty caption, a badly typed or
undecodable field) is skipped, and its reason lands in the manifest.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import fsspec
from PIL import Image

from ..config import Config
from ..errors import UserError
from ..files import atomic_writer, open_image, read_bytes, storage_problem, write_atomic
from ..slots import DEFAULT_K
from .schema import ColumnMap, RowError

MANIFEST = "manifest.json"
PARTS = "_parts"


def read_table(path: str) -> list[dict[str, Any]]:
    """Rows of a CSV or Parquet table (local path or fsspec URL) as dicts.

    CSV cells are read as text; bytes that are not UTF-8 are kept escaped so
    the row they sit in can be skipped with a reason rather than failing the
    whole file.
    """
    import pandas as pd

    try:
        if path.endswith((".parquet", ".pq")):
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, dtype=object, keep_default_na=False, encoding_errors="surrogateescape")
    except FileNotFoundError:
        raise UserError(f"table not found: {path}") from None
    except Exception as e:  # a table that does not parse at all
        raise UserError(f"{path}: cannot read the table: {e}") from None
    return frame.to_dict("records")


def table_rows(table: str, columns: list[str]) -> list[dict[str, Any]]:
    """The rows of a table that must not be empty and must have these columns."""
    rows = read_table(table)
    if not rows:
        raise UserError(f"{table}: the table has no rows")
    absent = [c for c in columns if c not in rows[0]]
    if absent:
        raise UserError(f"{table}: no column {', '.join(map(repr, absent))} "
                        f"(the table has: {', '.join(rows[0])})")
    return rows


@dataclass
class Prepared:
    """One row, ready to write (or the reason it cannot be)."""

    row: int
    image_path: str
    record: dict | None = None
    jpeg: bytes | None = None
    reason: str | None = None


def prepare_row(row: int, cells: dict, columns: ColumnMap, images_root: str | None,
                max_side: int | None, k: int, quality: int = 90) -> Prepared:
    """Texts and image of one row (runs in a worker process)."""
    path = cells.get(columns.image)
    if not isinstance(path, str) or not path.strip():
        return Prepared(row, str(path), reason=f"no image path (column {columns.image!r})")
    try:
        sample = columns.sample(cells, k)
    except RowError as e:
        return Prepared(row, path, reason=str(e))
    try:
        jpeg = load_image(resolve(path, images_root), max_side, quality)
    except FileNotFoundError:
        return Prepared(row, path, reason="image not found")
    except Exception as e:  # unreadable, truncated, not an image
        return Prepared(row, path, reason=f"image unreadable: {type(e).__name__}: {e}")
    return Prepared(row, path, record=sample.to_json(), jpeg=jpeg)


def resolve(path: str, images_root: str | None) -> str:
    """A URL or absolute path as it is; a relative path under images_root."""
    if "://" in path or os.path.isabs(path) or not images_root:
        return path
    return images_root.rstrip("/") + "/" + path


def load_image(url: str, max_side: int | None, quality: int = 90) -> bytes:
    """JPEG bytes of an image, downscaled so its longer side is at most max_side.

    A JPEG that needs no change is kept byte for byte (no second lossy pass).
    """
    data = read_bytes(url)
    image = open_image(data, fit=max_side)  # raises on truncated or empty files
    is_jpeg = image.format == "JPEG"
    if max_side and max(image.size) > max_side:
        image = image.convert("RGB")
        image.thumbnail((max_side, max_side), Image.BICUBIC)
    elif is_jpeg and image.mode == "RGB":
        return data
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write_shards(table: str, out: str, columns: ColumnMap, *, images_root: str | None = None,
                 shard_size: int = 1000, image_max_side: int | None = None, k: int = DEFAULT_K,
                 workers: int | None = None, progress: bool = True) -> dict:
    """Write (or finish writing) the shards of a table; returns the manifest."""
    from tqdm import tqdm

    if shard_size < 1:
        raise UserError("shards: --shard-size must be >= 1")
    rows = table_rows(table, columns.used())
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(f"{root}/{PARTS}", exist_ok=True)
    n_shards = (len(rows) + shard_size - 1) // shard_size
    done = _finished_parts(fs, root, shard_size)
    todo = [i for i in range(n_shards) if i not in done]
    if done:
        print(f"shards: {len(done)} of {n_shards} shards already complete in {out}; writing the other {len(todo)}")

    bar = tqdm(total=sum(len(_rows_of(i, shard_size, len(rows))) for i in todo), desc="shards",
               unit="row", disable=not progress)
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:

        def submit(i):  # map() submits at once: the workers run ahead of the writer
            jobs = [(r, rows[r], columns, images_root, image_max_side, k) for r in _rows_of(i, shard_size, len(rows))]
            return i, pool.map(_prepare_star, jobs, chunksize=8)

        def finish(i, results):
            prepared = []
            for p in results:
                prepared.append(p)
                bar.update()
            _write_shard(fs, root, i, shard_size, prepared)

        in_flight = deque()  # at most two shards of images in memory
        for i in todo:
            in_flight.append(submit(i))
            if len(in_flight) == 2:
                finish(*in_flight.popleft())
        while in_flight:
            finish(*in_flight.popleft())
    bar.close()

    manifest = _manifest(fs, root, out, table, n_shards, shard_size, k)
    print(f"shards: {manifest['samples']} samples in {len(manifest['shards'])} shards at {out}; "
          f"skipped {len(manifest['skipped'])} rows (reasons in {out.rstrip('/')}/{MANIFEST})")
    return manifest


def _rows_of(i: int, shard_size: int, n_rows: int) -> range:
    return range(i * shard_size, min((i + 1) * shard_size, n_rows))


def _prepare_star(args) -> Prepared:
    return prepare_row(*args)


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def _write_shard(fs, root: str, i: int, shard_size: int, prepared: list[Prepared]) -> None:
    import webdataset as wds

    good = [p for p in prepared if p.reason is None]
    if good:
        with atomic_writer(_url(fs, f"{root}/{shard_name(i)}")) as f:
            writer = wds.TarWriter(f)
            for p in good:
                writer.write({"__key__": f"{p.row:09d}", "jpg": p.jpeg, "json": json.dumps(p.record).encode()})
            writer.close()
    part = {
        "shard": shard_name(i) if good else None,
        "rows": [i * shard_size, i * shard_size + len(prepared)],
        "samples": len(good),
        "skipped": [{"row": p.row, "image": p.image_path, "reason": p.reason} for p in prepared if p.reason],
    }
    write_atomic(_url(fs, f"{root}/{PARTS}/{shard_name(i)[:-4]}.json"), json.dumps(part, indent=1))


def _finished_parts(fs, root: str, shard_size: int) -> dict[int, dict]:
    parts = {}
    for path in fs.glob(f"{root}/{PARTS}/shard-*.json"):
        part = json.loads(fs.cat_file(path))
        start = part["rows"][0]
        if start % shard_size:
            raise UserError(f"{root} holds shards written with another --shard-size; "
                            f"write to an empty folder or use the same size")
        parts[start // shard_size] = part
    return parts


def _manifest(fs, root: str, out: str, table: str, n_shards: int, shard_size: int, k: int) -> dict:
    parts = _finished_parts(fs, root, shard_size)
    ordered = [parts[i] for i in range(n_shards)]
    manifest = {
        "samples": sum(p["samples"] for p in ordered),
        "shards": [p["shard"] for p in ordered if p["shard"]],
        "skipped": [s for p in ordered for s in p["skipped"]],
        "table": table,
        "shard_size": shard_size,
        "subtexts": k,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_atomic(_url(fs, f"{root}/{MANIFEST}"), json.dumps(manifest, indent=1))
    return manifest


def read_manifest(url: str) -> dict:
    """The manifest.json that `write_shards` leaves beside its shards."""
    try:
        manifest = json.loads(read_bytes(url))
    except FileNotFoundError:
        raise UserError(f"shards manifest not found: {url}") from None
    except ValueError as e:
        raise UserError(f"{url}: not a valid manifest.json: {e}") from None
    except Exception as e:  # storage that cannot be read: credentials, endpoint, permission
        raise UserError(f"shards manifest {url}: {storage_problem(e)}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise UserError(f"{url}: not a shards manifest (no list of shards)")
    return manifest


def with_shards_manifest(cfg: Config) -> Config:
    """What the shards' manifest decides: train.steps from train.epochs, and
    whether the shards hold the K sentences data.subtexts asks for."""
    shards = cfg.data.train_shards
    manifest = read_manifest(shards) if isinstance(shards, str) and shards.endswith(MANIFEST) else None
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


def _url(fs, path: str) -> str:
    """A path of `fs` as a URL again (fsspec strips the scheme)."""
    return fs.unstrip_protocol(path)
