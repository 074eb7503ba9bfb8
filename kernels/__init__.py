"""Triton kernels of the MAKE objective (docs/spec.md, section 4), forward and backward.

- `column_logsumexp(rows, cols, col_valid, scale)`: the fused multi-positive
  contrastive log-sum-exp (kernels/contrastive.py);
- `knowledge_embedding(patches, raw_text, sigma)`: similarity-weighted patch
  pooling (kernels/pooling.py).

They compute exactly what the dense torch path of make_dist.objective
computes (tests/test_kernels.py checks both against each other). They run on
a CUDA device, or on the CPU under TRITON_INTERPRET=1 (set before this
package is imported), which is how CI checks them.
"""

from .contrastive import column_logsumexp
from .pooling import knowledge_embedding

__all__ = ["column_logsumexp", "knowledge_embedding"]
