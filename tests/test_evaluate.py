"""Zero-shot evaluation: metrics by hand, each task end to end, whole-table counts, bad input."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import tracking_db
from make_dist.config import ModelConfig
from make_dist.errors import UserError
from make_dist.evaluate import bootstrap, metrics
from make_dist.evaluate.tasks import load_classes, run_task
from make_dist.model import build_model, export_open_clip, tokenizer

EXE = Path(sys.executable).parent / "make-dist"


# ---------------------------------------------------------------------------
# Metrics against hand-computed cases


def test_topk_accuracy():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.7, 0.2], [0.4, 0.35, 0.25]])
    labels = torch.tensor([0, 0, 2, 1])
    assert metrics.topk_accuracy(scores, labels, 1) == 0.25  # only row 0
    assert metrics.topk_accuracy(scores, labels, 2) == 0.75  # rows 0, 2 (0.2 second), 3
    assert metrics.topk_accuracy(scores, labels, 5) == 1.0  # k beyond the classes


def test_auroc_by_hand():
    # positives 0.8, 0.4 against negatives 0.6, 0.2, 0.4:
    # 0.8 wins all 3; 0.4 loses to 0.6, beats 0.2, ties 0.4 (half) -> (3 + 1.5) / 6
    scores = torch.tensor([0.8, 0.6, 0.4, 0.2, 0.4])
    positive = torch.tensor([1, 0, 1, 0, 0])
    assert metrics.auroc(scores, positive) == pytest.approx(4.5 / 6)
    assert metrics.auroc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0
    assert math.isnan(metrics.auroc(torch.tensor([0.1, 0.9]), torch.tensor([1, 1])))


def test_macro_auroc_and_confusion():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    labels = torch.tensor([0, 1, 1, 2])
    # class 0: positive 0.7 beats 0.6, 0.1, 0.2 -> 1; class 1: positives 0.3, 0.8 vs 0.2, 0.2 -> 1;
    # class 2: positive 0.6 vs 0.1, 0.1, 0.1 -> 1
    assert metrics.macro_auroc(scores, labels) == 1.0
    confusion = metrics.confusion_matrix(scores.argmax(1), labels, 3)
    assert confusion.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_recall_at_k():
    sim = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.4, 0.3], [0.1, 0.8, 0.7]])
    # row 0 match ranks 1st; row 1 match (0.4) ranks 2nd; row 2 match (0.7) ranks 2nd
    assert metrics.recall_at_k(sim, 1) == pytest.approx(1 / 3)
    assert metrics.recall_at_k(sim, 2) == 1.0
    # captions as queries: caption 0 finds image 0 first (0.9), caption 1 ranks image 1
    # second (0.8 of image 2 beats 0.4), caption 2 finds image 2 first (0.7)
    assert metrics.recall_at_k(sim.T, 1) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------
# Tasks end to end, on a tiny random model and tables larger than one batch


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    from make_dist.data.synth import synthesize

    root = tmp_path_factory.mktemp("eval")
    synthesize(root, n=1, n_eval=150, size=64, seed=5, workers=2, progress=False)
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="make-tiny"))


@pytest.fixture(scope="module")
def tok():
    return tokenizer(ModelConfig(name="make-tiny"))


def test_classify_scores_every_image(eval_set, model, tok):
    r = run_task("classify", model, tok, str(eval_set / "eval/classify.csv"), str(eval_set),
                 str(eval_set / "classes.yaml"))
    assert r.rows == r.scored == 150 and not r.skipped  # more than two batches of 64
    assert 0 <= r.metrics["top1"] <= r.metrics["top5"] <= 1 and 0 <= r.metrics["macro_auroc"] <= 1
    assert r.details["confusion"].sum() == 150 and r.metrics["chance_top1"] == pytest.approx(1 / 15)


def test_concepts_and_retrieval_score_every_image(eval_set, model, tok):
    c = run_task("concepts", model, tok, str(eval_set / "eval/concepts.csv"), str(eval_set))
    assert c.scored == 150 and 0 <= c.metrics["mean_auroc"] <= 1 and len(c.details["auroc"]) == 19
    r = run_task("retrieval", model, tok, str(eval_set / "eval/retrieval.csv"), str(eval_set))
    assert r.scored == 150
    assert r.metrics["i2t_R10"] <= r.metrics["i2t_R50"] <= r.metrics["i2t_R100"] <= 1
    assert len(r.details["recall_curves"]["i2t"]) == 100


def test_bad_input(eval_set, model, tok, tmp_path):
    classes = tmp_path / "classes.yaml"
    classes.write_text(yaml.safe_dump({"psoriasis": ["plaque psoriasis"], "eczema": []}))
    with pytest.raises(UserError, match="labels not in the class list"):
        run_task("classify", model, tok, str(eval_set / "eval/classify.csv"), str(eval_set), str(classes))
    empty = tmp_path / "empty.csv"
    empty.write_text("image,label\n")
    with pytest.raises(UserError, match="no rows"):
        run_task("classify", model, tok, str(empty), str(eval_set), str(eval_set / "classes.yaml"))
    rows = pd.read_csv(eval_set / "eval/retrieval.csv").head(20)
    rows.loc[3, "image"] = "images/eval/missing.jpg"
    rows.to_csv(tmp_path / "retrieval.csv", index=False)
    r = run_task("retrieval", model, tok, str(tmp_path / "retrieval.csv"), str(eval_set))
    assert r.rows == 20 and r.scored == 19 and r.skipped == [{"row": 3, "image": "images/eval/missing.jpg",
                                                              "reason": "image not found"}]
    shutil.copyfile(eval_set / rows.loc[5, "image"], tmp_path / "elsewhere.jpg")
    outside = os.path.relpath(tmp_path / "elsewhere.jpg", eval_set)  # ../../.../elsewhere.jpg
    rows.loc[5, "image"] = outside
    rows.loc[6, "image"] = str(eval_set / rows.loc[6, "image"])  # absolute, inside the root: fine
    rows.to_csv(tmp_path / "retrieval.csv", index=False)
    r = run_task("retrieval", model, tok, str(tmp_path / "retrieval.csv"), str(eval_set))
    assert r.scored == 18 and [s["row"] for s in r.skipped] == [3, 5]
    assert r.skipped[1]["reason"].startswith(f"image path '{outside}' leaves the images root")
    r = run_task("retrieval", model, tok, str(tmp_path / "retrieval.csv"), str(eval_set), images_anywhere=True)
    assert r.scored == 19
    bad = pd.read_csv(eval_set / "eval/concepts.csv").head(5)
    bad.loc[2, "scale"] = 7
    bad.to_csv(tmp_path / "concepts.csv", index=False)
    with pytest.raises(UserError, match="concept column 'scale' holds '7' at row 2"):
        run_task("concepts", model, tok, str(tmp_path / "concepts.csv"), str(eval_set))


def test_class_list_forms(tmp_path):
    (tmp_path / "a.yaml").write_text("- melanoma\n- name: nevus\n  synonyms: [mole]\n")
    assert load_classes(str(tmp_path / "a.yaml")) == {"melanoma": [], "nevus": ["mole"]}
    (tmp_path / "b.yaml").write_text("- only\n")
    with pytest.raises(UserError, match="at least 2 classes"):
        load_classes(str(tmp_path / "b.yaml"))


def test_cli_eval_json_and_mlflow(eval_set, model, tmp_path):
    export_open_clip(model, tmp_path / "model")
    out = subprocess.run(
        [str(EXE), "eval", "--model", str(tmp_path / "model"), "--task", "classify",
         "--table", str(eval_set / "eval/classify.csv"), "--images-root", str(eval_set),
         "--classes", str(eval_set / "classes.yaml"), "--out", str(tmp_path / "r.json"),
         "--tracking-uri", tracking_db(tmp_path / "m.db")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "top1" in out.stdout and "classify 150/150 images" in out.stdout
    (result,) = json.loads((tmp_path / "r.json").read_text())[str(tmp_path / "model")]
    assert result["scored"] == 150 and set(result["metrics"]) >= {"top1", "top5", "macro_auroc"}
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    (run,) = client.search_runs([client.get_experiment_by_name("make-dist-eval").experiment_id])
    assert run.data.tags["eval/classify/scored"] == "150" and "eval/classify/top1" in run.data.metrics
    # counts are tags, not one-point charts
    assert not {k for k in run.data.metrics if k.endswith(("/scored", "/rows", "/chance_top1"))}
    assert run.data.tags["eval/classify/chance_top1"] == "0.06667"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval/classify")}
    assert "eval/classify/confusion_matrix.png" in artifacts


# ---------------------------------------------------------------------------
# Against open_clip itself, and the tie rule


COLOURS = ["red", "brown", "pink", "dark", "pale", "white", "black", "purple", "yellow", "grey", "blue", "orange",
           "tan", "violet", "golden"]
SHAPES = ["plaque", "patch", "papule", "nodule", "macule", "lesion", "spot", "rash", "bump", "ring"]


def test_cli_retrieval_equals_open_clips_own_encoding(eval_set, model, tmp_path):
    """Captions like `so itchy!""` hold token 0 ("!" inside a word) before their
    end token: a length counted as non-zero tokens cut the end token off (and
    the embedding with it). `make-dist eval` on an exported model must give
    exactly the recall of open_clip's own loader, transforms and encoders."""
    import open_clip
    from PIL import Image

    export_open_clip(model, tmp_path / "model")
    rows = pd.read_csv(eval_set / "eval/retrieval.csv")
    rows["caption"] = [f'{c} {s} so itchy!""' for c in COLOURS for s in SHAPES][: len(rows)]
    rows.to_csv(tmp_path / "retrieval.csv", index=False)
    out = subprocess.run(
        [str(EXE), "eval", "--model", str(tmp_path / "model"), "--task", "retrieval", "--table",
         str(tmp_path / "retrieval.csv"), "--images-root", str(eval_set), "--out", str(tmp_path / "r.json"),
         "--no-mlflow"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = json.loads((tmp_path / "r.json").read_text())[str(tmp_path / "model")]

    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'model'}")
    tok = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'model'}")
    clip.eval()
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(eval_set / p)) for p in rows["image"]])
        similarity = clip.encode_image(images, normalize=True) @ clip.encode_text(tok(list(rows["caption"])),
                                                                                  normalize=True).T
    for direction, sim in (("i2t", similarity), ("t2i", similarity.T)):
        for k in (10, 50, 100):
            assert result["metrics"][f"{direction}_R{k}"] == metrics.recall_at_k(sim, k), (direction, k)

    # the texts themselves, through make-dist's evaluation encoder
    from make_dist.evaluate.tasks import encode_texts

    captions = list(rows["caption"][:20])
    ours = encode_texts(model.eval(), tokenizer(ModelConfig(name="make-tiny")), captions)
    theirs = torch.nn.functional.normalize(model.clip.encode_text(tok(captions)), dim=-1)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_ties_count_against_the_model():
    """A collapsed model (every similarity equal) gets chance, not perfection."""
    n = 40
    flat = torch.zeros(n, n)
    assert metrics.recall_at_k(flat, 1) == pytest.approx(1 / n)
    assert metrics.recall_at_k(flat, 10) == pytest.approx(10 / n)
    assert metrics.topk_accuracy(torch.zeros(n, 4), torch.arange(n) % 4, 1) == pytest.approx(1 / 4)
    # a tie with a lower-index column ranks the match below it; with a higher one, above
    sim = torch.tensor([[0.5, 0.5, 0.1], [0.5, 0.5, 0.1], [0.2, 0.2, 0.2]])
    assert metrics.rank_of(sim, torch.arange(3)).tolist() == [0, 1, 2]


def test_macro_auroc_uses_the_learned_temperature(eval_set, tok):
    """One-vs-rest AUROC over softmax probabilities depends on the temperature:
    it is the model's, as in concept annotation."""
    torch.manual_seed(0)
    warm = build_model(ModelConfig(name="make-tiny"))
    cold = build_model(ModelConfig(name="make-tiny"))
    cold.load_state_dict(warm.state_dict())
    with torch.no_grad():
        cold.clip.logit_scale.fill_(math.log(100.0))
        warm.clip.logit_scale.fill_(0.0)
    args = ("classify", tok, str(eval_set / "eval/classify.csv"), str(eval_set), str(eval_set / "classes.yaml"))
    a, b = run_task(args[0], warm, *args[1:]), run_task(args[0], cold, *args[1:])
    assert a.metrics["top1"] == b.metrics["top1"]  # the ranking of classes is the temperature's to keep
    assert a.metrics["macro_auroc"] != b.metrics["macro_auroc"]


# ---------------------------------------------------------------------------
# Bootstrap intervals


def test_bootstrap_reproduces_each_metric_on_the_whole_table(eval_set, model, tok):
    """The statistic a draw recomputes is the metric the task reports, from the
    details as they come back out of results.json (lists)."""
    root = str(eval_set)
    results = {
        "classify/top1": (run_task("classify", model, tok, f"{root}/eval/classify.csv", root,
                                   f"{root}/classes.yaml"), "top1"),
        "concepts/mean_auroc": (run_task("concepts", model, tok, f"{root}/eval/concepts.csv", root), "mean_auroc"),
        "retrieval/mean_recall": (run_task("retrieval", model, tok, f"{root}/eval/retrieval.csv", root),
                                  "mean_recall"),
    }
    for metric, (result, key) in results.items():
        details = json.loads(json.dumps(result.to_json()))["details"]
        estimate = bootstrap.interval(metric, details, draws=200)
        assert estimate.value == pytest.approx(result.metrics[key], abs=1e-6), metric
        assert estimate.low <= estimate.value <= estimate.high and estimate.low < estimate.high, metric


def test_weighted_auroc_is_auroc_on_the_drawn_rows():
    """A draw's counts weigh each row; the result equals metrics.auroc on the
    rows repeated that many times, ties included."""
    scores = torch.tensor([0.1, 0.4, 0.4, 0.35, 0.8, 0.4, 0.2])
    positive = torch.tensor([0, 1, 0, 1, 1, 0, 0]).bool()
    counts = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [2, 0, 1, 3, 1, 0, 2], [0, 1, 0, 0, 1, 0, 0]], dtype=torch.float64)
    got = bootstrap.weighted_auroc(scores, positive, counts)
    for d in range(2):
        rows = torch.repeat_interleave(torch.arange(7), counts[d].long())
        assert got[d].item() == pytest.approx(metrics.auroc(scores[rows], positive[rows]))
    assert math.isnan(got[2])  # no negative drawn


def test_bootstrap_interval_covers_a_known_rate():
    """150 of 500 images right: the interval is about +-4 points around 0.30
    (binomial standard error 0.0205); all right gives [1, 1]."""
    ranks = torch.tensor([0] * 150 + [3] * 350)
    e = bootstrap.interval("classify/top1", {"rows": list(range(500)), "true_rank": ranks})
    assert e.value == pytest.approx(0.3)
    assert 0.25 < e.low < 0.27 and 0.33 < e.high < 0.35
    perfect = bootstrap.interval("classify/top1", {"rows": list(range(50)), "true_rank": [0] * 50})
    assert (perfect.low, perfect.value, perfect.high) == (1.0, 1.0, 1.0)


def test_paired_difference_resolves_what_separate_intervals_cannot():
    """Model a is right on every image b gets right and on 25 more of 500: a
    gain of 5 points, inside both models' own intervals' overlap, but the
    paired interval excludes 0. Identical models differ by exactly 0."""
    generator = torch.Generator().manual_seed(0)
    b_right = torch.rand(500, generator=generator) < 0.3
    a_right = b_right.clone()
    a_right[(~b_right).nonzero().flatten()[:25]] = True
    a = {"rows": list(range(500)), "true_rank": (~a_right).long()}
    b = {"rows": list(range(500)), "true_rank": (~b_right).long()}
    d = bootstrap.difference("classify/top1", a, b)
    assert d.value == pytest.approx(0.05) and 0.025 < d.low < d.value < d.high < 0.075  # sd 0.0097
    assert bootstrap.interval("classify/top1", a).low < bootstrap.interval("classify/top1", b).high  # overlap
    same = bootstrap.difference("classify/top1", b, b)
    assert (same.low, same.value, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="different rows"):
        bootstrap.difference("classify/top1", a, {**b, "rows": list(range(1, 501))})
