"""Learning, measured: a short ReFoCUS run beats uniform sampling on held-out questions.

The whole chain at small scale, with no part replaced: a fresh evidence benchmark (real
footage, real mp4), pools and features (decord, EfficientNet, MiniLM), a reference VLM forged
here and served by vLLM, GRPO on RLlib, then the held-out check that `refocus train` writes
(`heldout.json`: refocus vs uniform at K = 4 on the test split, one temperature-1 sample per
seed, mean of 3 seeds, paired bootstrap over questions).

To fit CI's budget (2 cores) the benchmark is narrowed to the needle task, the `appear`
family: one short inserted segment holds the answer, so uniform frames mostly miss it and a
selector that learned to find inserted objects wins by a wide margin. Videos are short
(16-32 s) with 64-frame pools, and segments are 2-5% of the timeline so each has pool frames.
Most videos go to test, so the check reads at least 150 held-out questions (171), as asked.
The embedded demo (every family, 128-frame pools, 200 iterations) is measured in
docs/benchmarks.md, "Training".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

for _k, _v in {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}.items():  # fmt: skip
    os.environ.setdefault(_k, _v)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MIN_GAIN = 0.15  # refocus - uniform accuracy on held-out test questions, at K = 4
RUN = {
    # 61 train / 8 val / 171 test questions; the ~half of the videos with no `appear`
    # question are planned, not rendered
    "data": {"kind": "evidence", "videos": 460, "seed": 7, "families": ["appear"],
             "duration_s": [16, 32], "segment_fraction": [0.02, 0.05],
             "split_fractions": [0.24, 0.04, 0.72]},
    "pool": {"max_frames": 64, "max_fps": 4.0, "uniform_fallback_frames": 16},
    "forge": {"steps": 600, "max_k": 8, "warm_k": 8},
    "train": {"iterations": 150, "curriculum": [[4, 150]], "checkpoint_every": 75},
}


def short_run_config(tmp_path: Path):
    """configs/embedded.yaml with RUN on top, without the stages this test does not need."""
    from refocus_ray.config import load_config

    root = Path(__file__).resolve().parent.parent
    base = yaml.safe_load((root / "configs" / "embedded.yaml").read_text())
    for key in ("forge_answerer", "answerer", "filter", "serve"):
        base.pop(key, None)
    for section, values in RUN.items():
        base[section] = {**base.get(section, {}), **values}
    base["forge"].pop("train_videos", None)  # every training video
    base["run_dir"] = str(tmp_path / "run")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(base))
    return load_config(tmp_path / "run.yaml")


def test_short_run_beats_uniform_on_heldout_questions(tmp_path):
    pytest.importorskip("vllm")
    from refocus_ray import forge, pipeline

    cfg = short_run_config(tmp_path)
    pipeline.evidence_stage(cfg)
    pipeline.prepare_stage(cfg, progress=False)
    # the forge stage also reports on val through vLLM; the held-out check below is the
    # measurement here, so forge only
    forge.forge(cfg.table_path(), cfg.run_path / "forge", pipeline.forge_config(cfg))
    pipeline.train_stage(cfg)

    record = json.loads((cfg.run_path / "train" / "heldout.json").read_text())
    print(json.dumps(record, indent=1))
    assert record["n_questions"] >= 150  # the floor for this check
    gain = record["refocus_minus_uniform_k4"]
    assert gain >= MIN_GAIN, (f"refocus {record['acc_refocus_k4']:.3f} vs uniform "
                              f"{record['acc_uniform_k4']:.3f}: gain {gain:.3f} < {MIN_GAIN}")
    assert record["refocus_minus_uniform_k4_ci95_low"] > 0.05, record
    assert record["acc_refocus_k4"] > record["acc_random_k4"], record
