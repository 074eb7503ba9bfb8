"""95% bootstrap intervals of the zero-shot metrics, and of the difference
between two models scored on the same table.

The tasks keep what each scored image contributes (`TaskResult.details`):
the rank of its true class, its concept probabilities and truth, the rank of
its caption and of its image. A draw resamples the table's rows with
replacement and recomputes the metric from those; for a difference, both
models are recomputed on the same draw (a paired bootstrap: the images that
are hard for one model are mostly hard for the other, so the difference is
resolved far more finely than either metric alone). Retrieval resamples the
queries against the full gallery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .tasks import RECALL_KS

DRAWS = 1000

# A statistic maps a task's details and draws of the table's rows, given as
# counts (draws, rows): how often each row was drawn, to one value per draw.
Statistic = Callable[[dict, torch.Tensor], torch.Tensor]


def _top1(details: dict, counts: torch.Tensor) -> torch.Tensor:
    right = (_tensor(details["true_rank"]) < 1).double()
    return (counts * right).sum(1) / counts.sum(1)


def _concepts(details: dict, counts: torch.Tensor) -> torch.Tensor:
    probability, truth = _tensor(details["probability"]).double(), _tensor(details["truth"]).bool()
    per_concept = torch.stack([weighted_auroc(probability[:, j], truth[:, j], counts)
                               for j in range(truth.shape[1])], 1)
    return per_concept.nanmean(1)  # concepts with both classes in the draw, as metrics.auroc leaves out the rest


def _mean_recall(details: dict, counts: torch.Tensor) -> torch.Tensor:
    recalls = [(counts * (_tensor(details[f"{d}_rank"]) < k).double()).sum(1) / counts.sum(1)
               for d in ("i2t", "t2i") for k in RECALL_KS]
    return torch.stack(recalls, 1).mean(1)


def weighted_auroc(scores: torch.Tensor, positive: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """AUROC of each draw (a row of `counts`, how often each item is in it):
    the weighted probability that a positive scores above a negative, ties
    counting half (`metrics.auroc` at unit counts). NaN without both classes."""
    order = torch.argsort(scores)
    _, group = torch.unique_consecutive(scores[order], return_inverse=True)  # tied scores share a group
    positive, weights = positive[order], counts[:, order].double()
    negatives = weights * ~positive
    by_group = torch.zeros(len(weights), int(group.max()) + 1, dtype=torch.float64).index_add_(1, group, negatives)
    credit = by_group.cumsum(1) - by_group / 2  # negatives strictly below, and half of those tied
    above = (weights * positive * credit[:, group]).sum(1)
    return above / (weights * positive).sum(1) / negatives.sum(1)


STATISTICS: dict[str, tuple[str, Statistic]] = {
    "classify/top1": ("classify", _top1),
    "concepts/mean_auroc": ("concepts", _concepts),
    "retrieval/mean_recall": ("retrieval", _mean_recall),
}


@dataclass
class Estimate:
    value: float  # on the whole table
    low: float  # 2.5th percentile of the draws
    high: float  # 97.5th percentile

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def interval(metric: str, details: dict, draws: int = DRAWS, seed: int = 0) -> Estimate:
    """The metric ("classify/top1", ...) with its 95% bootstrap interval."""
    return _estimate([details], metric, draws, seed, lambda values: values[0])


def difference(metric: str, details_a: dict, details_b: dict, draws: int = DRAWS, seed: int = 0) -> Estimate:
    """Model a minus model b on the same rows, with its paired 95% interval."""
    rows_a, rows_b = _rows(details_a), _rows(details_b)
    if rows_a != rows_b:
        raise ValueError(f"{metric}: the two models scored different rows of the table; no paired difference")
    return _estimate([details_a, details_b], metric, draws, seed, lambda values: values[0] - values[1])


def _estimate(models: list[dict], metric: str, draws: int, seed: int, combine) -> Estimate:
    _, statistic = STATISTICS[metric]
    n = len(_rows(models[0]))
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(n, (draws, n), generator=generator)
    ones = torch.ones(draws, n, dtype=torch.float64)
    counts = torch.zeros(draws, n, dtype=torch.float64).scatter_add_(1, drawn, ones)  # times each row is drawn
    whole = torch.ones(1, n, dtype=torch.float64)
    value = combine([statistic(d, whole) for d in models]).item()
    samples = combine([statistic(d, counts) for d in models])
    samples = samples[~samples.isnan()]
    low, high = torch.quantile(samples, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Estimate(value, low, high)


def _rows(details: dict) -> list[int]:
    return [int(r) for r in _tensor(details["rows"]).tolist()]


def _tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value)
