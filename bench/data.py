"""Loader speed per CPU core: make-dist's shard stream against a CSV + PIL Dataset.

    .venv/bin/python bench/data.py [--n 400] [--source-size 800] [--size 224] [--max-side 320]

Both sides do the same work per sample: decode the image, the paper's
training augmentation (docs/spec.md, section 6) at --size px, and tokenise the sample's present texts
(of N = K + 3 slots). The baseline (the authors' approach) opens each ~800 px
source image from a folder through a CSV and tokenises in one plain call;
make-dist reads tar shards written with images downscaled to --max-side,
decodes JPEGs at a reduced DCT scale where that still covers the crop, and
caches the tokens of texts that repeat (aspect texts). Each side runs in one process with one torch thread
(samples/s per core), then make-dist also with 2 loader workers.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import torch

from make_dist.config import DataConfig, ModelConfig
from make_dist.data.schema import ColumnMap, load_column_map
from make_dist.data.shards import write_shards
from make_dist.data.stream import image_transform, make_loader
from make_dist.data.synth import synthesize
from make_dist.files import open_image, read_bytes
from make_dist.model import tokenizer

ROOT = Path(__file__).resolve().parents[1]


class CsvPilDataset(torch.utils.data.Dataset):
    """The baseline: one row of a CSV per sample, the full-size image from disk,
    the sample's texts tokenised in one plain tokenizer call."""

    def __init__(self, table: Path, images_root: Path, columns: ColumnMap, tok, size: int, k: int = 8):
        with open(table, newline="") as f:
            self.rows = list(csv.DictReader(f))
        self.root, self.columns, self.tok, self.k = images_root, columns, tok, k
        self.transform = image_transform(size, train=True)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        image = self.transform(open_image(read_bytes(str(self.root / row["image"]))).convert("RGB"))  # full decode
        slots = self.columns.sample(row).texts(self.k)
        tokens = torch.zeros(len(slots), 77, dtype=torch.long)
        present = [n for n, t in enumerate(slots) if t]
        tokens[present] = self.tok([slots[n] for n in present])
        mask = torch.zeros(len(slots), dtype=torch.bool)
        mask[present] = True
        return image, tokens, mask


def rate(loader, n_expected: int) -> float:
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)
    elapsed = time.perf_counter() - start
    assert n >= n_expected * 0.9, (n, n_expected)
    return n / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="samples")
    p.add_argument("--source-size", type=int, default=800, help="side of the source images")
    p.add_argument("--size", type=int, default=224, help="training crop")
    p.add_argument("--max-side", type=int, default=320, help="longer side of images stored in shards")
    p.add_argument("--work", default=None, help="folder for the data (default: a temporary one)")
    args = p.parse_args()
    torch.set_num_threads(1)

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-data-"))
    if not (work / "src/train.csv").exists():
        print(f"synthesising {args.n} images of {args.source_size} px in {work}/src ...")
        synthesize(work / "src", n=args.n, n_eval=1, size=args.source_size, seed=1, progress=False)
    columns = load_column_map(ROOT / "configs/columns/synthetic.yaml")
    if not (work / "shards/manifest.json").exists():
        write_shards(str(work / "src/train.csv"), str(work / "shards"), columns, images_root=str(work / "src"),
                     shard_size=100, image_max_side=args.max_side, progress=False)
    tok = tokenizer(ModelConfig(name="make-tiny"))
    mb = lambda paths: sum(os.path.getsize(p) for p in paths) / 1e6  # noqa: E731
    src_mb = mb((work / "src/images/train").glob("*.jpg"))
    shard_mb = mb((work / "shards").glob("*.tar"))

    baseline = torch.utils.data.DataLoader(CsvPilDataset(work / "src/train.csv", work / "src", columns, tok, args.size),
                                           batch_size=32, num_workers=0)
    rate(baseline, args.n)  # warm the page cache, as the shards' writer did for its side
    base = rate(baseline, args.n)

    def ours(workers: int) -> float:
        per_worker = max(1, args.n // 32 // max(1, workers))
        data = DataConfig(train_shards=str(work / "shards/manifest.json"), batch_size=32, augment=True,
                          resampled=True, num_workers=workers, shuffle_buffer=200)
        loader = make_loader(data, tok, image_size=args.size, batches_per_worker=per_worker)
        return rate(loader, per_worker * max(1, workers) * 32)

    ours(0)
    one = ours(0)
    two = ours(2)
    print()
    print("| loader | samples/s | per core | vs baseline |")
    print("|---|---|---|---|")
    print(f"| CSV + PIL, {args.source_size} px JPEGs ({src_mb:.0f} MB), 1 process | {base:.0f} | {base:.0f} | 1.00x |")
    print(f"| make-dist shards, max side {args.max_side} ({shard_mb:.0f} MB), 1 process | {one:.0f} | {one:.0f} | {one / base:.2f}x |")
    print(f"| make-dist shards, 2 loader workers | {two:.0f} | {two / 2:.0f} | {two / 2 / base:.2f}x |")
    print(f"\ncores: {os.cpu_count()}, crop {args.size} px, training augmentation, {args.n} samples, tokenised texts")


if __name__ == "__main__":
    main()
