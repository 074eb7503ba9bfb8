"""The text slots of one sample (docs/spec.md, section 1): N = K + 3 texts in a
fixed order, and which of them the loss reads.

    slot 0      raw caption
    slot 1      disease aspect   "This is a skin photo diagnosed as malignant, melanoma."
    slot 2      concept aspect   "This skin photo shows plaque, scale, erythema."
    slots 3..   subtexts: the caption's sentences, at most K

The loader tokenises only the slots the configured loss reads (the CLIP
baseline reads one), the loss masks out the rest: both ask here.
"""

from __future__ import annotations

RAW, DISEASE, CONCEPT, FIRST_SUBTEXT = 0, 1, 2, 3
DEFAULT_K = 8


def n_slots(k: int) -> int:
    """N = K + 3."""
    return k + FIRST_SUBTEXT


def in_mkcl(n: int, *, mkcl_subtexts: bool = True, mkcl_aspects: bool = True) -> list[bool]:
    """The slots L_mkcl scores (as positives and negatives) under its switches."""
    keep = [True] * n
    for slot in range(n):
        if slot in (DISEASE, CONCEPT) and not mkcl_aspects:
            keep[slot] = False
        if slot >= FIRST_SUBTEXT and not mkcl_subtexts:
            keep[slot] = False
    return keep


def read_by_loss(n: int, *, dkw: bool = True, slra: bool = True, mkcl_subtexts: bool = True,
                 mkcl_aspects: bool = True) -> list[bool]:
    """Every slot the loss reads under its switches: those of L_mkcl, the
    subtexts for L_slra, the disease text when it weighs subtexts (dkw)."""
    keep = in_mkcl(n, mkcl_subtexts=mkcl_subtexts, mkcl_aspects=mkcl_aspects)
    for slot in range(FIRST_SUBTEXT, n):
        keep[slot] = keep[slot] or slra
    if dkw and (mkcl_subtexts or slra) and n > DISEASE:
        keep[DISEASE] = True
    return keep
