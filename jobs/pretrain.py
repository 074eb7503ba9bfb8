"""Pre-train MAKE: check -> fit -> evaluate (the held-out tables of the config's `evaluation`).

    python jobs/pretrain.py --config configs/tiny.yaml [--set section.key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/pretrain.py --config configs/tiny.yaml

Run directly it starts an embedded local Ray; under `ray job submit` it joins
that cluster. Rerunning with the same train.name and train.storage resumes.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("train"))
