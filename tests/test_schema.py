"""The sample schema (docs/spec.md, section 1): slots, sentence decomposition, column maps."""

import math

import pytest

from make_dist.data.schema import (
    ColumnMap, RowError, Sample, concept_text, disease_text, load_column_map, split_sentences,
)
from make_dist.slots import n_slots


@pytest.mark.parametrize(
    "caption,k,want",
    [
        ("Red plaques on the elbows. Itchy for years!", 8, ["Red plaques on the elbows", "Itchy for years!"]),
        ("One? Two; three. Four.", 8, ["One?", "Two;", "three", "Four"]),
        ("A lesion of 3.5 cm on the back", 8, ["A lesion of 3.5 cm on the back"]),  # no sentence end
        ("  First.   Second.  ", 8, ["First", "Second"]),
        ("a. b. c. d.", 2, ["a", "b"]),  # keep the first K
        ("Ends without period. Then", 8, ["Ends without period", "Then"]),
        ("Dots... then more.", 8, ["Dots..", "then more"]),
        ("Itchy; red; scaly.", 8, ["Itchy;", "red;", "scaly"]),  # ';' ends a sentence too
        (".", 8, ["."]),  # no usable sentence: the caption itself, so every sample has one
    ],
)
def test_split_sentences(caption, k, want):
    assert split_sentences(caption, k) == want


def test_templates():
    assert disease_text("malignant, melanoma") == "This is a skin photo diagnosed as malignant, melanoma."
    assert concept_text(["plaque", " scale", "erythema"]) == "This skin photo shows plaque, scale, erythema."


def test_sample_slots():
    s = Sample(caption="Red plaque. Itchy.", disease_text="D.", concept_text=None)
    slots = s.texts(k=4)
    assert len(slots) == n_slots(4) == 7
    assert slots == ["Red plaque. Itchy.", "D.", None, "Red plaque", "Itchy", None, None]
    assert Sample.from_json(s.to_json()) == s


def test_knowledge_caption_puts_the_aspect_texts_first():
    """The paper's Derm1M-dagger baseline: slot 0 becomes disease text + concept
    text + caption (those present); the other slots are unchanged."""
    s = Sample(caption="Red plaque. Itchy.", disease_text="Diagnosed as psoriasis.", concept_text="Shows scale.")
    slots = s.texts(k=2, caption="knowledge")
    assert slots[0] == "Diagnosed as psoriasis. Shows scale. Red plaque. Itchy."
    assert slots[1:] == s.texts(k=2)[1:]
    assert Sample(caption="C.", concept_text="Shows scale.").texts(1, "knowledge")[0] == "Shows scale. C."
    assert Sample(caption="C.").texts(1, "knowledge")[0] == "C."


def test_structured_columns_are_templated():
    cols = ColumnMap(disease="disease", concepts="concepts", label="label", extra=["site"])
    row = {"image": "a.jpg", "caption": "Red plaque. Scaly.", "disease": "inflammatory, psoriasis",
           "concepts": "plaque, scale", "label": "psoriasis", "site": "elbow"}
    s = cols.sample(row)
    assert s.disease_text == "This is a skin photo diagnosed as inflammatory, psoriasis."
    assert s.concept_text == "This skin photo shows plaque, scale."
    assert s.subtexts == ["Red plaque", "Scaly"] and s.label == "psoriasis" and s.extra == {"site": "elbow"}


def test_missing_markers_and_nan_are_empty():
    cols = ColumnMap(disease="disease", concepts="concepts", missing=["", "nan", "no definitive diagnosis"])
    s = cols.sample({"image": "a", "caption": "C", "disease": "No definitive diagnosis", "concepts": math.nan})
    assert s.disease_text is None and s.concept_text is None


def test_subtexts_from_a_native_list_column(tmp_path):
    """A Parquet list column arrives as a numpy array per cell."""
    import pandas as pd

    frame = pd.DataFrame({"image": ["a", "b", "c"], "caption": ["C. D.", "E.", "F"],
                          "subs": [["x", " y ", ""], [], None]})
    frame.to_parquet(tmp_path / "t.parquet")
    rows = pd.read_parquet(tmp_path / "t.parquet").to_dict("records")
    cols = ColumnMap(subtexts="subs")
    assert [cols.sample(r).subtexts for r in rows] == [["x", "y"], ["E"], ["F"]]  # empty lists: the sentences
    with pytest.raises(RowError, match="not a list of texts"):
        cols.sample({"image": "a", "caption": "C", "subs": [1, 2]})


def test_subtexts_from_json_column():
    cols = ColumnMap(subtexts="subs")
    assert cols.sample({"image": "a", "caption": "C. D.", "subs": '["x", " y ", ""]'}).subtexts == ["x", "y"]
    assert cols.sample({"image": "a", "caption": "C. D.", "subs": ""}).subtexts == ["C", "D"]
    with pytest.raises(RowError, match="not a JSON list"):
        cols.sample({"image": "a", "caption": "C", "subs": "[oops"})


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"image": "a", "caption": "   "}, "empty caption"),
        ({"image": "a", "caption": math.nan}, "empty caption"),
        ({"image": "a", "caption": 42}, "caption \\(column 'caption'\\) is int 42, not text"),
        ({"image": "a", "caption": "bad \udcff byte"}, "not valid UTF-8"),
    ],
)
def test_bad_rows_raise_with_reason(row, reason):
    with pytest.raises(RowError, match=reason):
        ColumnMap().sample(row)


def test_shipped_mappings(repo_root):
    example = load_column_map(repo_root / "configs/columns/make_example.yaml")
    row = {"filename": "x.jpg", "truncated_caption": "Red. Scaly.", "ontology_caption": "This is a skin photo diagnosed as x.",
           "visual_concept_caption": "This skin photo shows y.", **{f"subcaption_{i}": "" for i in range(1, 9)},
           "sub_caption_mask": "[1, 1, 1, 0, 0, 0, 0, 0]", "knowledge_masks": "[1, 1, 1]"}
    row["subcaption_1"], row["subcaption_3"] = "first", "third"
    s = example.sample(row)
    assert s.disease_text == row["ontology_caption"] and s.concept_text == row["visual_concept_caption"]
    assert s.subtexts == ["first", "third"]
    derm = load_column_map(repo_root / "configs/columns/derm1m.yaml")
    s = derm.sample({"filename": "y.jpg", "truncated_caption": "C", "hierarchical_disease_label": "No definitive diagnosis",
                     "skin_concept": "papule, pustule", "disease_label": "acne", "body_location": "face", "source": "pubmed"})
    assert s.disease_text is None and s.concept_text == "This skin photo shows papule, pustule."
    assert load_column_map(repo_root / "configs/columns/synthetic.yaml").disease == "disease"


def test_the_authors_masks_switch_slots_off(repo_root):
    """MAKE-format rows: a slot whose mask entry is 0 is missing, whatever its
    cell holds; knowledge_masks reads [caption, disease, concept] (the order
    of the authors' training code); a bad or caption-less mask is the row's
    error, naming the column."""
    example = load_column_map(repo_root / "configs/columns/make_example.yaml")
    row = {"filename": "x.jpg", "truncated_caption": "Red plaque. Scaly.",
           "ontology_caption": "This is a skin photo diagnosed as x.",
           "visual_concept_caption": "This skin photo shows y.",
           **{f"subcaption_{i}": f"sentence {i}" for i in range(1, 9)},
           "sub_caption_mask": "[1, 0, 1, 0, 0, 0, 0, 0]", "knowledge_masks": "[1, 0, 1]"}
    s = example.sample(row)
    assert s.subtexts == ["sentence 1", "sentence 3"]
    assert s.disease_text is None and s.concept_text == row["visual_concept_caption"]
    assert s.texts(8)[:3] == [row["truncated_caption"], None, row["visual_concept_caption"]]
    s = example.sample(dict(row, knowledge_masks="[1, 1, 0]", sub_caption_mask=[0, 0, 0, 0, 0, 0, 0, 1]))
    assert (s.disease_text, s.concept_text, s.subtexts) == (row["ontology_caption"], None, ["sentence 8"])
    s = example.sample(dict(row, sub_caption_mask="[0, 0, 0, 0, 0, 0, 0, 0]"))  # none left: the caption's sentences
    assert s.subtexts == ["Red plaque", "Scaly"]
    with pytest.raises(RowError, match=r"its caption is switched off \(column 'knowledge_masks' = \[0, 1, 1\]\)"):
        example.sample(dict(row, knowledge_masks="[0, 1, 1]"))
    for bad in ("[1, 1]", "[1, 2, 1]", "yes", None):
        with pytest.raises(RowError, match="knowledge mask \\(column 'knowledge_masks'\\) is .*expected a list of 3"):
            example.sample(dict(row, knowledge_masks=bad))
    with pytest.raises(RowError, match="subtext mask .*'sub_caption_mask'.* expected a list of 8 zeros and ones"):
        example.sample(dict(row, sub_caption_mask="[1, 1, 1]"))


def test_bad_mapping_names_file(tmp_path):
    from make_dist.errors import ConfigError

    path = tmp_path / "m.yaml"
    path.write_text("image: a\ncaptions: b\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: unknown key columns\.captions"):
        load_column_map(path)
