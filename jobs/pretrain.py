"""Pre-train MAKE: check -> fit -> evaluate (the held-out tables of the config's `evaluation`).

    python jobs/pretrain.py --config configs/tiny.yaml [--set section.key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/pretrain.py --config configs/tiny.yaml

Run directly it starts an embedded local Ray; under `ray job submit` it joins
that cluster. Rerunning with the same train.name and train.storage resumes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package, under --working-dir

from make_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
