"""Forge the embedded reference VLM: a small Idefics3 trained here, served by vLLM.

How to run:
    python -m jobs.forge_reference --config configs/embedded.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.forge_reference --config configs/embedded.yaml

What to expect: about 6-9 minutes on 2 cores; <run_dir>/forge/checkpoint/ (an HF directory)
and <run_dir>/forge/forge_report.json (val accuracy with evidence >= 0.9 per family that fits
K, without evidence near chance). A cluster config names a pretrained VLM instead and needs no
forge.
"""

import sys

from refocus_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["forge-reference", *sys.argv[1:]]))
