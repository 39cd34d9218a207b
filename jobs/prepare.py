"""Build candidate pools and the frozen-feature cache for a run's dataset (Ray Data).

How to run:
    python -m jobs.prepare --config configs/embedded.yaml            # locally
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.prepare --config configs/cluster.yaml          # on a Ray cluster

What to expect: on the embedded benchmark (240 videos, pools of <= 128 frames at 112 px) a few
minutes on 2 cores; features land in <run_dir>/features/. A second run decodes nothing.
Unreadable videos are listed in <run_dir>/features/errors.jsonl; add --strict to fail on them.
"""

import sys

from refocus_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
