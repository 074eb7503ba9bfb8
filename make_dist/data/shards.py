"""Ingestion: a table of images and captions -> WebDataset tar shards (`make-dist shards`).

    OUT/shard-000000.tar ...     {key}.jpg and {key}.json (schema.Sample.to_json)
    OUT/manifest.json            samples, shards, skipped [{row, image, reason}], ...
    OUT/_parts/shard-NNNNNN.json one record per finished shard (what a rerun skips)
    OUT/_parts/job.json          what the shards are made of: the table's digest, the columns, the options

Shard i holds the usable rows of table rows [i * shard_size, (i + 1) * shard_size).
A shard is written under a temporary name and renamed when complete, then
its part record is written: an interrupted run leaves no corrupt shard, and a
rerun redoes only the shards without a part record. A rerun must be the same
job (the same table content, column map and options, `job.json`): another
one is refused, since its shards would mix with the first's. A run that
fails before any shard is complete removes the --out folder it created.

A row that cannot become a sample (missing or unreadable image, an image
path that leaves the images root, empty caption, a badly typed or
undecodable field) is skipped, and its reason lands in the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import dataclasses
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import fsspec
from PIL import Image

from ..config import Config
from ..errors import UserError
from ..files import (OutsideRoot, atomic_writer, check_writable, image_location, open_image, read_bytes,
                     storage_problem, write_atomic)
from ..slots import DEFAULT_K
from .schema import ColumnMap, RowError

MANIFEST = "manifest.json"
PARTS = "_parts"
JOB = "job.json"  # in PARTS
JPEG_QUALITY = 90


def read_table(path: str, data: bytes | None = None) -> list[dict[str, Any]]:
    """Rows of a CSV or Parquet table (local path or fsspec URL; or its bytes,
    `data`, already read) as dicts.

    CSV cells are read as text; bytes that are not UTF-8 are kept escaped so
    the row they sit in can be skipped with a reason rather than failing the
    whole file.
    """
    import pandas as pd

    source = io.BytesIO(data) if data is not None else path
    try:
        if path.endswith((".parquet", ".pq")):
            frame = pd.read_parquet(source)
        else:
            frame = pd.read_csv(source, dtype=object, keep_default_na=False, encoding_errors="surrogateescape")
    except FileNotFoundError:
        raise UserError(f"table not found: {path}") from None
    except Exception as e:  # a table that does not parse at all
        raise UserError(f"{path}: cannot read the table: {e}") from None
    return frame.to_dict("records")


def table_rows(table: str, columns: list[str], data: bytes | None = None) -> list[dict[str, Any]]:
    """The rows of a table that must not be empty and must have these columns."""
    rows = read_table(table, data)
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
                max_side: int | None, k: int, anywhere: bool = False) -> Prepared:
    """Texts and image of one row (runs in a worker process)."""
    path = cells.get(columns.image)
    if not isinstance(path, str) or not path.strip():
        return Prepared(row, str(path), reason=f"no image path (column {columns.image!r})")
    try:
        sample = columns.sample(cells, k)
    except RowError as e:
        return Prepared(row, path, reason=str(e))
    try:
        jpeg = load_image(image_location(path, images_root, anywhere), max_side, JPEG_QUALITY)
    except OutsideRoot as e:
        return Prepared(row, path, reason=str(e))
    except FileNotFoundError:
        return Prepared(row, path, reason="image not found")
    except Exception as e:  # unreadable, truncated, not an image
        return Prepared(row, path, reason=f"image unreadable: {type(e).__name__}: {e}")
    return Prepared(row, path, record=sample.to_json(), jpeg=jpeg)


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
                 workers: int | None = None, progress: bool = True, images_anywhere: bool = False) -> dict:
    """Write (or finish writing) the shards of a table; returns the manifest.
    images_anywhere: read image paths that leave images_root (absolute
    paths, '..', URLs) as written; by default such a row is skipped."""
    if shard_size < 1:
        raise UserError("shards: --shard-size must be >= 1")
    try:
        data = read_bytes(table)
    except FileNotFoundError:
        raise UserError(f"table not found: {table}") from None
    except Exception as e:
        raise UserError(f"--table {table}: {storage_problem(e)}") from None
    rows = table_rows(table, columns.used(), data)
    job = {"table": table, "table_sha256": hashlib.sha256(data).hexdigest(), "rows": len(rows),
           "columns": dataclasses.asdict(columns),
           "images_root": os.path.abspath(images_root) if images_root and "://" not in images_root else images_root,
           "images_anywhere": images_anywhere,
           "shard_size": shard_size, "image_max_side": image_max_side, "subtexts": k, "jpeg_quality": JPEG_QUALITY}
    fs, root = fsspec.core.url_to_fs(out)
    created = not fs.exists(root)
    try:
        check_writable(out, "--out")
        return _write_job(fs, root, out, rows, columns, job, workers, progress)
    except BaseException:
        if created:
            _remove_if_no_sample(fs, root)
        raise


def _remove_if_no_sample(fs, root: str) -> None:
    """A folder this run made that holds no sample is removed (never failing
    over the error that brought us here)."""
    try:
        if not _has_samples(fs, root):
            fs.rm(root, recursive=True)
    except Exception:
        pass


def _write_job(fs, root: str, out: str, rows: list[dict], columns: ColumnMap, job: dict, workers: int | None,
               progress: bool) -> dict:
    from tqdm import tqdm

    _same_job(fs, root, out, job)
    shard_size = job["shard_size"]
    n_shards = (len(rows) + shard_size - 1) // shard_size
    done = _finished_parts(fs, root)
    todo = [i for i in range(n_shards) if i not in done]
    if done:
        print(f"shards: {len(done)} of {n_shards} shards already complete in {out}; writing the other {len(todo)}")

    bar = tqdm(total=sum(len(_rows_of(i, shard_size, len(rows))) for i in todo), desc="shards",
               unit="row", disable=not progress)
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:

        def submit(i):  # map() submits at once: the workers run ahead of the writer
            jobs = [(r, rows[r], columns, job["images_root"], job["image_max_side"], job["subtexts"],
                     job["images_anywhere"]) for r in _rows_of(i, shard_size, len(rows))]
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

    if not _has_samples(fs, root):
        parts = _finished_parts(fs, root)
        skipped = [s for i in sorted(parts) for s in parts[i]["skipped"]]
        shown = "; ".join(f"row {s['row']} {s['image']}: {s['reason']}" for s in skipped[:3])
        raise UserError(f"shards: no row of {job['table']} became a sample ({len(skipped)} skipped; {shown}"
                        f"{' ...' if len(skipped) > 3 else ''})")
    manifest = _manifest(fs, root, out, job["table"], n_shards, shard_size, job["subtexts"])
    print(f"shards: {manifest['samples']} samples in {len(manifest['shards'])} shards at {out}; "
          f"skipped {len(manifest['skipped'])} rows (reasons in {out.rstrip('/')}/{MANIFEST})")
    return manifest


def _same_job(fs, root: str, out: str, job: dict) -> None:
    """Record the job in a new folder; in one that holds shards, it must be the
    job that wrote them (a rerun finishes it): another table, column map or
    option would leave shards of two jobs under one manifest. A folder whose
    earlier job wrote no sample (it failed: a wrong --images-root, say) starts afresh."""
    path = f"{root}/{PARTS}/{JOB}"
    try:
        recorded = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        if _finished_parts(fs, root):
            raise UserError(f"--out {out} holds shards with no record of what they were made from (an older "
                            f"make-dist wrote them): write to an empty folder, or remove {out} first") from None
        write_atomic(_url(fs, path), json.dumps(job, indent=1))
        return
    except ValueError:
        raise UserError(f"{_url(fs, path)}: damaged; remove {out} and write the shards again") from None
    differ = [k for k in job if k != "table" and recorded.get(k) != job[k]]
    if differ and not _has_samples(fs, root):
        print(f"shards: {out} holds no sample of the earlier job (from {recorded.get('table')}): starting afresh")
        fs.rm(f"{root}/{PARTS}", recursive=True)
        write_atomic(_url(fs, path), json.dumps(job, indent=1))
        return
    if differ:
        named = {"table_sha256": "the table's content", "rows": "the table's rows"}
        shown = ", ".join(named.get(k, f"{k} ({recorded.get(k)!r} then, {job[k]!r} now)") for k in differ)
        raise UserError(f"--out {out} holds shards of another job (from {recorded.get('table')}); what differs: "
                        f"{shown}. Its shards would mix with this job's: write to another --out, or remove {out} "
                        f"to start afresh")


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


def _finished_parts(fs, root: str) -> dict[int, dict]:
    """The part records of the shards finished so far, by shard index."""
    parts = {}
    for path in fs.glob(f"{root}/{PARTS}/shard-*.json"):
        parts[int(path.rpartition("shard-")[2][:-len(".json")])] = json.loads(fs.cat_file(path))
    return parts


def _has_samples(fs, root: str) -> bool:
    """Whether a finished shard of the folder holds a sample (a failed job's parts hold only skipped rows)."""
    return any(p["samples"] for p in _finished_parts(fs, root).values())


def _manifest(fs, root: str, out: str, table: str, n_shards: int, shard_size: int, k: int) -> dict:
    parts = _finished_parts(fs, root)
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
