"""A small fake copy of the authors' data/ folder (docs/evaluation.md): random
images, a few rows per set, each set exercising one way the authors' files
name their images."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

SKINCON_CONCEPTS = ["Vesicle", "", "Papule", "Brown(Hyperpigmentation)", "Erythema"]  # a blank line, mixed case
DERM7PT_CONCEPTS = ["pigment network", "blue whitish veil", "streaks"]


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_paper_data(root: Path, sets=("PAD", "F17K", "SNU", "skincon", "derm7pt", "skin_cap")) -> Path:
    """root/data/<set>/...; SD-128 is left out (a missing set). Returns root/data."""
    data = root / "data"
    if "PAD" in sets:  # paths as the authors write them: relative to the folder above data/
        rows = []
        for i, label in enumerate([0, 1, 2, 3, 4, 5, 5, 1, 2]):
            _image(data / f"PAD/images/PAT_{i}_1_{i}.png", i)
            rows.append([f"data/PAD/images/PAT_{i}_1_{i}.png", label, "x"])
        rows[4][0] = "old/location/PAT_4_1_4.png"  # moved since: found by name in PAD/images/
        _csv(data / "PAD/MAKE_PAD.csv", ["filename", "label", "diag"], rows)
    if "F17K" in sets:  # bare file names: found in the set's own images/
        rows = []
        for i in range(7):
            _image(data / f"F17K/images/{i:032x}.jpg", 100 + i)
            rows.append([f"{i:032x}.jpg", (i * 17) % 114])
        _csv(data / "F17K/MAKE_F17K.csv", ["filename", "label"], rows)
    if "SNU" in sets:  # one image missing, one not an image: counted, never dropped silently
        rows = []
        for i in range(6):
            _image(data / f"SNU/images/cyst_{i}.jpg", 200 + i)
            rows.append([f"data/SNU/images/cyst_{i}.jpg", 133 - i])
        rows.append(["data/SNU/images/gone.jpg", 0])
        (data / "SNU/images/broken.jpg").write_bytes(b"not a jpeg")
        rows.append(["data/SNU/images/broken.jpg", 1])
        _csv(data / "SNU/MAKE_SNU.csv", ["filename", "label"], rows)
    for name, concepts, suffix in (("skincon", SKINCON_CONCEPTS, "png"), ("derm7pt", DERM7PT_CONCEPTS, "jpg")):
        if name not in sets:
            continue
        listed = [c for c in concepts if c]
        (data / name).mkdir(parents=True, exist_ok=True)
        (data / name / "concept_list.txt").write_text("\n".join(concepts) + "\n")
        rows = []
        for i in range(8):
            _image(data / f"{name}/final_images/{i:06d}.{suffix}", 300 + i)
            rows.append([f"{i:06d}.{suffix}"] + [(i >> j) & 1 for j in range(len(listed))])
        _csv(data / f"{name}/meta.csv", ["ImageID"] + [c.replace(" ", "_") for c in listed], rows)
    if "skin_cap" in sets:  # 12 rows of one image and one caption: every similarity ties
        _image(data / "skin_cap/images/same.png", 400)
        rows = [["data/skin_cap/images/same.png", "a red scaly plaque on the elbow", "红色斑块", i]
                for i in range(12)]
        _csv(data / "skin_cap/skin_cap_meta.csv", ["filename", "caption_zh_polish_en", "caption_zh", "id"], rows)
    return data
