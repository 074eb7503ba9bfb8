"""The synthetic dermatology set: ontology, determinism, tables, visible concepts."""

import csv
import hashlib

import numpy as np
import pytest
import yaml
from PIL import Image

from make_dist.data.synth import CONCEPTS, DISEASES, SUPERCLASSES, synthesize


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, n=120, n_eval=60, size=96, seed=3, workers=2, progress=False)
    return out


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_ontology_size():
    assert len(DISEASES) >= 10 and len({d.superclass for d in DISEASES}) >= 3 and len(CONCEPTS) >= 15
    assert all(d.synonyms for d in DISEASES) and set(d.superclass for d in DISEASES) <= set(SUPERCLASSES)
    assert all(set(d.profile) <= set(CONCEPTS) for d in DISEASES)


def test_tables_and_images(synth):
    train = read(synth / "train.csv")
    assert len(train) == 120 and set(train[0]) == {"image", "caption", "disease", "concepts", "label"}
    for row in train:
        image = Image.open(synth / row["image"])
        assert image.size == (96, 96)
        assert len(row["caption"].split(". ")) >= 3  # multi-sentence
    # some rows miss their structured fields, as real data does
    assert 0 < sum(not r["disease"] for r in train) < 60 and 0 < sum(not r["concepts"] for r in train) < 60
    assert {r["label"] for r in train} <= {d.name for d in DISEASES}
    classify, concepts, retrieval = (read(synth / f"eval/{t}.csv") for t in ("classify", "concepts", "retrieval"))
    assert len(classify) == len(concepts) == len(retrieval) == 60
    assert set(concepts[0]) == {"image", *CONCEPTS} and {concepts[0][c] for c in CONCEPTS} <= {"0", "1"}
    assert not set(r["image"] for r in classify) & set(r["image"] for r in train)  # held out
    classes = yaml.safe_load((synth / "classes.yaml").read_text())
    assert set(classes) == {d.name for d in DISEASES}


def test_the_fraction_of_captions_naming_the_disease_is_a_parameter(tmp_path):
    """As in Derm1M, captions often omit the diagnosis; the disease text (when
    the row has one) always names it."""
    def naming(named):
        synthesize(tmp_path / str(named), n=400, n_eval=1, size=32, seed=1, workers=2, progress=False, named=named)
        rows = read(tmp_path / str(named) / "train.csv")
        names = {d.name: (d.name, *d.synonyms) for d in DISEASES}
        in_caption = sum(any(n.lower() in r["caption"].lower() for n in names[r["label"]]) for r in rows)
        assert all(r["label"] in r["disease"] for r in rows if r["disease"])
        return in_caption / len(rows)

    assert naming(0.0) == 0
    assert 0.2 < naming(0.3) < 0.4
    assert naming(1.0) == 1
    with pytest.raises(ValueError, match="named"):
        synthesize(tmp_path / "bad", n=1, size=32, named=1.5)


def test_deterministic_given_seed(synth, tmp_path):
    synthesize(tmp_path, n=120, n_eval=60, size=96, seed=3, workers=1, progress=False)
    assert (tmp_path / "train.csv").read_text() == (synth / "train.csv").read_text()
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "images/train/000007.jpg") == digest(synth / "images/train/000007.jpg")
    synthesize(tmp_path / "other", n=120, n_eval=5, size=96, seed=4, workers=1, progress=False)
    assert (tmp_path / "other/train.csv").read_text() != (synth / "train.csv").read_text()  # another seed, other data


def test_concepts_are_visible(synth):
    """Concept labels show in the pixels: erythema is redder, hyperpigmentation darker,
    hypopigmentation lighter, relative to the image's own skin at the border."""
    rows = read(synth / "eval/concepts.csv")

    def stat(row):
        x = np.asarray(Image.open(synth / row["image"]), dtype=np.float32)
        skin = np.concatenate([x[:4].reshape(-1, 3), x[-4:].reshape(-1, 3)]).mean(0)
        centre = x[24:72, 24:72].reshape(-1, 3)
        # the pixels that differ most from the skin are the lesion's
        diff = np.abs(centre - skin).sum(1)
        lesion = centre[diff > np.percentile(diff, 80)].mean(0)
        return lesion - skin

    shift = [stat(r) for r in rows]  # lesion colour minus skin colour, RGB

    def mean_shift(concept, present, measure):
        return np.mean([measure(d) for d, r in zip(shift, rows) if (r[concept] == "1") == present])

    redness, brightness = (lambda d: d[0] - d[1]), (lambda d: d.sum())  # noqa: E731
    assert mean_shift("erythema", True, redness) > mean_shift("erythema", False, redness) + 10
    assert mean_shift("hyperpigmentation", True, brightness) < mean_shift("hyperpigmentation", False, brightness) - 30
