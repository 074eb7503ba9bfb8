"""Every prompt string of make-dist, in one place: the texts training writes
from structured fields, and the templates of the zero-shot protocols.

- Training (data/schema.py): the disease-aspect and concept-aspect texts
  templated from an ontology path and a concept list (docs/spec.md, section 1).
- make-dist's own evaluation (evaluate/tasks.py), written for dermatology:
  classification averages each class's embedding over every template and
  every name of the class (its synonyms included); concept annotation scores
  a concept prompt against a reference prompt of the same template.
- The paper's suite (evaluate/paper.py), as the authors wrote them: the 8
  skin templates of their classification (OPENAI_SKIN_TEMPLATES) and
  MONET's 6 (template, reference) pairs of concept annotation.
"""

# Training: the aspect texts of a sample made from structured fields
DISEASE_TEMPLATE = "This is a skin photo diagnosed as {}."
CONCEPT_TEMPLATE = "This skin photo shows {}."

# make-dist's evaluation on tables of your own
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

# The paper's suite: classification prompts, one list for all four sets
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

# The paper's suite: MONET's concept score, (template filled with each term of the concept, reference without it)
CONCEPT_PAIRS = (
    ("This is skin image of {}", "This is skin image"),
    ("This is dermatology image of {}", "This is dermatology image"),
    ("This is image of {}", "This is image"),
    ("A skin image of {}", "A skin image"),
    ("An image of {}, a skin condition.", "An image of a skin condition."),
    ("{}, a skin disorder, is shown in this image.", "a skin disorder is shown in this image."),
)
