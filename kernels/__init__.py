"""Triton kernels of the MAKE objective (docs/spec.md, section 4), forward and backward.

Installed and imported as `make_dist_kernels` (the folder is kernels/; a
widely used PyPI package owns the top-level name `kernels`):

- `column_logsumexp(rows, cols, col_valid, scale, *, options)`: the fused
  multi-positive contrastive log-sum-exp (kernels/contrastive.py);
- `knowledge_embedding(patches, raw_text, sigma, *, options)`:
  similarity-weighted patch pooling (kernels/pooling.py);
- `Options`: how they launch (autotuning; what tests set), kernels/tuning.py.

They compute exactly what the dense torch path of make_dist.objective
computes (tests/test_kernels.py checks both against each other). They run on
a CUDA device, or on the CPU under TRITON_INTERPRET=1 (set before this
package is imported), which is how CI checks them.
"""

from .contrastive import column_logsumexp
from .pooling import knowledge_embedding
from .tuning import Options

__all__ = ["Options", "column_logsumexp", "knowledge_embedding"]
