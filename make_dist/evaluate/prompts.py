"""Prompt templates of the zero-shot protocols, written for dermatology.

Classification averages each class's embedding over every template and every
name of the class (its synonyms included). Concept annotation scores a
concept prompt against a reference prompt of the same template.
"""

CLASS_TEMPLATES = (
    "This is a skin photo diagnosed as {}.",
    "a clinical photograph of {}.",
    "a dermatology image of {}.",
    "a close-up photo of skin affected by {}.",
    "skin lesions consistent with {}.",
)

# (concept prompt, reference prompt): the softmax over the pair gives the concept's probability.
CONCEPT_TEMPLATES = (
    ("This skin photo shows {}.", "This skin photo shows normal skin."),
    ("a photo of skin with {}.", "a photo of skin."),
    ("a dermatology image showing {}.", "a dermatology image."),
)
