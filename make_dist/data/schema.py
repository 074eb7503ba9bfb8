"""The data schema (docs/spec.md, section 1): the texts of one sample, and how
a table row becomes one through a column map. Every other data module reads
this one; the order of the texts in a sample is make_dist/slots.py's.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..prompts import CONCEPT_TEMPLATE, DISEASE_TEMPLATE
from ..slots import DEFAULT_K, n_slots
from ..typed import build_section, read_yaml

# A sentence ends at . ! ? ; followed by whitespace or the end of the caption.
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def split_sentences(caption: str, k: int = DEFAULT_K) -> list[str]:
    """The caption's sentences: split at sentence ends, strip, drop empty
    pieces and each piece's final period, keep the first k. A caption with
    no sentence end, or none left after that (".", say), gives one subtext
    equal to the caption: every sample has at least one."""
    pieces = []
    for piece in _SENTENCE_END.split(caption.strip()):
        piece = piece.strip()
        if piece.endswith("."):
            piece = piece[:-1].rstrip()
        if piece:
            pieces.append(piece)
    return pieces[:k] or [caption.strip()]


def disease_text(path: str) -> str:
    """Disease-aspect text from an ontology path like "malignant, melanoma"."""
    return DISEASE_TEMPLATE.format(path.strip())


def concept_text(concepts: list[str]) -> str:
    """Concept-aspect text from a list of concepts."""
    return CONCEPT_TEMPLATE.format(", ".join(c.strip() for c in concepts))


@dataclass
class Sample:
    """The texts of one image, as stored in a shard's `.json`."""

    caption: str
    disease_text: str | None = None
    concept_text: str | None = None
    subtexts: list[str] = field(default_factory=list)
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def texts(self, k: int = DEFAULT_K, caption: str = "raw") -> list[str | None]:
        """The N = k + 3 slots; None marks a missing slot. caption="knowledge"
        puts `knowledge_caption()` in slot 0 instead of the raw caption."""
        subtexts = (self.subtexts or split_sentences(self.caption, k))[:k]
        first = self.knowledge_caption() if caption == "knowledge" else self.caption
        slots: list[str | None] = [first, self.disease_text, self.concept_text, *subtexts]
        return slots + [None] * (n_slots(k) - len(slots))

    def knowledge_caption(self) -> str:
        """The caption with the disease and concept texts put before it: the
        paper's knowledge-augmented CLIP baseline (Derm1M-dagger). The aspect
        texts go first so that the 77-token context cuts the caption, not them."""
        return " ".join(t for t in (self.disease_text, self.concept_text, self.caption) if t)

    def to_json(self) -> dict[str, Any]:
        record = {"caption": self.caption, "disease_text": self.disease_text,
                  "concept_text": self.concept_text, "subtexts": self.subtexts}
        if self.label is not None:
            record["label"] = self.label
        record.update(self.extra)
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "Sample":
        known = {"caption", "disease_text", "concept_text", "subtexts", "label"}
        return cls(
            caption=record["caption"],
            disease_text=record.get("disease_text"),
            concept_text=record.get("concept_text"),
            subtexts=list(record.get("subtexts") or []),
            label=record.get("label"),
            extra={k: v for k, v in record.items() if k not in known},
        )


# ---------------------------------------------------------------------------
# Table rows -> samples, through a column mapping


class RowError(ValueError):
    """A row that cannot become a sample; the message is the reason recorded."""


@dataclass
class ColumnMap:
    """Which table column holds what (configs/columns/*.yaml).

    `subtexts` is either one column holding a JSON list or a list of columns
    (one sentence each, as in the MAKE example file). A cell whose text is in
    `missing` (compared case-insensitively) counts as empty.

    The authors' MAKE-format CSV switches slots off with two 0/1 list columns:
    `knowledge_mask` ([caption, disease text, concept text], in the order
    their training code reads it) and `subtext_mask` (one entry per subtext).
    A slot whose entry is 0 is a missing slot, whatever its cell holds.
    """

    image: str = "image"
    caption: str = "caption"
    disease_text: str | None = None  # used verbatim
    concept_text: str | None = None  # used verbatim
    disease: str | None = None  # ontology path, templated into the disease text
    concepts: str | None = None  # comma-separated list, templated into the concept text
    subtexts: str | list[str] | None = None
    knowledge_mask: str | None = None  # a list [caption, disease, concept] of 0/1: 0 switches the slot off
    subtext_mask: str | None = None  # a list of 0/1, one per subtext: 0 switches the subtext off
    label: str | None = None
    extra: list[str] = field(default_factory=list)  # copied into the sample's json
    missing: list[str] = field(default_factory=lambda: ["", "nan", "none", "null"])

    def used(self) -> list[str]:
        """Every column the mapping reads."""
        names = [self.image, self.caption, self.disease_text, self.concept_text, self.disease,
                 self.concepts, self.knowledge_mask, self.subtext_mask, self.label, *self.extra]
        names += self.subtexts if isinstance(self.subtexts, list) else [self.subtexts]
        return [n for n in names if n]

    def sample(self, row: dict[str, Any], k: int = DEFAULT_K) -> Sample:
        """The sample of one row; raises RowError with the reason when it has none."""
        caption = self._text(row, self.caption, "caption")
        if caption is None:
            raise RowError(f"empty caption (column {self.caption!r})")
        knowledge = self._mask(row, self.knowledge_mask, "knowledge mask", 3) or [1, 1, 1]
        if not knowledge[0]:
            raise RowError(f"its caption is switched off (column {self.knowledge_mask!r} = {knowledge}): "
                           f"a sample needs its caption")
        disease = self._text(row, self.disease_text, "disease text")
        if disease is None and self.disease:
            path = self._text(row, self.disease, "disease")
            disease = disease_text(path) if path else None
        concepts = self._text(row, self.concept_text, "concept text")
        if concepts is None and self.concepts:
            listed = self._text(row, self.concepts, "concepts")
            items = [c.strip() for c in (listed or "").split(",") if c.strip()]
            concepts = concept_text(items) if items else None
        return Sample(
            caption=caption,
            disease_text=disease if knowledge[1] else None,
            concept_text=concepts if knowledge[2] else None,
            subtexts=self._subtexts(row, caption, k),
            label=self._text(row, self.label, "label"),
            extra={name: _plain(row.get(name)) for name in self.extra},
        )

    def _subtexts(self, row, caption: str, k: int) -> list[str]:
        """The row's subtexts, those its mask switches off left out; none left:
        the caption's sentences (every sample has at least one subtext)."""
        if isinstance(self.subtexts, list):
            found = [self._text(row, name, "subtext") for name in self.subtexts]
        elif self.subtexts:
            found = self._list(row, self.subtexts)
        else:
            found = []
        if found and self.subtext_mask:
            mask = self._mask(row, self.subtext_mask, "subtext mask", len(found))
            found = [text for text, on in zip(found, mask) if on]
        subtexts = [s for s in found if s]
        return subtexts[:k] if subtexts else split_sentences(caption, k)

    def _mask(self, row: dict[str, Any], column: str | None, what: str, length: int) -> list[int] | None:
        """A 0/1 list cell: a JSON list in a CSV cell (the authors write
        "[1, 1, 0]") or a native list (Parquet); None when unmapped."""
        if not column:
            return None
        value = row.get(column)
        if hasattr(value, "tolist") and not isinstance(value, str):
            value = value.tolist()
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if not isinstance(value, list) or len(value) != length or not all(v in (0, 1) for v in value):
            raise RowError(f"{what} (column {column!r}) is {str(row.get(column))[:80]!r}: expected a list of "
                           f"{length} zeros and ones")
        return [int(v) for v in value]

    def _text(self, row: dict[str, Any], column: str | None, what: str) -> str | None:
        """The stripped text of a cell; None when the column is unmapped or the cell empty."""
        if not column:
            return None
        value = row.get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if not isinstance(value, str):
            raise RowError(f"{what} (column {column!r}) is {type(value).__name__} {value!r}, not text")
        if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):  # surrogate-escaped bad bytes
            raise RowError(f"{what} (column {column!r}) holds bytes that are not valid UTF-8")
        value = value.strip()
        return None if value.lower() in self.missing else value

    def _list(self, row: dict[str, Any], column: str) -> list[str]:
        """A list of texts: a native list cell (Parquet) or a JSON list in a text cell (CSV)."""
        value = row.get(column)
        if hasattr(value, "tolist") and not isinstance(value, str):  # numpy array: a Parquet list column
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            if not all(isinstance(v, str) or v is None for v in value):
                raise RowError(f"subtexts (column {column!r}) is not a list of texts")
            return [v.strip() for v in value if v and v.strip() and v.strip().lower() not in self.missing]
        cell = self._text(row, column, "subtexts")
        return _json_list(cell, column) if cell else []


def _json_list(cell: str, column: str) -> list[str]:
    try:
        value = json.loads(cell)
    except json.JSONDecodeError:
        raise RowError(f"subtexts (column {column!r}) is not a JSON list") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RowError(f"subtexts (column {column!r}) is not a JSON list of strings")
    return [v.strip() for v in value if v.strip()]


def _plain(value: Any) -> Any:
    """A JSON-safe cell value (numpy scalars and NaN become Python values)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def load_column_map(path) -> ColumnMap:
    """A column map from YAML; unknown keys and wrong types name the file."""
    raw = read_yaml(path, "column map")
    columns = build_section(ColumnMap, raw, "columns", lambda section, key: str(path))
    columns.missing = [m.lower() for m in columns.missing]
    return columns
