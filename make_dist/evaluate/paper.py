"""The paper's benchmark suite: MAKE's Table 1 and Table 2 on the authors' data folder.

    make-dist eval --suite paper --data DIR --model M [--weights W] [--concept-terms FILE] [--out R.json]

DIR is the authors' data/ folder. Each set is read where it lies, in the
authors' layout (docs/evaluation.md), and scored with the paper's protocol:

    classify   PAD/ F17K/ SD-128/ SNU/   filename + integer label into the paper's class list;
                                         8 skin templates averaged; softmax of 100 x cosine
    concepts   skincon/ derm7pt/         concept_list.txt + terms; meta.csv (ImageID, 0/1 by position);
                                         images in final_images/; the MONET score (6 template pairs)
    retrieval  skin_cap/                 filename + caption_zh_polish_en, row i's image <-> row i's caption

Every row of every set is scored (the authors' current release scores only
each classification set's first 2,048 rows). A set that is absent is
reported as missing; a set whose files break the protocol (a label outside
its class list, a concept without terms, meta.csv columns that do not line
up) stops with an error naming the file, row and value; the others still run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from importlib import resources

import fsspec
import torch
import torch.nn.functional as F

from ..data.shards import table_rows
from ..errors import UserError
from ..files import within
from . import metrics
from .report import COUNTS, count_tags, plots
from .tasks import (RECALL_KS, TaskResult, classification_result, concepts_result, encode_images, encode_texts,
                    metric_name, retrieval_result)

SUITES = ("paper",)

# The paper's classification prompts (the authors' OPENAI_SKIN_TEMPLATES), one list for all four sets.
SKIN_TEMPLATES = (
    "This is a skin image of {}",
    "This is a skin image of {}.",
    "A skin image of {}.",
    "An image of {}, a skin condition.",
    "{}, a skin disorder, is shown in this image.",
    "The skin lesion depicted is {}.",
    "The skin cancer in this image is {}.",
    "This image depicts {}, a type of skin cancer.",
)
CLASSIFY_SCALE = 100.0  # the authors' fixed logit scale for class probabilities

# MONET's concept score: (template filled with each term of the concept, reference without it).
CONCEPT_PAIRS = (
    ("This is skin image of {}", "This is skin image"),
    ("This is dermatology image of {}", "This is dermatology image"),
    ("This is image of {}", "This is image"),
    ("A skin image of {}", "A skin image"),
    ("An image of {}, a skin condition.", "An image of a skin condition."),
    ("{}, a skin disorder, is shown in this image.", "a skin disorder is shown in this image."),
)
CONCEPT_SCALE = math.exp(4.5944)  # MONET's softmax temperature, 1 / exp(4.5944)


@dataclass(frozen=True)
class Benchmark:
    """One downstream set of the paper, where it lies under DIR."""

    name: str  # as in the paper's tables
    folder: str  # under DIR
    table: str  # inside the folder
    task: str  # classify | concepts | retrieval
    classes: str | None = None  # classify: class list shipped in paper_data/classes/
    images: str = "images"  # the set's own image folder


BENCHMARKS = (
    Benchmark("PAD-UFES-20", "PAD", "MAKE_PAD.csv", "classify", "pad.txt"),
    Benchmark("Fitzpatrick17k", "F17K", "MAKE_F17K.csv", "classify", "f17k.txt"),
    Benchmark("SD-128", "SD-128", "MAKE_SD-128.csv", "classify", "sd128.txt"),
    Benchmark("SNU-134", "SNU", "MAKE_SNU.csv", "classify", "snu134.txt"),
    Benchmark("SkinCon", "skincon", "meta.csv", "concepts", images="final_images"),
    Benchmark("Derm7pt", "derm7pt", "meta.csv", "concepts", images="final_images"),
    Benchmark("SkinCAP", "skin_cap", "skin_cap_meta.csv", "retrieval"),
)

# The paper's MAKE row (MICCAI 2025, Tables 1 and 2), printed beside ours.
PAPER_MAKE = {
    "PAD-UFES-20": {"top1": 0.5953}, "Fitzpatrick17k": {"top1": 0.3242}, "SD-128": {"top1": 0.3914},
    "SNU-134": {"top1": 0.3270}, "SkinCon": {"mean_auroc": 0.7873}, "Derm7pt": {"mean_auroc": 0.6864},
    "SkinCAP": {"i2t_R10": 0.2096, "i2t_R50": 0.4440, "i2t_R100": 0.5613,
                "t2i_R10": 0.1995, "t2i_R50": 0.4420, "t2i_R100": 0.5628},
}


@dataclass
class SetResult:
    """What became of one benchmark: scored, missing, or stopped by an error."""

    benchmark: Benchmark
    status: str  # scored | missing | error
    message: str = ""
    result: TaskResult | None = None

    def to_json(self) -> dict:
        out = {"task": self.benchmark.task, "status": self.status, "message": self.message,
               "rows": 0, "scored": 0, "skipped": [], "metrics": {}}
        if self.result is not None:
            r = self.result
            out.update(rows=r.rows, scored=r.scored, skipped=r.skipped, metrics=r.metrics)
        return out


# ---------------------------------------------------------------------------
# The protocol, on embeddings (each step checkable by hand: tests/test_paper_suite.py)


def class_embeddings(encode, names: list[str], templates=SKIN_TEMPLATES) -> torch.Tensor:
    """(C, D): per class, the mean of its normalised template embeddings, renormalised."""
    prompts = [t.format(name) for name in names for t in templates]
    texts = F.normalize(encode(prompts), dim=-1).reshape(len(names), len(templates), -1)
    return F.normalize(texts.mean(1), dim=-1)


def concept_presence(images: torch.Tensor, targets: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(M,) MONET's presence score of one concept in M normalised images.

    targets (T, K, D): template t filled with term k; references (T, D). Per
    template, the cosine to the concept (averaged over its terms) against the
    cosine to the reference through a two-way softmax at MONET's temperature;
    the mean over templates."""
    target = torch.einsum("md,tkd->mtk", images, targets).mean(-1)  # (M, T)
    reference = images @ references.T  # (M, T)
    return torch.sigmoid(CONCEPT_SCALE * (target - reference)).mean(1)  # softmax of a pair = sigmoid of the gap


# ---------------------------------------------------------------------------
# Reading the authors' layout


def class_names(benchmark: Benchmark) -> list[str]:
    """The paper's class list of a set: its integer labels index into it."""
    text = resources.files(__package__).joinpath("paper_data", "classes", benchmark.classes).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def default_concept_terms() -> str:
    """make-dist's own synonym terms for the SkinCon and Derm7pt concepts."""
    return str(resources.files(__package__).joinpath("paper_data", "concept_terms.json"))


def load_concept_terms(path: str) -> dict[str, list[str]]:
    """{concept (lower case): [terms]} from a JSON object, as the authors' ConceptTerms.json."""
    try:
        with fsspec.open(path, "rt") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise UserError(f"concept terms: {path} not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"concept terms: {path} is not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"concept terms: {path} must hold an object {{concept: [terms]}}")
    terms = {}
    for concept, values in raw.items():
        values = [values] if isinstance(values, str) else values
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise UserError(f"concept terms: {path}: {concept!r} must map to a list of strings")
        terms[str(concept).strip().lower()] = [v for v in values if v.strip()]
    return terms


class ImageFinder:
    """Where a set's images are: the path as written in its table (relative to
    the folder above DIR, where the authors' commands run), else the set's own
    image folder by file name; a concept set's ImageID by name only (the
    authors read final_images/). The own folder is listed once, so a set of
    16,000 rows costs no request per row on object storage."""

    def __init__(self, data_dir: str, benchmark: Benchmark):
        self.fs, root = fsspec.core.url_to_fs(data_dir)
        root = root.rstrip("/")
        self.protocol = data_dir.split("://")[0] + "://" if "://" in data_dir else ""
        self.above = root.rpartition("/")[0] or ("/" if root.startswith("/") else ".")
        self.own_folder = f"{root}/{benchmark.folder}/{benchmark.images}"
        try:
            listed = self.fs.find(self.own_folder) if self.fs.isdir(self.own_folder) else []
        except FileNotFoundError:
            listed = []
        self.own = {p.rpartition("/")[2]: p for p in listed}
        self.listed = set(listed)
        self.by_name_only = benchmark.task == "concepts"

    def find(self, filename: str) -> tuple[str | None, list[str]]:
        """(the image's URL or None, the places tried)."""
        tried = []
        if not self.by_name_only:
            found = self._as_written(filename, tried)
            if found:
                return found, tried
        name = filename.replace("\\", "/").rpartition("/")[2]
        own = f"{self.protocol}{self.own_folder}/{name}"
        if own not in tried:
            tried.append(own)
        return (self.protocol + self.own[name] if name in self.own else None), tried

    def _as_written(self, filename: str, tried: list[str]) -> str | None:
        """The path as written, when it stays inside the folder above DIR: a
        table must not make the suite read (or fetch) anything elsewhere."""
        if "://" in filename:
            if not within(filename, self.protocol + self.above):
                return None
            tried.append(filename)
            return filename if fsspec.core.url_to_fs(filename)[0].exists(filename) else None
        path = filename if os.path.isabs(filename) else f"{self.above}/{filename}"
        path = path if self.protocol else os.path.normpath(path)
        if not within(self.protocol + path, self.protocol + self.above):
            return None
        tried.append(self.protocol + path)
        if path in self.listed or (not self.protocol and os.path.isfile(path)):
            return self.protocol + path
        return None


def _cell_text(value) -> str:
    return "" if value is None else str(value).strip()


def _encode_found(model, finder: ImageFinder, filenames: list[str], batch_size: int, label: str):
    """Embeddings of the images that are found and readable, their row indices,
    and a record of every row that is not (never dropped silently)."""
    located, missing = [], []
    for row, name in enumerate(filenames):
        url, tried = finder.find(name) if name else (None, [])
        if url is None:
            reason = f"image not found (tried {', '.join(tried)})" if name else "no file name"
            missing.append({"row": row, "image": name, "reason": reason})
        else:
            located.append((row, url))
    if not located:
        raise UserError(f"{label}: none of its {len(filenames)} images was found "
                        f"(first: {missing[0]['image']!r}: {missing[0]['reason']})")
    images, found, unreadable = encode_images(model, [u for _, u in located], None, batch_size, progress=label,
                                               anywhere=True)  # located by ImageFinder, inside the data
    rows = torch.tensor([located[i][0] for i in found.tolist()])
    for s in unreadable:
        s["row"] = located[s["row"]][0]
    skipped = sorted(missing + unreadable, key=lambda s: s["row"])
    return F.normalize(images, dim=-1), rows, skipped


# ---------------------------------------------------------------------------
# The three tasks of the suite


def score_classification(model, tokenizer, data_dir: str, benchmark: Benchmark, batch_size: int = 64) -> TaskResult:
    table = f"{data_dir.rstrip('/')}/{benchmark.folder}/{benchmark.table}"
    names = class_names(benchmark)
    rows = table_rows(table, ["filename", "label"])
    labels = []
    for i, row in enumerate(rows):
        value = _cell_text(row["label"])
        try:
            label = int(float(value))
            if label != float(value):
                raise ValueError
        except (ValueError, OverflowError):  # not a number, or inf
            label = None
        if label is None or not 0 <= label < len(names):
            raise UserError(f"{table}: row {i} (line {i + 2}): label {value!r} is not a class index 0..{len(names) - 1} "
                            f"of the paper's {len(names)} {benchmark.name} classes")
        labels.append(label)
    images, scored, skipped = _encode_found(model, ImageFinder(data_dir, benchmark),
                                            [_cell_text(r["filename"]) for r in rows], batch_size, benchmark.name)
    classes = class_embeddings(lambda texts: encode_texts(model, tokenizer, texts), names)
    cosines = images @ classes.T
    truth = torch.tensor(labels)[scored]
    result = classification_result(cosines, truth, names, len(rows), scored, skipped)
    if benchmark.name == "PAD-UFES-20":  # the paper's PAD mode: macro one-vs-rest AUROC on the probabilities
        result.metrics["macro_auroc"] = metrics.macro_auroc((CLASSIFY_SCALE * cosines.double()).softmax(1), truth)
    return result


def score_concepts(model, tokenizer, data_dir: str, benchmark: Benchmark, terms: dict[str, list[str]],
                   terms_path: str, batch_size: int = 64) -> TaskResult:
    folder = f"{data_dir.rstrip('/')}/{benchmark.folder}"
    concepts = _concept_list(f"{folder}/concept_list.txt", terms, terms_path)
    table = f"{folder}/{benchmark.table}"
    rows = table_rows(table, ["ImageID"])
    header = list(rows[0])
    if header[0] != "ImageID":
        raise UserError(f"{table}: the first column must be ImageID (found {header[0]!r})")
    truth_columns = header[1:]
    if len(truth_columns) != len(concepts):
        raise UserError(f"{table}: {len(truth_columns)} concept columns after ImageID, but "
                        f"{folder}/concept_list.txt lists {len(concepts)} concepts: the columns are read by "
                        f"position and must line up ({', '.join(truth_columns[:4])} ... vs "
                        f"{', '.join(concepts[:4])} ...)")
    truth = torch.zeros(len(rows), len(concepts), dtype=torch.bool)
    for i, row in enumerate(rows):
        for j, column in enumerate(truth_columns):
            value = _cell_text(row[column])
            if value not in ("0", "1", "0.0", "1.0"):
                raise UserError(f"{table}: row {i} (line {i + 2}), column {column!r} (concept {concepts[j]!r}): "
                                f"{value!r} is not 0 or 1")
            truth[i, j] = value.startswith("1")
    images, scored, skipped = _encode_found(model, ImageFinder(data_dir, benchmark),
                                            [_cell_text(r["ImageID"]) for r in rows], batch_size, benchmark.name)
    references = F.normalize(encode_texts(model, tokenizer, [ref for _, ref in CONCEPT_PAIRS]), dim=-1)
    presence = torch.zeros(len(scored), len(concepts))
    for j, concept in enumerate(concepts):
        prompts = [template.format(term) for template, _ in CONCEPT_PAIRS for term in terms[concept]]
        targets = F.normalize(encode_texts(model, tokenizer, prompts), dim=-1)
        presence[:, j] = concept_presence(images, targets.reshape(len(CONCEPT_PAIRS), len(terms[concept]), -1),
                                          references)
    return concepts_result(presence, truth[scored], concepts, len(rows), scored, skipped)


def score_retrieval(model, tokenizer, data_dir: str, benchmark: Benchmark, batch_size: int = 64) -> TaskResult:
    table = f"{data_dir.rstrip('/')}/{benchmark.folder}/{benchmark.table}"
    rows = table_rows(table, ["filename", "caption_zh_polish_en"])
    images, scored, skipped = _encode_found(model, ImageFinder(data_dir, benchmark),
                                            [_cell_text(r["filename"]) for r in rows], batch_size, benchmark.name)
    captions = encode_texts(model, tokenizer, [_cell_text(rows[i]["caption_zh_polish_en"]) for i in scored.tolist()])
    return retrieval_result(images @ F.normalize(captions, dim=-1).T, len(rows), scored, skipped)


def present(data_dir: str) -> dict[str, bool]:
    """{benchmark name: whether its table is in DIR}."""
    fs, root = fsspec.core.url_to_fs(data_dir)
    return {b.name: fs.isfile(f"{root.rstrip('/')}/{b.folder}/{b.table}") for b in BENCHMARKS}


def check_data(data_dir: str) -> dict[str, bool]:
    """`present`, or an error when DIR holds none of the sets (a wrong folder)."""
    fs, root = fsspec.core.url_to_fs(data_dir)
    if not fs.isdir(root):
        raise UserError(f"{data_dir}: no such folder (the authors' data/ folder is expected)")
    found = present(data_dir)
    if not any(found.values()):
        raise UserError(f"{data_dir}: none of the paper's sets is there (looked for "
                        + ", ".join(f"{b.folder}/{b.table}" for b in BENCHMARKS) + ")")
    return found


def run_suite(model, tokenizer, data_dir: str, concept_terms: str | None = None, batch_size: int = 64,
              say=print) -> list[SetResult]:
    """Every benchmark of the paper found in DIR, scored; one SetResult per benchmark."""
    found = check_data(data_dir)
    terms_path = concept_terms or default_concept_terms()
    model.eval()
    results = []
    for b in BENCHMARKS:
        if not found[b.name]:
            results.append(SetResult(b, "missing", f"no {b.folder}/{b.table} in {data_dir}"))
            say(f"{b.name}: missing ({results[-1].message}), skipped")
            continue
        say(f"{b.name}: scoring")
        try:
            if b.task == "classify":
                result = score_classification(model, tokenizer, data_dir, b, batch_size)
            elif b.task == "concepts":
                result = score_concepts(model, tokenizer, data_dir, b, load_concept_terms(terms_path), terms_path,
                                        batch_size)
            else:
                result = score_retrieval(model, tokenizer, data_dir, b, batch_size)
        except UserError as e:
            results.append(SetResult(b, "error", str(e)))
            say(f"{b.name}: stopped: {e}")
            continue
        results.append(SetResult(b, "scored", result=result))
        if result.skipped:
            say(f"{b.name}: {len(result.skipped)} of {result.rows} rows skipped "
                f"(first: row {result.skipped[0]['row']}: {result.skipped[0]['reason']})")
    return results


def averages(results: list[SetResult]) -> dict[str, float]:
    """The tables' Average columns, over the sets scored: classification top-1,
    concept AUROC, and SkinCAP's six recalls."""
    scored = {r.benchmark.name: r.result.metrics for r in results if r.status == "scored"}
    out = {}
    top1 = [m["top1"] for m in scored.values() if "top1" in m]
    auroc = [m["mean_auroc"] for m in scored.values() if "mean_auroc" in m and m["mean_auroc"] == m["mean_auroc"]]
    if top1:
        out["classify_avg_top1"] = sum(top1) / len(top1)
    if auroc:
        out["concepts_avg_auroc"] = sum(auroc) / len(auroc)
    if "SkinCAP" in scored:
        out["retrieval_avg_recall"] = scored["SkinCAP"]["mean_recall"]
    return out


# ---------------------------------------------------------------------------
# Results out


def tables(results: list[SetResult], label: str) -> str:
    """Table 1 and Table 2 as the paper prints them, the paper's MAKE row above ours."""
    by_name = {r.benchmark.name: r for r in results}

    def ours(name: str, key: str):
        r = by_name.get(name)
        return r.result.metrics.get(key) if r is not None and r.status == "scored" else None

    def cells(values: list) -> str:
        return " ".join(f"{v:>9.4f}" if v is not None and v == v else f"{'-':>9}" for v in values)

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None and v == v]
        return sum(values) / len(values) if values else None

    classify = [b.name for b in BENCHMARKS if b.task == "classify"]
    concepts = [b.name for b in BENCHMARKS if b.task == "concepts"]
    width = max(14, len(label))
    head1 = " ".join(f"{n:>9}" for n in ["PAD", "F17K", "SD-128", "SNU-134", "Avg", "SkinCon", "Derm7pt", "Avg"])
    recall_keys = [f"{d}_R{k}" for d in ("i2t", "t2i") for k in RECALL_KS]
    head2 = " ".join(f"{k:>9}" for k in recall_keys + ["Avg"])
    lines = ["Table 1: zero-shot classification (top-1 accuracy) and concept annotation (AUROC)",
             f"{'':{width}} {head1}"]
    for name, get in (("MAKE (paper)", lambda n, k: PAPER_MAKE[n].get(k)), (label, ours)):
        top1 = [get(n, "top1") for n in classify]
        auroc = [get(n, "mean_auroc") for n in concepts]
        lines.append(f"{name:{width}} {cells(top1 + [mean(top1)] + auroc + [mean(auroc)])}")
    lines += ["", "Table 2: SkinCAP cross-modal retrieval (recall@K, image->text and text->image)",
              f"{'':{width}} {head2}"]
    for name, get in (("MAKE (paper)", lambda n, k: PAPER_MAKE[n].get(k)), (label, ours)):
        recalls = [get("SkinCAP", k) for k in recall_keys]
        lines.append(f"{name:{width}} {cells(recalls + [mean(recalls)])}")
    lines.append("")
    for r in results:
        if r.status == "scored":
            note = f"{r.result.scored}/{r.result.rows} scored" + (f", {len(r.result.skipped)} skipped"
                                                                   if r.result.skipped else "")
        else:
            note = f"{r.status}: {r.message}"
        lines.append(f"{r.benchmark.name:15} {note}")
    return "\n".join(lines)


def to_json(results: list[SetResult]) -> dict:
    return {"suite": "paper", "averages": averages(results),
            "datasets": {r.benchmark.name: r.to_json() for r in results}}


def flat_metrics(results: list[SetResult], prefix: str = "paper") -> dict[str, float]:
    """`<prefix>/<set>/<metric>` of every scored set and `<prefix>/<average>`: what MLflow gets."""
    out = {f"{prefix}/{metric_name(r.benchmark.name)}/{k}": v for r in results if r.status == "scored"
           for k, v in r.result.metrics.items() if v == v and k not in COUNTS}
    out.update({f"{prefix}/{k}": v for k, v in averages(results).items()})
    return out


def log_suite(run, results: list[SetResult], step: int = 0, prefix: str = "paper") -> None:
    """Every metric, how many images each set scored (tags: counts, not
    curves), each scored set's plot, and the JSON of the suite, on an MLflow run."""
    run.log_metrics(flat_metrics(results, prefix), step)
    run.set_tags({k: v for r in results if r.status == "scored"
                  for k, v in count_tags(r.result, f"{prefix}/{metric_name(r.benchmark.name)}").items()})
    with tempfile.TemporaryDirectory() as tmp:
        for r in results:
            if r.status == "scored":
                folder = os.path.join(tmp, metric_name(r.benchmark.name))
                os.makedirs(folder)
                for path in plots(r.result, folder, r.benchmark.name):
                    run.log_file(path, f"{prefix}/{metric_name(r.benchmark.name)}")
    run.log_text(json.dumps(to_json(results), indent=1), "results.json", prefix)


def _concept_list(path: str, terms: dict[str, list[str]], terms_path: str) -> list[str]:
    """The concepts of a set, in the order of its meta.csv columns; each must have terms."""
    try:
        with fsspec.open(path, "rt") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"{path} not found (each concept set needs its concept list)") from None
    concepts = []
    for number, line in enumerate(lines, 1):
        concept = line.strip().lower()
        if not concept:
            continue
        if not terms.get(concept):
            raise UserError(f"{path}: line {number}: concept {line.strip()!r} has no terms in {terms_path}")
        concepts.append(concept)
    if not concepts:
        raise UserError(f"{path}: no concepts listed")
    return concepts
