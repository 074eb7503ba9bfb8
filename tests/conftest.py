import os
from pathlib import Path

import pytest

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors.
# It is chosen when a kernel is defined, so this must precede any import of
# `kernels` (test modules are imported after this file).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
