"""The paper's benchmark suite: MAKE's Table 1 and Table 2 on the authors' data folder.

    make-dist eval --suite paper --data DIR [--model M] [--weights W] [--concept-terms FILE|CHECKOUT] [--out R.json]

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

Whatever is not the paper's protocol to the letter is said beside the number:
concept columns scored with make-dist's own terms, and an average over fewer
sets than the paper's (docs/evaluation.md).
"""

from __future__ import annotations

import hashlib
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
from ..prompts import CONCEPT_PAIRS, SKIN_TEMPLATES
from . import metrics
from .report import COUNTS, count_tags, plots
from .tasks import (
    RECALL_KS,
    TaskResult,
    classification_result,
    concepts_result,
    encode_images,
    encode_texts,
    metric_name,
    retrieval_result,
    to_rgb,
)

SUITES = ("paper",)

CLASSIFY_SCALE = 100.0  # the authors' fixed logit scale for class probabilities

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

# The tables' Average columns: each over the paper's sets of its task.
AVERAGES = {
    "classify_avg_top1": tuple(b.name for b in BENCHMARKS if b.task == "classify"),
    "concepts_avg_auroc": tuple(b.name for b in BENCHMARKS if b.task == "concepts"),
    "retrieval_avg_recall": ("SkinCAP",),
}

# Where the authors' repository (SiyuanYan1/MAKE) keeps its concept terms. It
# carries no licence, so the file cannot ship here: it is read from a checkout.
AUTHORS_TERMS = "concept_annotation/term_lists/ConceptTerms.json"
MAKE_DIST_TERMS = "make-dist"  # the `concept_terms` entry of results scored with make-dist's own terms
# The authors' file as released (SiyuanYan1/MAKE cbb966a, 64 concepts), known by the SHA-256 of its
# content (json.dumps with sorted keys, so line endings and layout do not matter): recognised, not shipped.
AUTHORS_TERMS_SHA256 = {"b8d94a3ff5e0aa86d3597ce7781d7b02cf3e6f5a754a45bbb4be099099b2b5ab": "SiyuanYan1/MAKE cbb966a"}

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
    concept_terms: str | None = None  # a concept set's terms: the file read, or MAKE_DIST_TERMS
    authors_terms: bool = False  # ... and whether they are the authors' file as released

    def to_json(self) -> dict:
        out = {"task": self.benchmark.task, "status": self.status, "message": self.message,
               "rows": 0, "scored": 0, "skipped": [], "metrics": {}}
        if self.benchmark.task == "concepts":
            out.update(concept_terms=self.concept_terms, authors_terms=self.authors_terms)
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


@dataclass(frozen=True)
class ConceptTerms:
    """The terms the concept sets are scored with, and where they came from."""

    terms: dict[str, list[str]]
    source: str  # the file read, or MAKE_DIST_TERMS

    @property
    def authors(self) -> str | None:
        """The release of the authors' file these terms are (None: not theirs as
        released, so concept AUROCs not comparable with the paper's)."""
        canonical = json.dumps(self.terms, sort_keys=True).encode()
        return AUTHORS_TERMS_SHA256.get(hashlib.sha256(canonical).hexdigest())

    def describe(self) -> str:
        if self.source == MAKE_DIST_TERMS:
            return "make-dist's own concept terms"
        if self.authors:
            return f"the authors' concept terms ({self.source}, as released in {self.authors})"
        return f"the concept terms of {self.source}, not the authors' file as released (SiyuanYan1/MAKE cbb966a)"


def find_concept_terms(data_dir: str, given: str | None = None) -> str | None:
    """The terms file to read: `given` (a JSON file, or a checkout of the
    authors' repository, where AUTHORS_TERMS is looked up); without it, the
    authors' file when DIR sits in their checkout (their data/ folder, the
    layout their commands run in); None: make-dist's own terms."""
    if given:
        fs, path = fsspec.core.url_to_fs(given)
        if fs.isdir(path):
            inside = f"{given.rstrip('/')}/{AUTHORS_TERMS}"
            if not fs.isfile(f"{path.rstrip('/')}/{AUTHORS_TERMS}"):
                raise UserError(f"concept terms: {given} is a folder without {AUTHORS_TERMS}: name the authors' "
                                f"checkout (git clone https://github.com/SiyuanYan1/MAKE) or a terms JSON file")
            return inside
        if not fs.isfile(path):
            raise UserError(f"concept terms: {given} not found")
        return given
    fs, root = fsspec.core.url_to_fs(data_dir)
    above = root.rstrip("/").rpartition("/")[0]
    if above and fs.isfile(f"{above}/{AUTHORS_TERMS}"):
        protocol = data_dir.split("://")[0] + "://" if "://" in data_dir else ""
        return f"{protocol}{above}/{AUTHORS_TERMS}"
    return None


def concept_terms(data_dir: str, given: str | None = None) -> ConceptTerms:
    """The suite's concept terms, read and checked (see `find_concept_terms`)."""
    path = find_concept_terms(data_dir, given)
    if path is None:
        return ConceptTerms(load_concept_terms(default_concept_terms()), MAKE_DIST_TERMS)
    return ConceptTerms(load_concept_terms(path), path if "://" in path else os.path.abspath(path))


def how_to_get_authors_terms(option: str = "--concept-terms") -> str:
    return (f"for the authors' terms, clone their repository (git clone https://github.com/SiyuanYan1/MAKE) "
            f"and pass {option} MAKE (the checkout; {AUTHORS_TERMS} is read from it), or put the suite's data/ "
            f"folder inside that checkout")


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


def authors_transform(size: int):
    """The authors' evaluation transform (open_clip's): resize the shorter side
    (bicubic), centre crop, then convert to RGB. The order matters for palette
    and semi-transparent PNGs, which make-dist's own order (RGB first) reads
    differently; the model scales and normalises the uint8 result."""
    from torchvision import transforms as T  # here: a training run's driver imports this module, not torchvision

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), to_rgb,
                      T.PILToTensor()])


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
                                               anywhere=True,  # located by ImageFinder, inside the data
                                               transform=authors_transform(model.image_size))
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


def score_concepts(model, tokenizer, data_dir: str, benchmark: Benchmark, concept_terms: ConceptTerms,
                   batch_size: int = 64) -> TaskResult:
    folder = f"{data_dir.rstrip('/')}/{benchmark.folder}"
    terms = concept_terms.terms
    concepts = _concept_list(f"{folder}/concept_list.txt", concept_terms)
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


def run_suite(model, tokenizer, data_dir: str, terms: str | None = None, batch_size: int = 64,
              say=print) -> list[SetResult]:
    """Every benchmark of the paper found in DIR, scored; one SetResult per benchmark.
    terms: the concept terms file or the authors' checkout (`find_concept_terms`)."""
    found = check_data(data_dir)
    chosen = None
    if any(found[b.name] for b in BENCHMARKS if b.task == "concepts"):
        chosen = concept_terms(data_dir, terms)
        say(f"concept terms: {chosen.describe()}" if chosen.authors else
            f"concept terms: {chosen.describe()}: SkinCon and Derm7pt are not comparable with the paper's row; "
            + how_to_get_authors_terms())
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
                result = score_concepts(model, tokenizer, data_dir, b, chosen, batch_size)
            else:
                result = score_retrieval(model, tokenizer, data_dir, b, batch_size)
        except UserError as e:
            results.append(SetResult(b, "error", str(e), concept_terms=_source(b, chosen),
                                     authors_terms=bool(_source(b, chosen) and chosen.authors)))
            say(f"{b.name}: stopped: {e}")
            continue
        results.append(SetResult(b, "scored", result=result, concept_terms=_source(b, chosen),
                                 authors_terms=bool(_source(b, chosen) and chosen.authors)))
        if result.skipped:
            say(f"{b.name}: {len(result.skipped)} of {result.rows} rows skipped "
                f"(first: row {result.skipped[0]['row']}: {result.skipped[0]['reason']})")
    return results


def _source(benchmark: Benchmark, chosen: ConceptTerms | None) -> str | None:
    return chosen.source if benchmark.task == "concepts" and chosen is not None else None


AVERAGE_NAMES = {"classify_avg_top1": "Avg (classification)", "concepts_avg_auroc": "Avg (concepts)",
                 "retrieval_avg_recall": "Avg (retrieval)"}
# The metric each Average column takes from a set of its task.
_AVERAGED = {"classify_avg_top1": "top1", "concepts_avg_auroc": "mean_auroc", "retrieval_avg_recall": "mean_recall"}


def _number(value) -> bool:
    return value is not None and value == value  # not missing, not NaN


def averaged_over(results: list[SetResult]) -> dict[str, list[str]]:
    """{average: the sets it is taken over}: those scored with a value (a
    concept set whose columns all hold one class has no AUROC)."""
    values = {r.benchmark.name: r.result.metrics for r in results if r.status == "scored"}
    out = {}
    for key, names in AVERAGES.items():
        metric = _AVERAGED[key]
        sets = [n for n in names if n in values and _number(values[n].get(metric))]
        if sets:
            out[key] = sets
    return out


def averages(results: list[SetResult]) -> dict[str, float]:
    """The tables' Average columns, over the sets scored (`averaged_over`):
    classification top-1, concept AUROC, and SkinCAP's six recalls."""
    values = {r.benchmark.name: r.result.metrics for r in results if r.status == "scored"}
    return {key: sum(values[n][_AVERAGED[key]] for n in sets) / len(sets)
            for key, sets in averaged_over(results).items()}


def partial_averages(results: list[SetResult]) -> dict[str, str]:
    """{average: "3/4"} for each average taken over fewer sets than the paper's."""
    return {key: f"{len(sets)}/{len(AVERAGES[key])}" for key, sets in averaged_over(results).items()
            if len(sets) < len(AVERAGES[key])}


def _other_terms(results: list[SetResult]) -> list[str]:
    """The terms (file, or make-dist) of scored concept sets that are not the authors' file as released."""
    return sorted({r.concept_terms for r in results if r.status == "scored" and r.benchmark.task == "concepts"
                   and not r.authors_terms})


def caveats(results: list[SetResult]) -> list[str]:
    """What keeps these numbers from the paper's protocol to the letter, in a
    few words each (for a one-line summary; `tables` says it in full)."""
    out = [f"{key} over {count} sets" for key, count in partial_averages(results).items()]
    if _other_terms(results):
        out.append("concept sets not with the authors' terms")
    return out


# ---------------------------------------------------------------------------
# Results out


def tables(results: list[SetResult], label: str) -> str:
    """Table 1 and Table 2 as the paper prints them, the paper's MAKE row above
    ours. A value that is not the paper's protocol to the letter is marked and
    the mark explained below: * concept columns scored with terms other than
    the authors' file as released, + an average over fewer sets than the
    paper's."""
    by_name = {r.benchmark.name: r for r in results}
    own_terms = _other_terms(results)
    partial = partial_averages(results)
    ours_avg = averages(results)
    paper_avg = {key: sum(PAPER_MAKE[n][_AVERAGED[key]] for n in AVERAGES[key]) / len(AVERAGES[key])
                 for key in ("classify_avg_top1", "concepts_avg_auroc")}

    def ours(name: str, key: str):
        r = by_name.get(name)
        return r.result.metrics.get(key) if r is not None and r.status == "scored" else None

    def cell(value, mark: str = "") -> str:  # room for two marks: an average over fewer sets of other terms
        return f"{value:>9.4f}{mark:2}" if _number(value) else f"{'-':>9}  "

    classify = AVERAGES["classify_avg_top1"]
    concepts = AVERAGES["concepts_avg_auroc"]
    width = max(14, len(label))
    head1 = " ".join(f"{n:>9}  " for n in ["PAD", "F17K", "SD-128", "SNU-134", "Avg", "SkinCon", "Derm7pt", "Avg"])
    recall_keys = [f"{d}_R{k}" for d in ("i2t", "t2i") for k in RECALL_KS]
    head2 = " ".join(f"{k:>9}  " for k in recall_keys + ["Avg"])
    terms_mark = "*" if own_terms else ""

    def avg_mark(key: str) -> str:
        return "+" if key in partial else ""

    lines = ["Table 1: zero-shot classification (top-1 accuracy) and concept annotation (AUROC)",
             f"{'':{width}} {head1}",
             f"{'MAKE (paper)':{width}} "
             + " ".join([cell(PAPER_MAKE[n]["top1"]) for n in classify] + [cell(paper_avg["classify_avg_top1"])]
                        + [cell(PAPER_MAKE[n]["mean_auroc"]) for n in concepts]
                        + [cell(paper_avg["concepts_avg_auroc"])]),
             f"{label:{width}} "
             + " ".join([cell(ours(n, "top1")) for n in classify]
                        + [cell(ours_avg.get("classify_avg_top1"), avg_mark("classify_avg_top1"))]
                        + [cell(ours(n, "mean_auroc"), terms_mark) for n in concepts]
                        + [cell(ours_avg.get("concepts_avg_auroc"), terms_mark + avg_mark("concepts_avg_auroc"))])]
    lines += ["", "Table 2: SkinCAP cross-modal retrieval (recall@K, image->text and text->image)",
              f"{'':{width}} {head2}"]
    paper_recalls = [PAPER_MAKE["SkinCAP"][k] for k in recall_keys]
    lines.append(f"{'MAKE (paper)':{width}} "
                 + " ".join(cell(v) for v in paper_recalls + [sum(paper_recalls) / len(paper_recalls)]))
    lines.append(f"{label:{width}} "
                 + " ".join([cell(ours("SkinCAP", k)) for k in recall_keys] + [cell(ours("SkinCAP", "mean_recall"))]))
    lines.append("")
    if own_terms:
        which = ", ".join("make-dist's own" if t == MAKE_DIST_TERMS else t for t in own_terms)
        lines.append(f"* concept terms not the authors' file as released ({which}): not comparable with the "
                     f"paper's row; {how_to_get_authors_terms()}")
    for key, count in partial.items():
        left_out = [n for n in AVERAGES[key] if n not in averaged_over(results)[key]]
        sets, of = count.split("/")
        lines.append(f"+ {AVERAGE_NAMES[key]}: the average of {sets} of the paper's {of} sets (without "
                     f"{', '.join(left_out)}): not comparable with the paper's average")
    if own_terms or partial:
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
    """The suite's results; `averaged_over` names the sets behind each average
    (`of`: how many the paper's average has)."""
    return {"suite": "paper", "averages": averages(results),
            "averaged_over": {key: {"sets": sets, "count": len(sets), "of": len(AVERAGES[key])}
                              for key, sets in averaged_over(results).items()},
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
    # What a number beside the paper's is made of: the concept terms, the sets behind each average.
    for r in results:
        if r.status == "scored" and r.concept_terms:
            run.set_tags({f"{prefix}/{metric_name(r.benchmark.name)}/concept_terms": r.concept_terms,
                          f"{prefix}/{metric_name(r.benchmark.name)}/authors_terms": str(r.authors_terms).lower()})
    run.set_tags({f"{prefix}/{key}/sets": f"{len(sets)} of {len(AVERAGES[key])}"
                  for key, sets in averaged_over(results).items()})
    with tempfile.TemporaryDirectory() as tmp:
        for r in results:
            if r.status == "scored":
                folder = os.path.join(tmp, metric_name(r.benchmark.name))
                os.makedirs(folder)
                for path in plots(r.result, folder, r.benchmark.name):
                    run.log_file(path, f"{prefix}/{metric_name(r.benchmark.name)}")
    run.log_text(json.dumps(to_json(results), indent=1), "results.json", prefix)


def _concept_list(path: str, concept_terms: ConceptTerms) -> list[str]:
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
        if not concept_terms.terms.get(concept):
            where = "make-dist's terms" if not concept_terms.authors else concept_terms.source
            raise UserError(f"{path}: line {number}: concept {line.strip()!r} has no terms in {where}")
        concepts.append(concept)
    if not concepts:
        raise UserError(f"{path}: no concepts listed")
    return concepts
