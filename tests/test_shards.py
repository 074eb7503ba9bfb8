"""Ingestion: table -> WebDataset shards, bad input, atomic and resumable writes."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import pandas as pd
import pytest
import torch
from PIL import Image

from make_dist.config import DataConfig, ModelConfig
from make_dist.data.schema import ColumnMap, Sample, load_column_map
from make_dist.data.shards import write_shards
from make_dist.data.stream import make_loader, shard_urls
from make_dist.errors import UserError
from make_dist.model import tokenizer

EXE = Path(sys.executable).parent / "make-dist"


def save_image(path, size=(80, 60), colour=(200, 50, 50), fmt="JPEG", mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour + (255,)).save(path, format=fmt)


@pytest.fixture(scope="module")
def tok():
    return tokenizer(ModelConfig(name="make-tiny"))


@pytest.fixture
def table(tmp_path):
    """Good rows of every shape, and a bad row for each way a row can fail."""
    img = tmp_path / "img"
    save_image(img / "a.jpg")
    save_image(img / "b.png", fmt="PNG", mode="RGBA")
    save_image(img / "big.jpg", size=(800, 600))
    (img / "garbage.jpg").write_bytes(b"this is not an image")
    full = io.BytesIO()
    Image.effect_noise((300, 300), 60).convert("RGB").save(full, format="JPEG")
    (img / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    rows = [
        # image, caption, disease, concepts, subtexts
        ("a.jpg", "Red plaque on the elbow. Itchy for years.", "inflammatory, psoriasis", "plaque, erythema", ""),
        ("b.png", "A dark mole", "", "hyperpigmentation", ""),
        ("big.jpg", "Blisters. In a band.", "infectious, herpes zoster", "", '["custom one", "custom two"]'),
        ("missing.jpg", "No file", "", "", ""),
        ("garbage.jpg", "Not an image", "", "", ""),
        ("truncated.jpg", "Cut short", "", "", ""),
        ("a.jpg", "   ", "", "", ""),
        ("a.jpg", "Bad subtexts", "", "", "[oops"),
        ("", "No image path", "", "", ""),
    ]
    frame = pd.DataFrame(rows, columns=["image", "caption", "disease", "concepts", "subtexts"])
    path = tmp_path / "table.csv"
    frame.to_csv(path, index=False)
    # a row whose caption holds bytes that are not UTF-8
    with open(path, "ab") as f:
        f.write(b'a.jpg,"caf\xe9 au lait macule",,,\n')
    return path, img


COLUMNS = ColumnMap(disease="disease", concepts="concepts", subtexts="subtexts")
GOOD = {0, 1, 2}


def test_round_trip_exact_texts_and_masks(table, tmp_path, tok):
    path, img = table
    manifest = write_shards(str(path), str(tmp_path / "out"), COLUMNS, images_root=str(img), shard_size=4,
                            image_max_side=200, workers=2, progress=False)
    assert manifest["samples"] == 3 and manifest["shards"] == ["shard-000000.tar"]
    reasons = {s["row"]: s["reason"] for s in manifest["skipped"]}
    assert reasons[3] == "image not found"
    assert reasons[4].startswith("image unreadable") and reasons[5].startswith("image unreadable")
    assert "empty caption" in reasons[6] and "not a JSON list" in reasons[7]
    assert "no image path" in reasons[8] and "not valid UTF-8" in reasons[9]
    assert set(reasons) | GOOD == set(range(10))
    assert json.loads((tmp_path / "out/manifest.json").read_text()) == manifest

    with tarfile.open(tmp_path / "out/shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert set(members) == {f"{r:09d}.{e}" for r in GOOD for e in ("jpg", "json")}
    big = Image.open(io.BytesIO(members["000000002.jpg"]))
    assert big.format == "JPEG" and max(big.size) == 200  # downscaled at write time
    assert Image.open(io.BytesIO(members["000000001.jpg"])).mode == "RGB"  # RGBA PNG re-encoded

    data = DataConfig(train_shards=str(tmp_path / "out/manifest.json"), batch_size=8, subtexts=4, augment=False,
                      resampled=False, shuffle_buffer=0, num_workers=0)
    (batch,) = list(make_loader(data, tok, image_size=32))
    assert batch.keys == [f"{r:09d}" for r in sorted(GOOD)]
    assert batch.image.shape == (3, 3, 32, 32) and batch.tokens.shape == (3, 7, 77)
    want = [
        ["Red plaque on the elbow. Itchy for years.", "This is a skin photo diagnosed as inflammatory, psoriasis.",
         "This skin photo shows plaque, erythema.", "Red plaque on the elbow", "Itchy for years", None, None],
        ["A dark mole", None, "This skin photo shows hyperpigmentation.", "A dark mole", None, None, None],
        ["Blisters. In a band.", "This is a skin photo diagnosed as infectious, herpes zoster.", None,
         "custom one", "custom two", None, None],
    ]
    for b, texts in enumerate(want):
        assert batch.mask[b].tolist() == [t is not None for t in texts]
        for n, text in enumerate(texts):
            expected = tok([text])[0] if text else torch.zeros(77, dtype=torch.long)
            assert torch.equal(batch.tokens[b, n], expected), (b, n)


def test_make_example_layout(tmp_path, repo_root, tok):
    img = tmp_path / "img"
    save_image(img / "e1.jpg")
    row = {"filename": "e1.jpg", "truncated_caption": "Scaly plaques. On the knee.",
           "ontology_caption": "This is a skin photo diagnosed as inflammatory, psoriasis.",
           "visual_concept_caption": "This skin photo shows plaque, scale.",
           **{f"subcaption_{i}": "" for i in range(1, 9)},
           "sub_caption_mask": "[1, 1, 0, 0, 0, 0, 0, 0]", "knowledge_masks": "[1, 1, 1]"}
    row["subcaption_1"], row["subcaption_2"] = "Scaly plaques", "On the knee"
    pd.DataFrame([row]).to_parquet(tmp_path / "example.parquet")
    columns = load_column_map(repo_root / "configs/columns/make_example.yaml")
    manifest = write_shards(str(tmp_path / "example.parquet"), str(tmp_path / "out"), columns,
                            images_root=str(img), workers=1, progress=False)
    assert manifest["samples"] == 1
    with tarfile.open(tmp_path / "out/shard-000000.tar") as tar:
        record = json.loads(tar.extractfile("000000000.json").read())
    assert Sample.from_json(record).texts(2) == [
        row["truncated_caption"], row["ontology_caption"], row["visual_concept_caption"], "Scaly plaques", "On the knee"]


def test_the_authors_csv_with_masks_switching_slots_off(tmp_path, repo_root):
    """The authors' MAKE-format CSV as they write it (every column of their
    example, masks as "[1, 0, ...]" text): a slot its mask switches off is
    missing in the shard even where its cell holds text; a row whose mask
    switches its caption off is skipped with the reason."""
    import csv

    img = tmp_path / "img"
    header = ("filename,caption,truncated_caption,source,source_type,standardized_disease,ontology_final,"
              "skin_concept_standarized,augmented_caption,body_location,symptoms,age,gender,visual_concept_caption,"
              "ontology_caption,sub_captions,subcaption_1,subcaption_2,subcaption_3,subcaption_4,subcaption_5,"
              "subcaption_6,subcaption_7,subcaption_8,sub_caption_mask,knowledge_masks").split(",")

    def row(name, sub_mask, knowledge_mask):
        save_image(img / name)
        cells = dict.fromkeys(header, "")
        cells.update(filename=name, caption="Itchy papules. On the arm.",
                     truncated_caption="Itchy papules. On the arm.",
                     ontology_caption="This is a skin photo diagnosed as inflammatory, eczema.",
                     visual_concept_caption="This skin photo shows papule.", sub_captions="2",
                     subcaption_1="Itchy papules", subcaption_2="On the arm", subcaption_3="left over text",
                     sub_caption_mask=sub_mask, knowledge_masks=knowledge_mask)
        return [cells[h] for h in header]

    with open(tmp_path / "MAKE_training.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerow(row("a.jpg", "[1, 1, 0, 0, 0, 0, 0, 0]", "[1, 1, 1]"))
        writer.writerow(row("b.jpg", "[0, 1, 0, 0, 0, 0, 0, 0]", "[1, 0, 0]"))
        writer.writerow(row("c.jpg", "[1, 1, 0, 0, 0, 0, 0, 0]", "[0, 1, 1]"))
    manifest = write_shards(str(tmp_path / "MAKE_training.csv"), str(tmp_path / "out"),
                            load_column_map(repo_root / "configs/columns/make_example.yaml"),
                            images_root=str(img), workers=1, progress=False)
    assert manifest["samples"] == 2
    (skipped,) = manifest["skipped"]
    assert skipped["row"] == 2 and "its caption is switched off (column 'knowledge_masks' = [0, 1, 1])" \
        in skipped["reason"]
    with tarfile.open(tmp_path / "out/shard-000000.tar") as tar:
        a, b = (Sample.from_json(json.loads(tar.extractfile(f"00000000{i}.json").read())) for i in (0, 1))
    assert a.texts(8)[1:5] == ["This is a skin photo diagnosed as inflammatory, eczema.",
                               "This skin photo shows papule.", "Itchy papules", "On the arm"]
    assert a.texts(8)[5] is None  # "left over text": its mask is 0
    assert b.texts(8)[1:4] == [None, None, "On the arm"] and b.texts(8)[4] is None


def test_parquet_typed_fields(tmp_path):
    img = tmp_path / "img"
    save_image(img / "a.jpg")
    frame = pd.DataFrame({"image": ["a.jpg", "a.jpg", "a.jpg"], "caption": ["Fine.", None, "Also fine."],
                          "label": ["x", "y", "z"]})
    frame["count"] = [1, 2, 3]
    frame.to_parquet(tmp_path / "t.parquet")
    with pytest.raises(UserError) as caught:  # no row makes a sample: a failed run, which says why
        write_shards(str(tmp_path / "t.parquet"), str(tmp_path / "out"), ColumnMap(label="count"),
                     images_root=str(img), workers=1, progress=False)
    assert "row 1 a.jpg: empty caption" in str(caught.value)
    assert "row 0 a.jpg: label (column 'count') is int 1, not text" in str(caught.value)
    assert not (tmp_path / "out").exists()  # and leaves no folder behind


def test_parquet_list_column_of_subtexts(tmp_path):
    """Parquet holds lists natively: each row keeps its own subtexts."""
    img = tmp_path / "img"
    save_image(img / "a.jpg")
    frame = pd.DataFrame({"image": ["a.jpg", "a.jpg"], "caption": ["One. Two.", "Three."],
                          "subtexts": [["first", "second"], []]})
    frame.to_parquet(tmp_path / "t.parquet")
    manifest = write_shards(str(tmp_path / "t.parquet"), str(tmp_path / "out"), ColumnMap(subtexts="subtexts"),
                            images_root=str(img), workers=1, progress=False)
    assert manifest["samples"] == 2 and manifest["skipped"] == []
    with tarfile.open(tmp_path / "out/shard-000000.tar") as tar:
        records = [json.loads(tar.extractfile(f"00000000{i}.json").read()) for i in range(2)]
    assert [r["subtexts"] for r in records] == [["first", "second"], ["Three"]]


def test_table_errors_name_file_and_column(tmp_path):
    from make_dist.errors import UserError

    (tmp_path / "t.csv").write_text("img,caption\na.jpg,x\n")
    with pytest.raises(UserError, match=r"t\.csv: no column 'image' \(the table has: img, caption\)"):
        write_shards(str(tmp_path / "t.csv"), str(tmp_path / "o"), ColumnMap(), progress=False)
    (tmp_path / "e.csv").write_text("image,caption\n")
    with pytest.raises(UserError, match="no rows"):
        write_shards(str(tmp_path / "e.csv"), str(tmp_path / "o"), ColumnMap(), progress=False)
    with pytest.raises(UserError, match="table not found"):
        write_shards(str(tmp_path / "nope.csv"), str(tmp_path / "o"), ColumnMap(), progress=False)


def test_memory_fs_shards_and_stream(tmp_path, tok):
    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 10)).save(buf, format="JPEG")
    fs.pipe("/src/images/g.jpg", buf.getvalue())
    pd.DataFrame({"image": ["g.jpg"] * 5, "caption": [f"Green {i}. Round." for i in range(5)]}).to_csv(
        tmp_path / "t.csv", index=False)
    manifest = write_shards(str(tmp_path / "t.csv"), "memory://shards", ColumnMap(),
                            images_root="memory://src/images", shard_size=2, workers=1, progress=False)
    assert manifest["samples"] == 5 and len(manifest["shards"]) == 3
    assert fs.exists("/shards/shard-000002.tar") and fs.exists("/shards/manifest.json")
    assert len(shard_urls("memory://shards/manifest.json")) == 3
    data = DataConfig(train_shards="memory://shards/manifest.json", batch_size=2, augment=False, resampled=False,
                      shuffle_buffer=0, num_workers=0)
    assert sum(len(b) for b in make_loader(data, tok, image_size=32)) == 5


def test_interrupted_run_leaves_no_corrupt_shard_and_resumes(tmp_path):
    """Kill a real `make-dist shards` mid-run, look at what it left, run it again."""
    img = tmp_path / "img"
    for i in range(4):
        save_image(img / f"{i}.jpg", size=(256, 256), colour=(40 * i, 90, 90))
    rows = 600
    pd.DataFrame({"image": [f"{i % 4}.jpg" for i in range(rows)],
                  "caption": [f"Case {i}. Seen today." for i in range(rows)]}).to_csv(tmp_path / "t.csv", index=False)
    mapping = tmp_path / "cols.yaml"
    mapping.write_text("image: image\ncaption: caption\n")
    out = tmp_path / "out"
    cmd = [str(EXE), "shards", "--table", str(tmp_path / "t.csv"), "--images-root", str(img), "--out", str(out),
           "--columns", str(mapping), "--shard-size", "10", "--image-max-side", "128", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "_parts/shard-000002.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("shard-*.tar"))
    assert 3 <= len(done) < rows // 10, "the kill should land mid-run"
    for name in done:  # every visible shard is whole
        with tarfile.open(out / name) as tar:
            assert len(tar.getnames()) == 20
    assert not (out / "manifest.json").exists()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == rows and len(manifest["shards"]) == rows // 10 and manifest["skipped"] == []


def test_a_rerun_with_another_table_or_options_is_refused(tmp_path):
    """The folder's job record: a rerun into the same --out must be the same
    job, or the new table's rows would never be written beside the old shards."""
    img = tmp_path / "img"
    save_image(img / "a.jpg")
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    pd.DataFrame({"image": ["a.jpg"] * 4, "caption": [f"Old {i}." for i in range(4)]}).to_csv(first, index=False)
    pd.DataFrame({"image": ["a.jpg"] * 4, "caption": [f"New {i}." for i in range(4)]}).to_csv(second, index=False)
    out = tmp_path / "out"
    write_shards(str(first), str(out), ColumnMap(), images_root=str(img), shard_size=2, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    with pytest.raises(UserError, match=r"--out .*out holds shards of another job \(from .*first\.csv\); what "
                                        r"differs: the table's content\. .*write to another --out, or remove"):
        write_shards(str(second), str(out), ColumnMap(), images_root=str(img), shard_size=2, workers=1, progress=False)
    with pytest.raises(UserError, match=r"what differs: image_max_side \(None then, 32 now\)"):
        write_shards(str(first), str(out), ColumnMap(), images_root=str(img), shard_size=2, image_max_side=32,
                     workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == before  # nothing touched
    assert json.loads((out / "manifest.json").read_text())["table"] == str(first)
    again = write_shards(str(first), str(out), ColumnMap(), images_root=str(img) + "/", shard_size=2, workers=1,
                         progress=False)  # the same job (the root spelt otherwise): finished, not refused
    assert again["samples"] == 4


def test_image_paths_stay_under_the_images_root_unless_allowed(tmp_path):
    """'..', an absolute path and a URL in a table are not read (nor fetched)
    by default: skipped with the reason; --images-anywhere reads them."""
    import http.server
    import threading

    root, outside = tmp_path / "root", tmp_path / "outside"
    save_image(root / "in.jpg")
    save_image(outside / "x.jpg", colour=(10, 200, 10))
    fetched = []

    class Images(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(outside), **kwargs)

        def log_message(self, *args):
            fetched.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/x.jpg"
    try:
        paths = ["in.jpg", "../outside/x.jpg", str(outside / "x.jpg"), url, "sub/../in.jpg"]
        table = tmp_path / "t.csv"
        pd.DataFrame({"image": paths, "caption": [f"Case {i}." for i in range(5)]}).to_csv(table, index=False)
        cmd = [str(EXE), "shards", "--table", str(table), "--images-root", str(root), "--columns",
               str(tmp_path / "cols.yaml"), "--workers", "1"]
        (tmp_path / "cols.yaml").write_text("image: image\ncaption: caption\n")
        out = subprocess.run(cmd + ["--out", str(tmp_path / "confined")], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        manifest = json.loads((tmp_path / "confined/manifest.json").read_text())
        assert manifest["samples"] == 2  # in.jpg, and sub/../in.jpg (inside the root)
        assert {s["row"] for s in manifest["skipped"]} == {1, 2, 3}
        assert all("leaves the images root" in s["reason"] and "--images-anywhere" in s["reason"]
                   for s in manifest["skipped"])
        assert fetched == []  # the URL was never requested
        out = subprocess.run(cmd + ["--out", str(tmp_path / "anywhere"), "--images-anywhere"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads((tmp_path / "anywhere/manifest.json").read_text())["samples"] == 5 and fetched
    finally:
        server.shutdown()


def test_a_failed_run_leaves_no_out_folder(tmp_path):
    """A table none of whose rows makes a sample: the command fails saying why
    and removes the --out it made; a folder that was there is left as it was."""
    table = tmp_path / "t.csv"
    pd.DataFrame({"image": ["gone.jpg", "also-gone.jpg"], "caption": ["A.", "B."]}).to_csv(table, index=False)
    (tmp_path / "cols.yaml").write_text("image: image\ncaption: caption\n")
    cmd = [str(EXE), "shards", "--table", str(table), "--images-root", str(tmp_path), "--columns",
           str(tmp_path / "cols.yaml"), "--workers", "1"]
    out = subprocess.run(cmd + ["--out", str(tmp_path / "new")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no row of" in out.stderr and "row 0 gone.jpg: image not found" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept/notes.txt").write_text("mine")
    out = subprocess.run(cmd + ["--out", str(tmp_path / "kept")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and (tmp_path / "kept/notes.txt").read_text() == "mine"
    # the mistake corrected (the images are elsewhere): the failed job's records do not stand in the way
    save_image(tmp_path / "img/gone.jpg")
    save_image(tmp_path / "img/also-gone.jpg")
    cmd[cmd.index("--images-root") + 1] = str(tmp_path / "img")
    out = subprocess.run(cmd + ["--out", str(tmp_path / "kept")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "holds no sample of the earlier job" in out.stdout, out.stderr
    assert json.loads((tmp_path / "kept/manifest.json").read_text())["samples"] == 2
