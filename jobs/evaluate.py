"""Evaluate a trained selector against the baselines (uniform, random, diverse,
relevance-diverse, framewise) on the test split.

How to run:
    python -m jobs.evaluate --config configs/embedded.yaml [--checkpoint DIR]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.evaluate --config configs/cluster.yaml

What to expect: a progress bar over (method, K, model) results, then the comparison table and
the path of <run_dir>/eval/eval.md (with eval.json, accuracy_vs_k.png, recall plots and
examples/). `framewise` costs one reference call per pool frame and dominates the run time.
An interrupted run resumes from <run_dir>/eval/partial/.
"""

import sys

from refocus_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
