"""The three zero-shot tasks (docs/spec.md, section 5) on a model and a table.

    classify  image + label       -> top-1, top-5, macro AUROC, confusion matrix
    concepts  image + 0/1 columns -> AUROC per concept and their mean
    retrieval image + caption     -> recall at 10, 50, 100 both ways (i2t_R10 ...) and their mean

Every image of the table is scored (the authors' evaluation scored only its
first batch); an image that cannot be read is skipped and counted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from ..config import TASKS
from ..data.shards import table_rows
from ..data.stream import image_transform
from ..errors import UserError
from ..files import OutsideRoot, image_location, open_image, read_bytes
from ..prompts import CLASS_TEMPLATES, CONCEPT_TEMPLATES
from ..tokens import token_lengths
from ..typed import read_yaml
from . import metrics

RECALL_KS = (10, 50, 100)
# The metrics each task reports as `eval/<task>/<name>` during training (what a sweep can optimise).
REPORTED = {
    "classify": ("top1", "top5", "macro_auroc", "chance_top1"),
    "concepts": ("mean_auroc",),
    "retrieval": (*(f"{d}_R{k}" for d in ("i2t", "t2i") for k in RECALL_KS), "mean_recall"),
}


@dataclass
class TaskResult:
    task: str
    rows: int  # rows in the table
    scored: int  # images scored
    skipped: list[dict] = field(default_factory=list)  # [{row, image, reason}]
    metrics: dict[str, float] = field(default_factory=dict)
    # What the plots show, and what each scored image contributes (its table
    # row in "rows"), for bootstrap intervals (make_dist/evaluate/bootstrap.py).
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        details = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in self.details.items()}
        return {"task": self.task, "rows": self.rows, "scored": self.scored, "skipped": self.skipped,
                "metrics": self.metrics, "details": details}


# ---------------------------------------------------------------------------
# Encoding


def to_rgb(image):
    """A PIL image in RGB (a module function: a DataLoader worker pickles the transform)."""
    return image.convert("RGB")


def eval_transform(size: int):
    """make-dist's evaluation transform: RGB first, then resize and centre crop
    (what the loader sees of a shard, which holds RGB). The paper suite uses
    the authors' order instead (`paper.authors_transform`)."""
    from torchvision import transforms as T

    return T.Compose([to_rgb, image_transform(size, train=False)])


class _TableImages(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], images_root: str | None, transform, anywhere: bool):
        self.paths, self.root, self.transform, self.anywhere = paths, images_root, transform, anywhere

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = open_image(read_bytes(image_location(self.paths[i], self.root, self.anywhere)))
            return i, self.transform(image), None
        except OutsideRoot as e:
            return i, None, str(e)
        except FileNotFoundError:
            return i, None, "image not found"
        except Exception as e:  # unreadable, truncated, not an image
            return i, None, f"image unreadable: {type(e).__name__}: {e}"


def _collate(items):
    return items


@torch.no_grad()
def encode_images(model, paths: list[str], images_root: str | None, batch_size: int = 64, workers: int = 0,
                  progress: str | None = None, anywhere: bool = False, transform=None):
    """(embeddings (M, D) of the readable images, their row indices, skipped records).
    progress: a label for a bar of images encoded (none without it). A path
    that leaves images_root is skipped with its reason unless `anywhere`.
    transform: decoded PIL image -> uint8 (3, S, S) (default: `eval_transform`)."""
    from tqdm import tqdm

    transform = transform or eval_transform(model.image_size)
    loader = torch.utils.data.DataLoader(_TableImages(paths, images_root, transform, anywhere), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate)
    device = _device(model)
    embeddings, rows, skipped = [], [], []
    bar = tqdm(total=len(paths), desc=progress, unit="image", disable=progress is None, file=sys.stdout,
               dynamic_ncols=True, leave=False)
    for items in loader:
        bar.update(len(items))
        good = [(i, x) for i, x, reason in items if reason is None]
        skipped += [{"row": i, "image": paths[i], "reason": reason} for i, _, reason in items if reason]
        if good:
            batch = torch.stack([x for _, x in good]).to(device)  # uint8: the model normalises
            embeddings.append(model.encode_image(batch)[0].float())
            rows += [i for i, _ in good]
    bar.close()
    if not embeddings:
        raise UserError(f"no image of the table could be read ({len(skipped)} tried; first: "
                        f"{skipped[0]['image']}: {skipped[0]['reason']})" if skipped else "the table has no images")
    return torch.cat(embeddings), torch.tensor(rows), skipped


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Normalised embeddings of texts, each batch cut to its longest real text
    (the training rule, `token_lengths`: equal to the full-context encoding)."""
    device = _device(model)
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size])
        length = max(int(token_lengths(tokens).max()), 1)
        out.append(model.encode_text(tokens[:, :length].to(device)).float())
    return torch.cat(out)


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------
# Tasks


def load_classes(path: str) -> dict[str, list[str]]:
    """Class names and their synonyms: a YAML mapping `name: [synonyms]`, or a
    list of names or of `{name, synonyms}`."""
    raw = read_yaml(path, "class list", (dict, list))
    if isinstance(raw, dict):
        classes = {str(k): [str(s) for s in (v or [])] for k, v in raw.items()}
    elif isinstance(raw, list):
        classes = {}
        for item in raw:
            if isinstance(item, dict) and "name" in item:
                classes[str(item["name"])] = [str(s) for s in item.get("synonyms") or []]
            else:
                classes[str(item)] = []
    if len(classes) < 2:
        raise UserError(f"{path}: at least 2 classes are needed, found {len(classes)}")
    return classes


def classify(model, tokenizer, table: str, classes: dict[str, list[str]], images_root: str | None = None,
             image_column: str = "image", label_column: str = "label", batch_size: int = 64,
             images_anywhere: bool = False) -> TaskResult:
    rows = table_rows(table, [image_column, label_column])
    names = list(classes)
    unknown = sorted({str(r[label_column]) for r in rows} - set(names))
    if unknown:
        raise UserError(f"{table}: labels not in the class list: {', '.join(unknown[:10])}"
                        f"{' ...' if len(unknown) > 10 else ''} (classes: {', '.join(names[:10])} ...)")
    images, scored, skipped = encode_images(model, [r[image_column] for r in rows], images_root, batch_size,
                                             anywhere=images_anywhere)
    prototypes = torch.stack([_prompt_mean(model, tokenizer, [t.format(n) for t in CLASS_TEMPLATES
                                                              for n in [name, *classes[name]]]) for name in names])
    scores = images @ prototypes.T  # cosines: the ranking of classes
    labels = torch.tensor([names.index(str(rows[i][label_column])) for i in scored.tolist()])
    result = classification_result(scores, labels, names, len(rows), scored, skipped)
    if len(names) <= 50:  # one-vs-rest AUROC means little over hundreds of classes
        # class probabilities at the model's learned temperature, as concept annotation
        probabilities = (model.scale().float().detach().cpu() * scores.cpu()).softmax(1)
        result.metrics["macro_auroc"] = metrics.macro_auroc(probabilities, labels)
    return result


def classification_result(scores: torch.Tensor, labels: torch.Tensor, names: list[str], rows: int,
                          scored: torch.Tensor, skipped: list[dict]) -> TaskResult:
    """Top-1, top-5 (ties against the model) and chance, the confusion matrix
    and each image's true-class rank, from (M, C) class scores of the scored images."""
    return TaskResult("classify", rows, len(scored), skipped, {
        "top1": metrics.topk_accuracy(scores, labels, 1),
        "top5": metrics.topk_accuracy(scores, labels, 5),
        "chance_top1": 1 / len(names),
    }, {"classes": names, "confusion": metrics.confusion_matrix(scores.argmax(1), labels, len(names)),
        "rows": scored, "true_rank": metrics.rank_of(scores, labels)})


def annotate_concepts(model, tokenizer, table: str, images_root: str | None = None, image_column: str = "image",
                      batch_size: int = 64, images_anywhere: bool = False) -> TaskResult:
    rows = table_rows(table, [image_column])
    concepts = [c for c in rows[0] if c != image_column]
    if not concepts:
        raise UserError(f"{table}: no concept columns beside {image_column!r}")
    for c in concepts:
        bad = [i for i, r in enumerate(rows) if str(r[c]).strip() not in ("0", "1", "0.0", "1.0")]
        if bad:
            raise UserError(f"{table}: concept column {c!r} holds {rows[bad[0]][c]!r} at row {bad[0]} (0 or 1 expected)")
    images, scored, skipped = encode_images(model, [r[image_column] for r in rows], images_root, batch_size,
                                             anywhere=images_anywhere)
    scale = model.scale().float().detach()
    probability = torch.zeros(len(scored), len(concepts))
    for concept_template, reference in CONCEPT_TEMPLATES:
        prompts = encode_texts(model, tokenizer, [concept_template.format(c) for c in concepts] + [reference])
        logits = scale * images @ prompts.T  # (M, C + 1)
        pair = torch.stack([logits[:, :-1], logits[:, -1:].expand(-1, len(concepts))], -1)
        probability += pair.softmax(-1)[..., 0].cpu() / len(CONCEPT_TEMPLATES)
    truth = torch.tensor([[float(rows[i][c]) > 0.5 for c in concepts] for i in scored.tolist()])
    return concepts_result(probability, truth, concepts, len(rows), scored, skipped)


def concepts_result(probability: torch.Tensor, truth: torch.Tensor, concepts: list[str], rows: int,
                    scored: torch.Tensor, skipped: list[dict]) -> TaskResult:
    """AUROC per concept (`auroc/<concept>`) and their mean over the concepts
    that have one (a column of one class only has none), from (M, C) scores and truth."""
    per_concept = {c: metrics.auroc(probability[:, j], truth[:, j]) for j, c in enumerate(concepts)}
    defined = [v for v in per_concept.values() if v == v]
    result = TaskResult("concepts", rows, len(scored), skipped,
                        {"mean_auroc": sum(defined) / len(defined) if defined else float("nan")},
                        {"auroc": per_concept, "concepts": concepts, "rows": scored,
                         "probability": probability, "truth": truth})
    result.metrics.update({f"auroc/{metric_name(c)}": v for c, v in per_concept.items() if v == v})
    return result


def metric_name(name: str) -> str:
    """A name fit for one level of an MLflow metric key (letters, digits, _ - .)."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)


def retrieve(model, tokenizer, table: str, images_root: str | None = None, image_column: str = "image",
             caption_column: str = "caption", batch_size: int = 64, images_anywhere: bool = False) -> TaskResult:
    """Row i's image matches row i's caption; every pair of the table is in play."""
    rows = table_rows(table, [image_column, caption_column])
    images, scored, skipped = encode_images(model, [r[image_column] for r in rows], images_root, batch_size,
                                             anywhere=images_anywhere)
    captions = encode_texts(model, tokenizer, [str(rows[i][caption_column]) for i in scored.tolist()])
    return retrieval_result(images @ captions.T, len(rows), scored, skipped)


def retrieval_result(similarity: torch.Tensor, rows: int, scored: torch.Tensor, skipped: list[dict]) -> TaskResult:
    """Recall at 10, 50, 100 both ways and their mean, from the (M, M) similarity
    of the scored images (rows) and their captions (columns); image i matches caption i."""
    result = TaskResult("retrieval", rows, len(scored), skipped)
    match = torch.arange(len(scored))
    result.details.update(rows=scored, i2t_rank=metrics.rank_of(similarity, match),
                          t2i_rank=metrics.rank_of(similarity.T, match))
    curves = {}
    for direction, sim in (("i2t", similarity), ("t2i", similarity.T)):
        for k in RECALL_KS:
            result.metrics[f"{direction}_R{k}"] = metrics.recall_at_k(sim, k)
        curves[direction] = [metrics.recall_at_k(sim, k) for k in range(1, min(100, len(scored)) + 1)]
    result.metrics["mean_recall"] = sum(result.metrics.values()) / len(result.metrics)
    result.details["recall_curves"] = curves
    return result


def run_task(task: str, model, tokenizer, table: str, images_root: str | None = None,
             classes: str | None = None, images_anywhere: bool = False) -> TaskResult:
    model.eval()
    if task == "classify":
        if not classes:
            raise UserError("classify needs a class list (--classes YAML)")
        return classify(model, tokenizer, table, load_classes(classes), images_root,
                        images_anywhere=images_anywhere)
    if task == "concepts":
        return annotate_concepts(model, tokenizer, table, images_root, images_anywhere=images_anywhere)
    if task == "retrieval":
        return retrieve(model, tokenizer, table, images_root, images_anywhere=images_anywhere)
    raise UserError(f"unknown task {task!r} (one of {', '.join(TASKS)})")


def _prompt_mean(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """The template ensemble: mean of the normalised prompt embeddings, renormalised."""
    return torch.nn.functional.normalize(encode_texts(model, tokenizer, prompts).mean(0), dim=-1)
