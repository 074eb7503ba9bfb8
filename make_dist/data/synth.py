"""A synthetic dermatology set with real, learnable structure (`make-dist synth`).

No real dermatology data can be downloaded here, so the demo, tests and
benchmarks use this generator. Every disease of a small ontology has a
concept profile; each image draws concepts from its disease's profile
(with noise) and renders them so they are visible: colour (erythema,
pigmentation), shape and border, surface (scale, crust), size, count and
distribution. The caption describes the rendered concepts, the body site,
symptoms and history in varied wording.

Why MAKE can help here, as in Derm1M: the captions are noisy text that
names the diagnosis only in a fraction of the rows (`named`, default 0.3)
and describes concepts in lay, varied wording ("red", "pink-red",
"inflamed"), while the knowledge-aspect texts come from the ontology: the
disease text names the disease (and its superclass) and the concept text
names the concepts by their ontology terms, the words the zero-shot prompts
use. A model that reads the aspect texts sees every disease name; one that
reads the caption alone sees it in `named` of the rows.

Output (under OUT):
    images/train/NNNNNN.jpg, images/eval/NNNNNN.jpg
    train.csv                 image, caption, disease, concepts, label
    eval/classify.csv         image, label
    eval/concepts.csv         image, one 0/1 column per concept
    eval/retrieval.csv        image, caption
    classes.yaml              class name -> synonyms
    ontology.yaml             diseases, superclasses, concept profiles
Everything is deterministic given the seed.
"""

from __future__ import annotations

import csv
import io
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter

from ..files import atomic_writer, write_atomic

# ---------------------------------------------------------------------------
# The ontology

CONCEPTS = [
    "erythema", "scale", "plaque", "papule", "pustule", "vesicle", "crust", "ulcer", "nodule",
    "macule", "hyperpigmentation", "hypopigmentation", "telangiectasia", "border irregularity",
    "excoriation", "lichenification", "annular", "wheal", "umbilication",
]
# The primary lesion of every image is one of these; the rest are secondary features.
PRIMARY = ("plaque", "papule", "pustule", "vesicle", "nodule", "macule", "wheal")


@dataclass(frozen=True)
class Disease:
    name: str
    superclass: str
    synonyms: tuple[str, ...]
    profile: dict  # concept -> probability of being present
    count: str  # single | few | many
    size: str  # small | medium | large
    pattern: str  # scattered | clustered | band | single
    sites: tuple[str, ...]
    symptoms: tuple[str, ...]


DISEASES = [
    Disease("psoriasis", "inflammatory", ("plaque psoriasis", "psoriasis vulgaris"),
            {"plaque": .95, "scale": .9, "erythema": .9, "border irregularity": .1},
            "few", "large", "scattered", ("elbows", "knees", "scalp", "lower back"), ("mild itching", "no symptoms")),
    Disease("atopic dermatitis", "inflammatory", ("eczema", "atopic eczema"),
            {"plaque": .5, "papule": .5, "erythema": .85, "excoriation": .7, "lichenification": .6, "crust": .25, "scale": .35},
            "few", "medium", "clustered", ("inner elbows", "back of the knees", "neck", "hands"), ("intense itching", "itching at night")),
    Disease("acne vulgaris", "inflammatory", ("acne", "common acne"),
            {"papule": .9, "pustule": .8, "erythema": .6, "nodule": .15},
            "many", "small", "scattered", ("face", "forehead", "upper back", "chest"), ("tenderness", "no symptoms")),
    Disease("urticaria", "inflammatory", ("hives", "nettle rash"),
            {"wheal": .95, "erythema": .8, "annular": .2},
            "many", "medium", "scattered", ("trunk", "arms", "thighs"), ("intense itching", "burning")),
    Disease("vitiligo", "inflammatory", ("leukoderma", "depigmentation disorder"),
            {"macule": .95, "hypopigmentation": .95, "border irregularity": .4},
            "few", "large", "scattered", ("hands", "face", "around the mouth", "knees"), ("no symptoms",)),
    Disease("impetigo", "infectious", ("school sores", "impetigo contagiosa"),
            {"crust": .9, "erythema": .7, "vesicle": .35, "pustule": .3, "plaque": .4},
            "few", "medium", "clustered", ("around the nose", "around the mouth", "chin", "arms"), ("mild itching", "soreness")),
    Disease("tinea corporis", "infectious", ("ringworm", "body ringworm"),
            {"annular": .9, "scale": .75, "erythema": .75, "plaque": .6},
            "few", "medium", "scattered", ("trunk", "arms", "groin", "neck"), ("itching",)),
    Disease("herpes zoster", "infectious", ("shingles", "zoster"),
            {"vesicle": .95, "erythema": .85, "crust": .4},
            "many", "small", "band", ("one side of the chest", "one side of the back", "forehead"), ("burning pain", "tingling")),
    Disease("molluscum contagiosum", "infectious", ("molluscum", "water warts"),
            {"papule": .95, "umbilication": .85},
            "many", "small", "clustered", ("trunk", "armpits", "thighs", "face"), ("no symptoms", "mild itching")),
    Disease("seborrheic keratosis", "benign", ("seborrheic wart", "basal cell papilloma"),
            {"plaque": .8, "hyperpigmentation": .85, "scale": .35},
            "few", "medium", "scattered", ("back", "chest", "temple"), ("no symptoms", "catches on clothing")),
    Disease("melanocytic nevus", "benign", ("mole", "common nevus"),
            {"macule": .6, "papule": .4, "hyperpigmentation": .95},
            "single", "small", "single", ("back", "arm", "cheek", "shoulder"), ("no symptoms",)),
    Disease("cherry angioma", "benign", ("senile angioma", "Campbell de Morgan spot"),
            {"papule": .9, "erythema": .9},
            "many", "small", "scattered", ("trunk", "upper arms", "chest"), ("no symptoms",)),
    Disease("melanoma", "malignant", ("malignant melanoma", "cutaneous melanoma"),
            {"macule": .4, "nodule": .35, "plaque": .3, "hyperpigmentation": .95, "border irregularity": .9, "ulcer": .2},
            "single", "large", "single", ("back", "leg", "shoulder", "scalp"), ("recent change in size", "occasional bleeding")),
    Disease("basal cell carcinoma", "malignant", ("basal cell epithelioma", "rodent ulcer"),
            {"nodule": .8, "telangiectasia": .8, "ulcer": .4, "erythema": .3},
            "single", "medium", "single", ("nose", "cheek", "forehead", "ear"), ("occasional bleeding", "no symptoms")),
    Disease("squamous cell carcinoma", "malignant", ("cutaneous squamous cell carcinoma", "epidermoid carcinoma"),
            {"nodule": .6, "plaque": .4, "scale": .7, "crust": .6, "ulcer": .45, "erythema": .6},
            "single", "large", "single", ("scalp", "back of the hand", "lip", "ear"), ("tenderness", "bleeding")),
]
SUPERCLASSES = {"inflammatory": "inflammatory disease", "infectious": "infectious disease",
                "benign": "benign neoplasm", "malignant": "malignant neoplasm"}

SKIN_TONES = [(246, 220, 200), (232, 190, 160), (205, 155, 120), (170, 120, 85), (125, 85, 60), (90, 60, 45)]

# Words the captions use for each concept: the wording varies, the meaning does not.
WORDS = {
    "erythema": ["red", "erythematous", "pink-red", "inflamed"],
    "hyperpigmentation": ["dark brown", "hyperpigmented", "deeply pigmented", "brown-black"],
    "hypopigmentation": ["white", "depigmented", "pale", "hypopigmented"],
    "border irregularity": ["with irregular borders", "with an irregular, notched border", "with ragged edges"],
    "scale": ["silvery scale", "fine scaling", "white flaky scale", "adherent scale"],
    "crust": ["honey-coloured crusts", "yellow crusting", "crusted surfaces"],
    "ulcer": ["central ulceration", "an ulcerated centre", "a central erosion"],
    "telangiectasia": ["fine telangiectasias", "small branching surface vessels", "visible thin vessels"],
    "excoriation": ["scratch marks", "excoriations", "linear scratches"],
    "lichenification": ["thickened lichenified skin", "accentuated skin markings", "leathery thickening"],
    "annular": ["ring-shaped", "annular", "circular with central clearing"],
    "umbilication": ["central umbilication", "a small central dimple", "umbilicated centres"],
}
NOUNS = {
    "plaque": ("plaque", "plaques"), "papule": ("papule", "papules"), "pustule": ("pustule", "pustules"),
    "vesicle": ("vesicle", "vesicles"), "nodule": ("nodule", "nodules"), "macule": ("macule", "macules"),
    "wheal": ("wheal", "wheals"),
}
SIZE_WORDS = {"small": ["small", "tiny", "pinpoint"], "medium": ["", "coin-sized", "medium-sized"],
              "large": ["large", "broad", "extensive"]}
COUNT_WORDS = {"single": ["A single", "One", "A solitary"], "few": ["Several", "A few", "Multiple"],
               "many": ["Numerous", "Many", "Multiple"]}
PATTERN_WORDS = {"scattered": "scattered", "clustered": "clustered", "band": "band-like, following one side",
                 "single": "isolated"}


# ---------------------------------------------------------------------------
# One image


@dataclass
class Case:
    """What one image shows, before rendering."""

    disease: Disease
    concepts: list[str]
    primary: str
    count: int
    size: str
    site: str
    tone: tuple[int, int, int]


def draw_case(rng: np.random.Generator) -> Case:
    disease = DISEASES[rng.integers(len(DISEASES))]
    concepts = [c for c, p in disease.profile.items() if rng.random() < p]
    if rng.random() < 0.15:  # noise: a concept outside the profile
        concepts.append(CONCEPTS[rng.integers(len(CONCEPTS))])
    primaries = [c for c in concepts if c in PRIMARY]
    if not primaries:
        primaries = [max((c for c in disease.profile if c in PRIMARY), key=disease.profile.get)]
    primary = primaries[rng.integers(len(primaries))]
    concepts = sorted(set([c for c in concepts if c not in PRIMARY] + [primary]), key=CONCEPTS.index)
    n = {"single": 1, "few": int(rng.integers(2, 5)), "many": int(rng.integers(6, 16))}[disease.count]
    return Case(disease, concepts, primary, n, disease.size, disease.sites[rng.integers(len(disease.sites))],
                SKIN_TONES[rng.integers(len(SKIN_TONES))])


def _mix(a, b, t):
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


def render(case: Case, size: int, rng: np.random.Generator) -> Image.Image:
    """Skin with lighting and texture, then the lesions of the case."""
    s = size
    # Skin: tone, a lighting gradient in a random direction, low-frequency mottling.
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:s, 0:s] / s - 0.5
    light = 1.0 + rng.uniform(0.05, 0.25) * (np.cos(angle) * xx + np.sin(angle) * yy) * 2
    mottle = np.asarray(Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).resize((s, s), Image.BICUBIC))
    skin = np.array(case.tone, dtype=np.float32)[None, None] * (light[..., None] * (0.95 + 0.1 * mottle[..., None] / 255))
    img = Image.fromarray(np.clip(skin, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)

    colour = _lesion_colour(case)
    base_r = {"small": 0.035, "medium": 0.09, "large": 0.2}[case.size] * s
    if case.primary in ("papule", "pustule", "vesicle") and case.size != "small":
        base_r *= 0.5
    centres = _layout(case, s, base_r, rng)
    irregular = "border irregularity" in case.concepts
    for cx, cy in centres:
        r = base_r * rng.uniform(0.75, 1.25)
        outline = _outline(cx, cy, r, irregular, rng)
        if case.primary == "wheal":  # raised pale centre with a red flare
            draw.polygon(_outline(cx, cy, r * 1.35, irregular, rng), fill=_mix(case.tone, (210, 70, 70), 0.55))
            draw.polygon(outline, fill=_mix(case.tone, (250, 215, 205), 0.6))
        elif "annular" in case.concepts:
            draw.polygon(outline, fill=colour)
            draw.polygon(_outline(cx, cy, r * 0.62, False, rng), fill=_mix(case.tone, colour, 0.15))
        else:
            draw.polygon(outline, fill=colour)
        if "hyperpigmentation" in case.concepts and case.disease.name == "melanoma":
            for _ in range(3):  # variegated colour
                ox, oy = rng.uniform(-0.5, 0.5, 2) * r
                draw.polygon(_outline(cx + ox, cy + oy, r * 0.35, True, rng),
                             fill=[(40, 25, 20), (95, 100, 120), (120, 70, 45)][rng.integers(3)])
        _surface(draw, case, cx, cy, r, colour, rng)
    img = img.filter(ImageFilter.GaussianBlur(radius=max(0.5, s / 300)))
    noise = rng.normal(0, 4, (s, s, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def _lesion_colour(case: Case):
    if "hypopigmentation" in case.concepts:
        return _mix(case.tone, (255, 250, 245), 0.6)
    if "hyperpigmentation" in case.concepts:
        return _mix(case.tone, (70, 40, 25), 0.7)
    if "erythema" in case.concepts:
        return _mix(case.tone, (200, 45, 50), 0.6)
    return _mix(case.tone, (215, 130, 120), 0.45)


def _layout(case: Case, s: int, r: float, rng) -> list[tuple[float, float]]:
    margin = r + 2
    pattern = case.disease.pattern if case.count > 1 else "single"
    if pattern == "single":
        return [tuple(rng.uniform(0.4, 0.6, 2) * s)]
    if pattern == "clustered":
        c = rng.uniform(0.35, 0.65, 2) * s
        pts = c + rng.normal(0, s * 0.1, (case.count, 2))
    elif pattern == "band":
        a = rng.uniform(0, math.pi)
        t = rng.uniform(-0.4, 0.4, case.count) * s
        pts = np.stack([s / 2 + t * math.cos(a), s / 2 + t * math.sin(a)], 1) + rng.normal(0, s * 0.03, (case.count, 2))
    else:
        pts = rng.uniform(0, 1, (case.count, 2)) * s
    return [tuple(p) for p in np.clip(pts, margin, s - margin)]


def _outline(cx, cy, r, irregular: bool, rng, points: int = 24):
    angles = np.linspace(0, 2 * math.pi, points, endpoint=False)
    if irregular:
        radii = r * (1 + 0.35 * rng.uniform(-1, 1, points))
    else:
        radii = r * (1 + 0.05 * rng.uniform(-1, 1, points))
    stretch = rng.uniform(0.8, 1.2)
    return [(cx + rr * math.cos(a) * stretch, cy + rr * math.sin(a) / stretch) for rr, a in zip(radii, angles)]


def _surface(draw: ImageDraw.ImageDraw, case: Case, cx, cy, r, colour, rng) -> None:
    """Secondary features drawn over one lesion."""
    c = case.concepts
    if case.primary in ("papule", "nodule"):  # raised: a highlight up-left
        hr = r * (0.35 if case.primary == "papule" else 0.45)
        draw.ellipse([cx - r * 0.5 - hr, cy - r * 0.5 - hr, cx - r * 0.5 + hr, cy - r * 0.5 + hr],
                     fill=_mix(colour, (255, 255, 255), 0.35))
    if case.primary == "pustule":
        draw.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=(238, 225, 150))
    if case.primary == "vesicle":
        draw.ellipse([cx - r * 0.7, cy - r * 0.7, cx + r * 0.7, cy + r * 0.7], fill=_mix(colour, (235, 235, 240), 0.7))
        draw.ellipse([cx - r * 0.4, cy - r * 0.45, cx - r * 0.1, cy - r * 0.15], fill=(255, 255, 255))
    if "umbilication" in c:
        draw.ellipse([cx - r * 0.18, cy - r * 0.18, cx + r * 0.18, cy + r * 0.18], fill=_mix(colour, (60, 40, 40), 0.6))
    if "scale" in c:
        for x, y in rng.uniform(-0.75, 0.75, (int(12 + r), 2)) * r + (cx, cy):
            d = rng.uniform(0.6, 1.8)
            draw.ellipse([x - d, y - d, x + d, y + d], fill=(240, 240, 235))
    if "crust" in c:
        for _ in range(3):
            ox, oy = rng.uniform(-0.5, 0.5, 2) * r
            draw.polygon(_outline(cx + ox, cy + oy, r * 0.3, True, rng, 10), fill=(205, 150, 60))
    if "ulcer" in c:
        draw.polygon(_outline(cx, cy, r * 0.4, True, rng, 14), fill=(110, 20, 25))
    if "telangiectasia" in c:
        for _ in range(4):
            pts = [(cx + rng.uniform(-r, r), cy + rng.uniform(-r, r)) for _ in range(4)]
            draw.line(pts, fill=(190, 30, 45), width=1)
    if "excoriation" in c:
        for _ in range(3):
            x, y = cx + rng.uniform(-r, r), cy + rng.uniform(-r, r)
            a = rng.uniform(0, math.pi)
            draw.line([(x, y), (x + r * 0.8 * math.cos(a), y + r * 0.8 * math.sin(a))], fill=(150, 30, 35), width=2)
    if "lichenification" in c:
        for k in np.linspace(-0.7, 0.7, 6) * r:
            draw.line([(cx - r * 0.7, cy + k), (cx + r * 0.7, cy + k + r * 0.3)], fill=_mix(colour, (60, 40, 35), 0.4))
            draw.line([(cx + k, cy - r * 0.7), (cx + k - r * 0.3, cy + r * 0.7)], fill=_mix(colour, (60, 40, 35), 0.4))


# ---------------------------------------------------------------------------
# One caption


def caption(case: Case, rng: np.random.Generator, named: float = 0.3) -> str:
    """A caption of the case; it names the diagnosis with probability `named`."""
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    c = case.concepts
    adjectives = [pick(WORDS[k]) for k in ("erythema", "hyperpigmentation", "hypopigmentation", "annular") if k in c]
    size = pick(SIZE_WORDS[case.size])
    one, many = NOUNS[case.primary]
    noun = one if case.count == 1 else many
    count = pick(COUNT_WORDS["single" if case.count == 1 else ("many" if case.count > 5 else "few")])
    lead = " ".join(w for w in [count, size if size else None, *adjectives, noun] if w)
    features = [pick(WORDS[k]) for k in ("scale", "crust", "ulcer", "telangiectasia", "umbilication") if k in c]
    sentence = lead[0].upper() + lead[1:].lower() if lead else lead
    if features:
        sentence += " with " + ", ".join(features[:-1]) + (" and " if len(features) > 1 else "") + features[-1]
    if "border irregularity" in c:
        sentence += " " + pick(WORDS["border irregularity"])
    sentences = [sentence + "."]
    extra = [pick(WORDS[k]).capitalize() + " " + pick(["are seen nearby", "are present", "surround the lesions"])
             for k in ("excoriation", "lichenification") if k in c]
    sentences += [e + "." for e in extra]
    site = pick([f"Located on the {case.site}.", f"Distributed over the {case.site}.",
                 f"Affected site: {case.site}."])
    if case.count > 1:
        site = site[:-1] + f" in a {PATTERN_WORDS[case.disease.pattern]} pattern."
    sentences.append(site)
    symptom = pick(case.disease.symptoms)
    sentences.append(pick([f"The patient reports {symptom}.", f"Symptoms: {symptom}.",
                           f"{symptom.capitalize()} according to the patient."]))
    duration = pick(["two weeks", "three months", "several years", "a few days", "one year"])
    sentences.append(pick([f"Present for {duration}.", f"It began {duration} ago.", f"History of {duration}."]))
    if rng.random() < named:
        name = pick((case.disease.name, *case.disease.synonyms))
        sentences.append(pick([f"Consistent with {name}.", f"Clinical impression: {name}.",
                               f"Diagnosed as {name}."]))
    order = [0] + list(rng.permutation(np.arange(1, len(sentences))))
    return " ".join(sentences[i] for i in order)


# ---------------------------------------------------------------------------
# The set


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, {"train": 0, "eval": 1}[split], index])


def make_item(args) -> dict:
    """Render, write and describe one image (runs in a worker process)."""
    out, split, index, seed, size, fmt, named = args
    rng = _rng(seed, split, index)
    case = draw_case(rng)
    text = caption(case, rng, named)
    rel = f"images/{split}/{index:06d}.{fmt}"
    image = render(case, size, rng)
    with atomic_writer(str(Path(out) / rel)) as f:
        image.save(f, format="JPEG" if fmt == "jpg" else "PNG", quality=92)
    drop = rng.random(2)
    return {
        "image": rel,
        "caption": text,
        # As in real data, some rows miss their structured fields.
        "disease": "" if drop[0] < 0.15 else f"{case.disease.superclass}, {case.disease.name}",
        "concepts": "" if drop[1] < 0.10 else ", ".join(case.concepts),
        "label": case.disease.name,
        "_concepts": case.concepts,
    }


def synthesize(out: str | Path, n: int = 1000, n_eval: int | None = None, size: int = 224,
               seed: int = 0, workers: int | None = None, fmt: str = "jpg", progress: bool = True,
               named: float = 0.3) -> dict:
    """Write the synthetic set; returns {split: rows}. Tables appear only when complete.
    named: the fraction of captions that name the diagnosis."""
    from tqdm import tqdm

    if n < 1 or size < 32:
        raise ValueError("synth: n must be >= 1 and size >= 32")
    if fmt not in ("jpg", "png"):
        raise ValueError("synth: format must be jpg or png")
    if not 0 <= named <= 1:
        raise ValueError(f"synth: named is the fraction of captions naming the disease, in [0, 1]; got {named}")
    out = Path(out)
    n_eval = max(50, n // 10) if n_eval is None else n_eval
    for split in ("train", "eval"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "eval").mkdir(exist_ok=True)
    workers = workers or os.cpu_count() or 1
    jobs = [(str(out), split, i, seed, size, fmt, named) for split, count in (("train", n), ("eval", n_eval))
            for i in range(count)]
    with ProcessPoolExecutor(workers) as pool:
        rows = list(tqdm(pool.map(make_item, jobs, chunksize=32), total=len(jobs), desc="synth images",
                         disable=not progress, unit="img"))
    train, held_out = rows[:n], rows[n:]

    _write_csv(out / "train.csv", ["image", "caption", "disease", "concepts", "label"], train)
    _write_csv(out / "eval/classify.csv", ["image", "label"], held_out)
    _write_csv(out / "eval/retrieval.csv", ["image", "caption"], held_out)
    concept_rows = [{"image": r["image"], **{c: int(c in r["_concepts"]) for c in CONCEPTS}} for r in held_out]
    _write_csv(out / "eval/concepts.csv", ["image", *CONCEPTS], concept_rows)
    _write_yaml(out / "classes.yaml", {d.name: list(d.synonyms) for d in DISEASES})
    _write_yaml(out / "ontology.yaml", {
        "superclasses": SUPERCLASSES,
        "concepts": CONCEPTS,
        "diseases": [{"name": d.name, "superclass": d.superclass, "synonyms": list(d.synonyms),
                      "profile": d.profile} for d in DISEASES],
    })
    return {"train": train, "eval": held_out}


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(str(path), text.getvalue())


def _write_yaml(path: Path, data) -> None:
    write_atomic(str(path), yaml.safe_dump(data, sort_keys=False))
