"""A hyperparameter sweep as a Ray job (or directly): the arguments of `make-dist sweep`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/sweep.py --config configs/sweep_ablation.yaml
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("sweep"))
