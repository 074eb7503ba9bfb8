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


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, repo_root) -> str:
    """96 synthetic 64-px samples in 12 shards of 8 (the training tests' data),
    beside the synthetic set with 40 held-out images in ../synth."""
    from make_dist.data.schema import load_columns
    from make_dist.data.shards import write_shards
    from make_dist.data.synth import synthesize

    root = tmp_path_factory.mktemp("data")
    synthesize(root / "synth", n=96, n_eval=40, size=64, seed=0, workers=2, progress=False)
    write_shards(str(root / "synth/train.csv"), str(root / "shards"),
                 load_columns(repo_root / "configs/columns/synthetic.yaml"), images_root=str(root / "synth"),
                 shard_size=8, workers=2, progress=False)
    return str(root / "shards/manifest.json")
