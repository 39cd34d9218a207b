"""The paper's reward-variance data filter: keep the questions whose answer depends on *when*.

How to run:
    python -m jobs.filter --config configs/embedded.yaml [--set filter.threshold=0.1]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.filter --config configs/embedded.yaml

Needs the run's pools (`jobs.prepare`) and reference model (`jobs.forge_reference` on the
embedded config). What to expect: a progress bar over questions (16 reward-pool requests each),
then <run_dir>/filter/ with kept.parquet (train on it with `--set train.table=filtered`),
filter_scores.parquet, variance_hist.png and filter_summary.json; on the evidence benchmark
the "global" family, answerable from any frame, should mostly be removed
(`global_mostly_removed` in the summary).
"""

import sys

from refocus_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["filter", *sys.argv[1:]]))
