"""A hyperparameter sweep as a Ray job (or directly): the arguments of `make-dist sweep`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/sweep.py --config configs/sweep_ablation.yaml
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package, under --working-dir

from make_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
