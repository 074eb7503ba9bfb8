"""The paper's benchmark suite (`make-dist eval --suite paper`): the protocol
by hand, the authors' layout read in place, every row scored, bad input."""

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tracking_db
from mlflow.tracking import MlflowClient
from paper_layout import DERM7PT_CONCEPTS, write_paper_data

from make_dist.config import ModelConfig
from make_dist.evaluate import metrics, paper
from make_dist.evaluate.tasks import encode_images
from make_dist.model import build_model, export_open_clip, tokenizer

EXE = Path(sys.executable).parent / "make-dist"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_paper_data(tmp_path_factory.mktemp("paper"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="make-tiny")).eval()


@pytest.fixture(scope="module")
def tok():
    return tokenizer(ModelConfig(name="make-tiny"))


@pytest.fixture(scope="module")
def suite(model, tok, data):
    return {r.benchmark.name: r for r in paper.run_suite(model, tok, str(data), say=lambda _: None)}


# ---------------------------------------------------------------------------
# The protocol against hand-computed answers


def test_class_embedding_is_the_renormalised_mean_of_normalised_templates():
    vectors = {"A skin image of x.": [3.0, 4.0], "The skin lesion depicted is x.": [0.0, 2.0],
               "A skin image of y.": [1.0, 0.0], "The skin lesion depicted is y.": [-1.0, 0.0]}
    templates = ("A skin image of {}.", "The skin lesion depicted is {}.")
    got = paper.class_embeddings(lambda texts: torch.tensor([vectors[t] for t in texts]), ["x", "y"], templates)
    # x: (0.6, 0.8) and (0, 1) -> mean (0.3, 0.9) -> /sqrt(0.9); y: (1, 0) and (-1, 0) -> mean 0 stays 0
    assert torch.allclose(got[0], torch.tensor([0.3, 0.9]) / math.sqrt(0.9))
    assert torch.allclose(got[1], torch.zeros(2))


def test_concept_score_is_monets_by_hand():
    image = torch.tensor([[1.0, 0.0]])
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],  # template 1, two terms: cosines 1 and 0 -> 0.5
                            [[0.6, 0.8], [0.6, 0.8]]])  # template 2: 0.6
    references = torch.tensor([[0.6, 0.8], [1.0, 0.0]])  # cosines 0.6 and 1
    s = math.exp(4.5944)
    pair = lambda target, ref: math.exp(s * target) / (math.exp(s * target) + math.exp(s * ref))  # noqa: E731
    want = (pair(0.5, 0.6) + pair(0.6, 1.0)) / 2
    assert paper.concept_presence(image, targets, references).item() == pytest.approx(want, rel=1e-5)


def test_integer_labels_index_the_papers_class_lists():
    by_name = {b.name: b for b in paper.BENCHMARKS}
    pad = paper.class_names(by_name["PAD-UFES-20"])
    assert pad == ["nevus", "basal cell carcinoma", "actinic keratosis", "seborrheic keratosis",
                   "squamous cell carcinoma", "melanoma"]
    sizes = {name: len(paper.class_names(by_name[name])) for name in ("Fitzpatrick17k", "SD-128", "SNU-134")}
    assert sizes == {"Fitzpatrick17k": 114, "SD-128": 128, "SNU-134": 134}
    assert paper.class_names(by_name["Fitzpatrick17k"])[:3] == ["dermatofibroma", "psoriasis", "kaposi sarcoma"]
    assert paper.class_names(by_name["SNU-134"])[:2] == ["epidermal cyst", "paronychia"]
    sd = paper.class_names(by_name["SD-128"])
    assert sd == sorted(sd) and sd[0] == "acne keloidalis nuchae"
    for b in by_name.values():
        if b.classes:
            assert len(set(paper.class_names(b))) == len(paper.class_names(b))


def test_every_concept_of_both_sets_has_terms():
    terms = paper.load_concept_terms(paper.default_concept_terms())
    assert len(terms) >= 55 and all(terms[c] for c in DERM7PT_CONCEPTS)
    assert all(len(v) >= 2 for v in terms.values())


# ---------------------------------------------------------------------------
# The suite on the fake layout


def test_classification_equals_an_independent_computation(suite, model, tok, data):
    """Row r's integer label names class r of the paper's list; the class is
    the 8 templates' mean; top-1/top-5 over the whole list."""
    r = suite["PAD-UFES-20"]
    assert r.status == "scored" and r.result.rows == r.result.scored == 9 and not r.result.skipped
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 5, 1, 2])
    names = ["nevus", "basal cell carcinoma", "actinic keratosis", "seborrheic keratosis",
             "squamous cell carcinoma", "melanoma"]
    paths = [str(p) for p in sorted((data / "PAD/images").iterdir(), key=lambda p: int(p.name.split("_")[1]))]
    images, _, _ = encode_images(model, paths, None, anywhere=True)
    with torch.no_grad():
        prototypes = []
        for name in names:
            texts = F.normalize(model.clip.encode_text(tok([t.format(name) for t in paper.SKIN_TEMPLATES])), dim=-1)
            prototypes.append(F.normalize(texts.mean(0), dim=-1))
        scores = F.normalize(images, dim=-1) @ torch.stack(prototypes).T
    assert r.result.metrics["top1"] == pytest.approx(metrics.topk_accuracy(scores, labels, 1))
    assert r.result.metrics["top5"] == pytest.approx(metrics.topk_accuracy(scores, labels, 5))
    assert r.result.metrics["macro_auroc"] == pytest.approx(
        metrics.macro_auroc((100 * scores.double()).softmax(1), labels))
    f17k = suite["Fitzpatrick17k"].result  # bare file names, found in F17K/images/
    assert f17k.scored == 7 and f17k.metrics["chance_top1"] == pytest.approx(1 / 114)
    assert "macro_auroc" not in f17k.metrics  # the paper reports it for PAD only


def test_unreadable_and_missing_images_are_counted_and_listed(suite, data):
    snu = suite["SNU-134"].result
    assert (snu.rows, snu.scored) == (8, 6)
    gone, broken = snu.skipped
    assert gone["row"] == 6 and gone["reason"].startswith("image not found (tried ")
    assert str(data / "SNU/images/gone.jpg") in gone["reason"]
    assert broken["row"] == 7 and broken["reason"].startswith("image unreadable")


def test_concepts_follow_the_list_and_the_columns_by_position(suite):
    skincon = suite["SkinCon"].result
    assert skincon.details["concepts"] == ["vesicle", "papule", "brown(hyperpigmentation)", "erythema"]
    assert skincon.scored == 8 and skincon.details["truth"][:, 0].tolist() == [i & 1 for i in range(8)]
    defined = [v for v in skincon.details["auroc"].values() if v == v]
    assert skincon.metrics["mean_auroc"] == pytest.approx(sum(defined) / len(defined))
    assert suite["Derm7pt"].result.details["concepts"] == DERM7PT_CONCEPTS


def test_retrieval_ranks_ties_against_the_model(suite):
    """12 pairs of one image and one caption: every similarity ties, so row i's
    partner ranks i-th (strict ranks) and recall@10 is 10/12, not 1."""
    cap = suite["SkinCAP"].result
    assert cap.scored == 12
    for direction in ("i2t", "t2i"):
        assert cap.metrics[f"{direction}_R10"] == pytest.approx(10 / 12)
        assert cap.metrics[f"{direction}_R50"] == cap.metrics[f"{direction}_R100"] == 1.0


def test_a_missing_set_is_reported_and_the_table_keeps_its_place(suite):
    assert suite["SD-128"].status == "missing" and "SD-128/MAKE_SD-128.csv" in suite["SD-128"].message
    text = paper.tables(list(suite.values()), "make-tiny")
    table1 = text.splitlines()[:4]
    assert table1[2].split()[:3] == ["MAKE", "(paper)", "0.5953"]
    ours = table1[3].split()
    assert ours[0] == "make-tiny" and ours[3] == "-"  # SD-128's column, empty
    # An average over 3 of the paper's 4 sets is marked, and the mark said
    assert ours[5].endswith("+")
    assert float(ours[5][:-1]) == pytest.approx(paper.averages(list(suite.values()))["classify_avg_top1"], abs=1e-4)
    assert ("+ Avg (classification): the average of 3 of the paper's 4 sets (without SD-128): not comparable with "
            "the paper's average") in text
    assert "SD-128          missing" in text and "SNU-134         6/8 scored, 2 skipped" in text
    report = paper.to_json(list(suite.values()))
    assert report["averaged_over"]["classify_avg_top1"] == {
        "sets": ["PAD-UFES-20", "Fitzpatrick17k", "SNU-134"], "count": 3, "of": 4}
    assert report["averaged_over"]["concepts_avg_auroc"]["count"] == 2


def test_concept_columns_scored_with_make_dists_terms_are_marked(suite):
    """By default (no terms named, no authors' checkout around DIR) the
    concept sets use make-dist's terms: the JSON says so per set, the concept
    cells carry a mark and the table says how to get the authors' terms."""
    results = list(suite.values())
    assert {r.concept_terms for r in results if r.benchmark.task == "concepts"} == {"make-dist"}
    assert paper.to_json(results)["datasets"]["SkinCon"]["concept_terms"] == "make-dist"
    assert "concept_terms" not in paper.to_json(results)["datasets"]["PAD-UFES-20"]
    text = paper.tables(results, "make-tiny")
    ours = text.splitlines()[3].split()
    assert ours[6].endswith("*") and ours[7].endswith("*") and ours[8].endswith("*")  # SkinCon, Derm7pt, Avg
    assert not any(cell.endswith("*") for cell in ours[1:6])
    assert "* concept terms not the authors' file as released (make-dist's own): not comparable" in text
    assert "git clone https://github.com/SiyuanYan1/MAKE) and pass --concept-terms MAKE" in text


def _authors_terms() -> dict:
    return {c.lower(): [c.lower(), f"{c.lower()} lesion"] for c in
            ["Vesicle", "Papule", "Brown(Hyperpigmentation)", "Erythema", *DERM7PT_CONCEPTS]}


@pytest.fixture
def released(monkeypatch):
    """_authors_terms() taken for the authors' file as released. Their file
    carries no licence and cannot ship with the tests; make-dist knows it by
    the SHA-256 of its content, so the test's stand-in is added to that list."""
    canonical = json.dumps(_authors_terms(), sort_keys=True).encode()
    monkeypatch.setitem(paper.AUTHORS_TERMS_SHA256, hashlib.sha256(canonical).hexdigest(), "the test's copy")


def test_the_authors_terms_from_their_checkout(model, tok, data, tmp_path, released):
    """The authors' terms are read from a checkout of their repository: named
    (--concept-terms MAKE), or found when DIR is the checkout's data/ folder;
    the concept columns then carry no mark and the JSON names the file."""
    checkout = tmp_path / "MAKE"
    shutil.copytree(data, checkout / "data")
    (checkout / paper.AUTHORS_TERMS).parent.mkdir(parents=True)
    (checkout / paper.AUTHORS_TERMS).write_text(json.dumps(_authors_terms()))
    said = []
    found = {r.benchmark.name: r for r in paper.run_suite(model, tok, str(checkout / "data"), say=said.append)}
    assert found["SkinCon"].concept_terms == str(checkout / paper.AUTHORS_TERMS) and found["SkinCon"].authors_terms
    assert (f"concept terms: the authors' concept terms ({checkout / paper.AUTHORS_TERMS}, as released in the "
            f"test's copy)") in said
    assert "*" not in paper.tables(list(found.values()), "m")
    named = paper.concept_terms(str(data), str(checkout))
    assert named.source == str(checkout / paper.AUTHORS_TERMS) and named.authors
    assert named.terms["erythema"] == ["erythema", "erythema lesion"]
    with pytest.raises(paper.UserError, match="is a folder without concept_annotation/term_lists/ConceptTerms.json"):
        paper.concept_terms(str(data), str(tmp_path))


def test_terms_of_ones_own_are_marked_too(model, tok, data, tmp_path):
    """Any terms file but the authors' as released (here: theirs with one
    term more) leaves the concept columns marked, and the file named; with a
    concept set missing as well, the concept average carries both marks."""
    terms = _authors_terms()
    terms["erythema"].append("redness")
    (tmp_path / "mine.json").write_text(json.dumps(terms))
    shutil.copytree(data, tmp_path / "data")
    shutil.rmtree(tmp_path / "data/derm7pt")
    results = paper.run_suite(model, tok, str(tmp_path / "data"), str(tmp_path / "mine.json"), say=lambda _: None)
    skincon = next(r for r in results if r.benchmark.name == "SkinCon")
    assert skincon.concept_terms == str(tmp_path / "mine.json") and not skincon.authors_terms
    text = paper.tables(results, "m")
    ours = text.splitlines()[3].split()
    assert ours[6].endswith("*") and ours[7] == "-" and ours[8].endswith("*+")
    assert f"* concept terms not the authors' file as released ({tmp_path / 'mine.json'})" in text
    assert "+ Avg (concepts): the average of 1 of the paper's 2 sets (without Derm7pt)" in text
    assert paper.to_json(results)["datasets"]["SkinCon"]["authors_terms"] is False


# ---------------------------------------------------------------------------
# Bad input stops its set, with the file, row and value; the others still run


def _copy(data: Path, tmp_path: Path) -> Path:
    shutil.copytree(data.parent, tmp_path / "copy")
    return tmp_path / "copy/data"


def test_bad_files_stop_their_set_and_name_the_row(model, tok, data, tmp_path):
    bad = _copy(data, tmp_path)
    pad = (bad / "PAD/MAKE_PAD.csv").read_text().splitlines()
    pad[3] = pad[3].replace(",2,", ",6,")  # row 3 of the data: label 6, PAD has 6 classes
    (bad / "PAD/MAKE_PAD.csv").write_text("\n".join(pad) + "\n")
    (bad / "skincon/concept_list.txt").write_text("vesicle\npapule\nsparkles\nerythema\n")
    meta = (bad / "derm7pt/meta.csv").read_text().splitlines()
    meta[5] = meta[5][:-1] + "2"
    (bad / "derm7pt/meta.csv").write_text("\n".join(meta) + "\n")
    results = {r.benchmark.name: r for r in paper.run_suite(model, tok, str(bad), say=lambda _: None)}
    assert results["PAD-UFES-20"].status == "error"
    assert "MAKE_PAD.csv: row 2 (line 4): label '6' is not a class index 0..5" in results["PAD-UFES-20"].message
    assert results["SkinCon"].status == "error"
    assert "concept_list.txt: line 3: concept 'sparkles' has no terms" in results["SkinCon"].message
    assert "derm7pt/meta.csv: row 4 (line 6), column 'streaks' (concept 'streaks'): '2' is not 0 or 1" \
        in results["Derm7pt"].message
    assert [n for n, r in results.items() if r.status == "scored"] == ["Fitzpatrick17k", "SNU-134", "SkinCAP"]


def test_meta_columns_that_do_not_line_up_with_the_concept_list(model, tok, data, tmp_path):
    bad = _copy(data, tmp_path)
    meta = [line + ",0" for line in (bad / "skincon/meta.csv").read_text().splitlines()]
    (bad / "skincon/meta.csv").write_text("\n".join(meta) + "\n")
    with pytest.raises(paper.UserError, match=r"skincon/meta.csv: 5 concept columns after ImageID, but .*"
                                              r"concept_list.txt lists 4 concepts"):
        paper.score_concepts(model, tok, str(bad), paper.BENCHMARKS[4], paper.concept_terms(str(bad)))
    with pytest.raises(paper.UserError, match="none of the paper's sets is there"):
        paper.run_suite(model, tok, str(tmp_path))
    pad = (bad / "PAD/MAKE_PAD.csv").read_text().splitlines()
    for value in ("inf", "1.5", "melanoma"):  # not a class index, each named
        pad[1] = f"data/PAD/images/PAT_0_1_0.png,{value},x"
        (bad / "PAD/MAKE_PAD.csv").write_text("\n".join(pad) + "\n")
        with pytest.raises(paper.UserError, match=f"row 0 \\(line 2\\): label '{value}' is not a class index"):
            paper.score_classification(model, tok, str(bad), paper.BENCHMARKS[0])


# ---------------------------------------------------------------------------
# The command: tables, JSON, one MLflow run; the authors' terms file


def test_cli_suite_writes_tables_json_and_one_mlflow_run(model, data, tmp_path, released):
    export_open_clip(model, tmp_path / "model")
    (tmp_path / "ConceptTerms.json").write_text(json.dumps(_authors_terms()))
    out = subprocess.run(
        [str(EXE), "eval", "--suite", "paper", "--data", str(data), "--model", str(tmp_path / "model"),
         "--concept-terms", str(tmp_path / "ConceptTerms.json"), "--out", str(tmp_path / "r.json"),
         "--tracking-uri", tracking_db(tmp_path / "m.db")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Table 1" in out.stdout and "Table 2" in out.stdout and "MAKE (paper)" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    sets = report["datasets"]
    assert sets["SD-128"]["status"] == "missing" and sets["PAD-UFES-20"]["scored"] == 9
    assert [s["row"] for s in sets["SNU-134"]["skipped"]] == [6, 7]
    assert set(sets["SkinCAP"]["metrics"]) >= {"i2t_R10", "t2i_R100", "mean_recall"}
    assert set(sets["SkinCon"]["metrics"]) >= {"mean_auroc", "auroc/vesicle"}
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    (run,) = client.search_runs([client.get_experiment_by_name("make-dist-eval").experiment_id])
    assert run.data.params["concept_terms"] == str(tmp_path / "ConceptTerms.json")
    assert run.data.tags["paper/PAD-UFES-20/scored"] == "9" and "paper/SkinCAP/i2t_R10" in run.data.metrics
    assert "paper/PAD-UFES-20/scored" not in run.data.metrics
    assert run.data.metrics["paper/classify_avg_top1"] == pytest.approx(report["averages"]["classify_avg_top1"])
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "paper/SNU-134")}
    assert plots == {"paper/SNU-134/confusion_matrix.png"}
    assert "paper/results.json" in {a.path for a in client.list_artifacts(run.info.run_id, "paper")}


def test_training_that_names_an_empty_or_missing_suite_folder_fails_before_ray(tiny_shards, tmp_path):
    from make_dist.config import load_config
    from make_dist.train.launch import check

    def config(folder):
        return load_config(None, [f"data.train_shards={tiny_shards}", f"train.storage={tmp_path}/runs",
                                  f"tracking.uri=sqlite:///{tmp_path}/m.db", "evaluation.suite=paper",
                                  f"evaluation.suite_data={folder}"])

    with pytest.raises(paper.UserError, match="evaluation.suite_data: .* none of the paper.s sets is there"):
        check(config(tmp_path))
    with pytest.raises(paper.UserError, match="evaluation.suite_data: .*/nowhere: no such folder"):
        check(config(tmp_path / "nowhere"))


def test_training_resolves_the_suites_terms_before_ray(tiny_shards, data, tmp_path, capsys, released):
    """A training run's suite follows the eval command's rules, checked by the
    driver: the authors' terms beside their data/ are named for every worker;
    make-dist's own said to be incomparable."""
    from make_dist.config import load_config
    from make_dist.train.launch import check

    def config(folder, *more):
        return load_config(None, [f"data.train_shards={tiny_shards}", f"train.storage={tmp_path}/runs",
                                  f"tracking.uri=sqlite:///{tmp_path}/m.db", "evaluation.suite=paper",
                                  f"evaluation.suite_data={folder}", *more])

    assert check(config(data)).evaluation.concept_terms is None
    said = capsys.readouterr().out
    assert "SkinCon and Derm7pt are scored with make-dist's own concept terms, not comparable" in said
    checkout = tmp_path / "MAKE"
    shutil.copytree(data, checkout / "data")
    (checkout / paper.AUTHORS_TERMS).parent.mkdir(parents=True)
    (checkout / paper.AUTHORS_TERMS).write_text(json.dumps(_authors_terms()))
    assert check(config(checkout / "data")).evaluation.concept_terms == str(checkout / paper.AUTHORS_TERMS)
    assert check(config(data, f"evaluation.concept_terms={checkout}")).evaluation.concept_terms == \
        str(checkout / paper.AUTHORS_TERMS)
    with pytest.raises(paper.UserError, match="evaluation.concept_terms: .* is a folder without"):
        check(config(data, f"evaluation.concept_terms={tmp_path}"))


def test_the_command_defaults_to_the_papers_architecture(model, data, tmp_path):
    """`--suite paper --weights W` loads W into ViT-B-16-quickgelu; the
    authors' checkpoint named with --model ViT-B-16 is refused, the message
    naming the QuickGELU twin; no model at all is asked for."""
    from test_model import _authors_checkpoint

    ckpt = _authors_checkpoint(model, tmp_path / "epoch_15.pt")

    def run(*args):
        return subprocess.run([str(EXE), "eval", "--suite", "paper", "--data", str(data), "--no-mlflow", *args],
                              capture_output=True, text=True, timeout=300)

    out = run("--model", "ViT-B-16", "--weights", str(ckpt))
    assert out.returncode == 2 and "Use --model ViT-B-16-quickgelu" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    out = run()
    assert out.returncode == 2 and "give --weights FILE (e.g. the authors' epoch_15.pt, loaded into " \
        "ViT-B-16-quickgelu)" in out.stderr
    out = run("--weights", str(ckpt))  # into ViT-B-16-quickgelu: the tiny weights do not fit, and it says so
    assert out.returncode == 2 and f"{ckpt}: cannot be loaded into ViT-B-16-quickgelu (positional_embedding: " \
        "(77, 128) in the file, (77, 512) in ViT-B-16-quickgelu)" in out.stderr
    assert "name the architecture these weights were trained as" in out.stderr and "Traceback" not in out.stderr


def test_models_as_the_authors_release_them(model, tmp_path, monkeypatch):
    """A Hugging Face repository downloaded to a folder (config + safetensors
    weights) loads as the model; an hf-hub name that cannot be fetched says how
    to get it offline."""
    from safetensors.torch import save_file

    from make_dist.model import ModelLoadError

    export_open_clip(model, tmp_path / "export")
    hf = tmp_path / "MAKE"
    hf.mkdir()
    (hf / "open_clip_config.json").write_text((tmp_path / "export/open_clip_config.json").read_text())
    weights = torch.load(tmp_path / "export/open_clip_pytorch_model.bin")
    save_file({k: v.contiguous() for k, v in weights.items()}, hf / "open_clip_model.safetensors")
    loaded = build_model(ModelConfig(name=str(hf))).eval()
    image = torch.randint(0, 256, (2, 3, model.image_size, model.image_size), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(image)[0], model.encode_image(image)[0], atol=1e-6)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import; no network waits
    with pytest.raises(ModelLoadError, match="hf-hub:nobody/none: cannot fetch .* pass DIR as the model"):
        build_model(ModelConfig(name="hf-hub:nobody/none"))


def test_the_suite_reads_any_fsspec_url(suite, model, tok, data):
    """The same sets on another filesystem (memory://, as s3:// would be):
    the same rows found, the same scores."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in data.rglob("*"):
        if path.is_file():
            fs.pipe(f"/paper/data/{path.relative_to(data).as_posix()}", path.read_bytes())
    remote = {r.benchmark.name: r for r in paper.run_suite(model, tok, "memory://paper/data", say=lambda _: None)}
    for name in ("PAD-UFES-20", "SNU-134", "SkinCon", "SkinCAP"):
        assert remote[name].result.scored == suite[name].result.scored
        for key, value in suite[name].result.metrics.items():
            assert remote[name].result.metrics[key] == pytest.approx(value, abs=1e-6), (name, key)
    assert remote["SD-128"].status == "missing"
    fs.rm("/paper", recursive=True)


def test_a_tables_paths_that_leave_the_data_are_not_read(tmp_path):
    """Paths as written are read only inside the folder above DIR (where the
    authors' commands run); elsewhere, a file or a URL is not tried, and the
    image is looked for by name in the set's own folder."""
    from PIL import Image

    data = tmp_path / "work/data"
    (data / "PAD/images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "PAD/images/kept.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")  # outside the work folder
    finder = paper.ImageFinder(str(data), paper.BENCHMARKS[0])
    assert finder.find("data/PAD/images/kept.png")[0] == str(data / "PAD/images/kept.png")
    for outside in ("../secret.png", str(tmp_path / "secret.png"), "http://127.0.0.1:9/secret.png"):
        found, tried = finder.find(outside)
        assert found is None and tried == [f"{data}/PAD/images/secret.png"], (outside, tried)
    assert finder.find(str(tmp_path / "elsewhere/kept.png"))[0] == str(data / "PAD/images/kept.png")  # by name


def test_the_suite_preprocesses_as_the_authors_do():
    """open_clip's evaluation transform, which the authors' scripts use,
    resizes and crops before converting to RGB. For palette and
    semi-transparent PNGs that order gives other pixels than RGB-first (0.34
    at most after normalisation on the RGBA image here): the suite follows
    the authors and matches their normalised pixels exactly."""
    import io

    import numpy as np
    import open_clip
    from PIL import Image

    from make_dist.evaluate.tasks import eval_transform

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 150)
    rgb = np.stack([np.add.outer(ramp, ramp[:130]) / 2, np.add.outer(255 - ramp, ramp[:130]) / 2,
                    np.broadcast_to(ramp[:, None], (150, 130))], -1)
    rgb = (rgb + rng.normal(0, 20, rgb.shape)).clip(0, 255).astype(np.uint8)
    alpha = np.where(np.arange(130) < 65, 255, rng.integers(0, 256, (150, 130))).astype(np.uint8)
    images = {"P": Image.fromarray(rgb).quantize(256), "RGBA": Image.fromarray(np.dstack([rgb, alpha]), "RGBA"),
              "LA": Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"), "RGB": Image.fromarray(rgb)}
    authors = open_clip.image_transform(64, is_train=False)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    for mode, image in images.items():
        data = io.BytesIO()
        image.save(data, "PNG")
        image = Image.open(io.BytesIO(data.getvalue()))
        assert image.mode == mode
        theirs = authors(image)
        ours = (paper.authors_transform(64)(image).float() / 255 - mean) / std  # as MakeModel.normalize does
        assert torch.equal(ours, theirs), mode
        if mode == "RGBA":  # what the other order would have given
            assert ((eval_transform(64)(image).float() / 255 - mean) / std - theirs).abs().max() > 0.3
