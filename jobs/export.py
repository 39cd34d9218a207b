"""Export a trained selector's frame choices for eval harnesses.

How to run:
    python -m jobs.export --config configs/embedded.yaml [--checkpoint DIR] --k 8 32
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.export --config configs/cluster.yaml --rollouts 64 --steps 64 --k 32

What to expect: <run_dir>/export/<split>/ with the released ReFoCUS evaluation's shelve DBs
(selection/DB, frameidx/cand0_nf<K>/DB), selections.parquet, selections.jsonl and export.json
(counts, uniform fallbacks). Seconds on the embedded test split.
"""

import sys

from refocus_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
