"""The reference bridge: the policy's frame features read objects as the forged reference does.

A small evidence benchmark, real pools and EfficientNet features, and a short forge (its frame
label loss makes each frame's visual token read as a word), then `bridge.reference_bridge`:
the distilled linear head must agree with the reference's own readings, name the objects on
frames it was not distilled from, be cached, and fail with errors that name the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def forged_run(tmp_path_factory):
    from refocus_ray import forge, pipeline
    from refocus_ray.config import load_config

    d = tmp_path_factory.mktemp("bridge")
    cfg = load_config("configs/embedded.yaml", {
        "run_dir": str(d / "run"), "data.videos": 12, "data.duration_s": [20, 30],
        "data.split_fractions": [0.5, 0.1, 0.4], "pool.max_frames": 48, "forge.steps": 300,
        "forge.train_videos": "all",
    })
    pipeline.evidence_stage(cfg)
    pipeline.prepare_stage(cfg, progress=False)
    forge.forge(cfg.table_path(), cfg.run_path / "forge", pipeline.forge_config(cfg))
    return cfg


def _labels(cfg, pools):
    """Ground truth per pool frame (analysis only): the object shown, else the footage; and the
    set of objects."""
    layout = json.loads((cfg.table_path().parent / "layout.json").read_text())
    out, objects = {}, {s["object"] for v in layout["videos"] for s in v["segments"]}
    for v in layout["videos"]:
        if v["video_id"] in pools:
            t = pools[v["video_id"]].t_s
            lab = np.full(len(t), v["background"], dtype=object)
            for s in v["segments"]:
                lab[(t >= s["start_s"]) & (t < s["end_s"])] = s["object"]
            out[v["video_id"]] = lab
    return out, objects


def test_reference_bridge_reads_objects_like_the_reference(forged_run):
    from refocus_ray import bridge, features, forge
    from refocus_ray.train import reference_config

    cfg = forged_run
    b = bridge.load_bridge(cfg)
    assert len(b.names) == 18 and b.tensors()["weight"].shape == (18, 1280)
    ckpt = Path(reference_config(cfg).model)
    fcfg = forge.ForgeConfig.load(ckpt)
    x, teacher = bridge._teacher_readings(cfg, ckpt, fcfg, b.names)
    student = x @ b.weight.T + b.bias
    # the distillation reproduces the reference's readings of the frames it saw
    assert (student.argmax(1) == teacher.argmax(1)).mean() >= 0.95
    # and names the objects on videos neither the forge nor the head saw (test split)
    pools = features.load_pools(cfg)
    labels, object_names = _labels(cfg, pools)
    split = {r["video_id"]: r["split"] for r in forge.train_rows(cfg.table_path())}
    test = [v for v in pools if v not in split]
    assert test
    feats = np.concatenate([pools[v].features for v in test])
    truth = np.concatenate([labels[v] for v in test])
    read = np.asarray(b.names, dtype=object)[(feats @ b.weight.T + b.bias).argmax(1)]
    objects = np.isin(truth, sorted(object_names))
    assert objects.any()
    assert (read[objects] == truth[objects]).mean() >= 0.6, (read[objects], truth[objects])

    # cached: a second load reads the distilled head back, identical
    again = bridge.load_bridge(cfg)
    assert np.array_equal(again.weight, b.weight) and np.array_equal(again.bias, b.bias)
    assert list((cfg.run_path / "features").glob("reference-bridge-*.npz"))


def test_reference_bridge_errors_name_the_key(forged_run):
    from refocus_ray import bridge
    from refocus_ray.config import ConfigError, load_config

    cfg = forged_run
    with pytest.raises(ConfigError, match=r"policy.bridge_classes: the reference bridge .* has "
                                          r"18 classes, got 1000"):
        bridge.check_policy_bridge(cfg, 1000)
    other = load_config("configs/embedded.yaml", {"run_dir": str(cfg.run_path),
                                                 "reference.model": "Qwen/Qwen2.5-VL-3B"})
    assert "reference.model: forge" in bridge.bridge_unavailable(other)
    with pytest.raises(ConfigError, match="policy.bridge_classes: the reference bridge reads"):
        bridge.check_policy_bridge(other, 18)
    from refocus_ray.policy import PolicyConfig

    with pytest.raises(ConfigError, match="policy.bridge"):
        PolicyConfig.from_dict({"bridge": "clip"})
