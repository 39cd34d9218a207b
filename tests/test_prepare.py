"""The feature cache: Ray Data prepare, resumable, bad videos reported and the rest kept."""

import json

import numpy as np
import pytest

from refocus_ray import features
from refocus_ray.config import load_config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, clip_dir):
    d = tmp_path_factory.mktemp("prep")
    rows = [
        {"question_id": f"q{i}", "video_id": name, "video_path": str(clip_dir / f"{name}.mp4"),
         "question": "What is shown?", "options": ["bikes", "cars", "birds"], "answer": 0,
         "split": "test"}
        for i, name in enumerate(["short", "mid", "long", "truncated", "notes"])
    ]
    (d / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, {"run_dir": str(d / "run"), "data.kind": "table",
                             "data.table": str(d / "qa.jsonl"), "encoders.frame_size": 64})
    first = features.prepare_frames(cfg, progress=False)
    return cfg, first


def test_first_run_caches_good_videos_and_reports_bad(prepared):
    cfg, s = prepared
    assert (s.videos, s.decoded, s.cached) == (5, 3, 0)
    bad = {e["video_id"]: e["error"] for e in s.failed}
    assert set(bad) == {"truncated", "notes"}
    assert all("not a readable video" in m for m in bad.values())
    errors = (features.features_dir(cfg) / "errors.jsonl").read_text().splitlines()
    assert len(errors) == 2 and "truncated.mp4" in errors[0] + errors[1]


def test_second_run_decodes_nothing(prepared, monkeypatch):
    cfg, _ = prepared
    from refocus_ray import video

    def must_not_decode(*a, **k):  # injected fault: any decode now is a test failure
        raise AssertionError("a cached video was decoded again")

    monkeypatch.setattr(video, "decode_isolated", must_not_decode)
    s = features.prepare_frames(cfg, progress=False)
    assert (s.decoded, s.cached, len(s.failed)) == (0, 3, 2)


def test_cached_pools_hold_paper_indices_and_real_features(prepared):
    cfg, _ = prepared
    pools = features.load_pools(cfg)
    assert set(pools) == {"short", "mid", "long"}
    long = pools["long"]  # 200 s at 5 fps: min(128, 200 * 4) frames over 1000
    np.testing.assert_array_equal(long.frames, np.linspace(0, 999, 128, dtype=int))
    np.testing.assert_allclose(long.t_s, long.frames / 5.0)
    assert long.features.shape == (128, 1280) and np.isfinite(long.features).all()
    # real footage: consecutive pool frames are more alike than frames half a loop of the
    # 10 s source clip apart (16 pool frames = 125 source frames)
    f = long.features / np.linalg.norm(long.features, axis=1, keepdims=True)
    assert (f[:-1] * f[1:]).sum(1).mean() > (f[:-16] * f[16:]).sum(1).mean() + 0.02


def test_question_features_cached_once(prepared):
    cfg, _ = prepared
    assert features.prepare_questions(cfg) == 5
    assert features.prepare_questions(cfg) == 0
    q, opts = features.load_question_features(cfg)["q0"]
    assert q.shape == (384,) and opts.shape == (3, 384)
    assert abs(float(np.linalg.norm(q)) - 1) < 1e-4


def test_cached_features_do_not_depend_on_the_encoder_batch(prepared, clip_dir):
    """prepare encodes 16 frames per pass (speed); the cache key leaves the batch out, so the
    cached pool must equal the whole pool encoded in one pass, order and a short tail included."""
    from refocus_ray.encoders import FrameEncoder
    from refocus_ray.video import decode_pool

    cfg, _ = prepared
    b = cfg.encoders.batch_size
    assert b < 128 and 128 % b == 0
    _, _, frames = decode_pool(clip_dir / "long.mp4", 128, 4.0, 64)
    whole = FrameEncoder(size=64, batch_size=len(frames))(frames)
    cached = features.load_pools(cfg)["long"].features  # stored as float16
    np.testing.assert_allclose(cached, whole.astype(np.float16).astype(np.float32), atol=1e-6)
    tail = FrameEncoder(size=64, batch_size=b)(frames[:-3])  # 125 frames: a 13-frame tail
    np.testing.assert_allclose(tail, whole[:-3], atol=1e-5)
