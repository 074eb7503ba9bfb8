"""The one rule for a text's length in tokens, used by the loader, the model
and evaluation alike.

CLIP's tokenizer pads with id 0, but 0 is also a token of its vocabulary
("!" inside a word, as in `itchy!""`): counting non-zero tokens could cut a
text before its end token, and its embedding with it. A text runs to its
last non-pad token.
"""

from __future__ import annotations

import torch


def token_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """The real length of each row of tokens (..., L): up to its last non-pad token."""
    positions = torch.arange(1, tokens.shape[-1] + 1, device=tokens.device)
    return ((tokens != 0) * positions).amax(-1)
