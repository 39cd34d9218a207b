"""GRPO-train the ReFoCUS selector on RLlib against the reference VLM served by vLLM.

How to run:
    python -m jobs.train --config configs/embedded.yaml [--resume]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.train --config configs/embedded.yaml
    python -m jobs.train --config configs/cluster.yaml --dry-run     # resources, no work

What to expect (embedded, 2 cores): mean reward and accuracy rise over the iterations (see
<run_dir>/train/training_curve.png); heldout.json shows refocus above uniform sampling at K=4.
"""

import sys

from refocus_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
