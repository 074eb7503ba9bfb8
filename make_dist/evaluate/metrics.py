"""Metrics of the zero-shot protocols (docs/spec.md, section 5), on plain tensors."""

from __future__ import annotations

import torch


def rank_of(scores: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's match among its columns, highest score first.

    A tie goes against the match: a column scoring the same ranks above it
    when its index is lower (a stable sort's order). Ties never count in the
    model's favour, and a model that scores everything alike ranks each match
    at its own index: chance level, not perfection."""
    target = scores.gather(1, match[:, None])
    columns = torch.arange(scores.shape[1], device=scores.device)
    tied_before = (scores == target) & (columns[None, :] < match[:, None])
    return (scores > target).sum(1) + tied_before.sum(1)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose true class ranks among the first k (ties: `rank_of`)."""
    return (rank_of(scores, labels) < k).float().mean().item()


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive scores
    above a random negative (ties count half). NaN without both classes."""
    positive = positive.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores.double())
    return ((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def macro_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean one-vs-rest AUROC over the classes present in `labels`."""
    values = [auroc(scores[:, c], labels == c) for c in range(scores.shape[1]) if (labels == c).any()]
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) counts: row = true class, column = predicted."""
    return torch.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def recall_at_k(similarity: torch.Tensor, k: int) -> float:
    """Rows are queries whose match is the column of the same index: the
    fraction whose match ranks among the first k (ties: `rank_of`)."""
    match = torch.arange(similarity.shape[0], device=similarity.device)
    return (rank_of(similarity, match) < k).float().mean().item()


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks, tied values sharing their mean rank."""
    order = torch.argsort(x)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    # average within runs of ties
    unique, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(unique), dtype=x.dtype).index_add_(0, inverse, ranks[order])
    ranks[order] = (sums / counts)[inverse]
    return ranks
