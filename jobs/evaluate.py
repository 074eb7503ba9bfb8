"""Zero-shot evaluation as a Ray job (or directly): the arguments of `make-dist eval`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/evaluate.py --model runs/make/model --task classify \\
        --table data/eval/classify.csv --images-root data --classes data/classes.yaml
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("eval"))
