"""Zero-shot evaluation as a Ray job (or directly): the arguments of `make-dist eval`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/evaluate.py --model runs/make/model --task classify \\
        --table data/eval/classify.csv --images-root data --classes data/classes.yaml
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package, under --working-dir

from make_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
