"""The reward pool on a real vLLM engine: batching, caching, and surviving a killed actor.

Plumbing, not accuracy: a small random-init Idefics3 (SmolVLM's architecture), scored in
letter mode on real footage. One engine start is shared by the module.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import psutil
import pytest
import ray

from refocus_ray.forge import build_random_model
from refocus_ray.reward_pool import RewardPool
from refocus_ray.scoring import ReferenceConfig, ScoreRequest

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def pool(tmp_path_factory, ray_local):
    model = build_random_model("idefics3", tmp_path_factory.mktemp("rand") / "idefics3")
    cfg = ReferenceConfig(backend="vllm", model=str(model), answer_mode="letter",
                          max_model_len=2048, pool_name="test-scorer", max_wait_ms=20)
    p = RewardPool.start(cfg)
    yield p
    p.shutdown()


def _requests(clip_dir, n, offset=0, step=7):
    video = str(clip_dir / "long.mp4")  # 1,000 frames
    return [ScoreRequest(video, (offset + step * i, offset + step * i + 300, 990),
                         "Which object is it?", ("cat", "moon", "page", "coffee"))
            for i in range(n)]


def _engine_processes(pid: int) -> list[psutil.Process]:
    """Processes a scorer actor may have left behind: its children and any vLLM engine core."""
    out = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["ppid"] == pid or "EngineCore" in cmd:
            out.append(p)
    return out


def test_scores_are_finite_and_cached(pool, clip_dir):
    reqs = _requests(clip_dir, 4)
    z1 = pool.score(reqs)
    assert len(z1) == 4 and all(len(z) == 4 for z in z1)
    assert all(v < 0 for z in z1 for v in z)  # log-probabilities
    before = pool.stats()[0]
    z2 = pool.score(reqs)
    after = pool.stats()[0]
    assert z2 == z1
    hits = after["cache_hit_rate"] * after["requests"] - before["cache_hit_rate"] * before["requests"]
    assert round(hits) == 4
    m = pool.metrics()  # what training logs each iteration (reward_pool_* in metrics.jsonl)
    assert m["requests"] == after["requests"] and m["restarts"] == 0
    assert m["cache_hit_rate"] == pytest.approx(after["cache_hit_rate"])
    assert 0 < m["p50_ms"] <= m["p95_ms"] and m["mean_batch_size"] >= 1


def test_prefetch_decodes_in_the_actor_that_scores(pool, clip_dir):
    reqs = _requests(clip_dir, 3, offset=5, step=11)  # frames no other test asks for
    before = pool.stats()[0]["frames_decoded"]
    assert pool.prefetch(reqs) == 3
    pool.score(reqs)
    assert pool.stats()[0]["frames_decoded"] == before  # scoring decoded nothing more


def test_concurrent_callers_are_batched(pool, clip_dir):
    before = pool.stats()[0]
    results = {}

    def caller(i):
        results[i] = pool.score(_requests(clip_dir, 8, offset=100 + 40 * i))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    after = pool.stats()[0]
    calls = after["engine_calls"] - before["engine_calls"]
    assert sum(len(r) for r in results.values()) == 16
    assert calls < 16, f"16 requests took {calls} engine calls: no batching"


def test_killed_actor_restarts_and_every_request_is_answered(pool, clip_dir):
    # 96 requests take ~0.7 s on 2 cores (24 took < 0.2 s on a faster CI machine, finishing
    # before the kill); the kill is sent as soon as the call is in flight
    reqs = _requests(clip_dir, 96, offset=300, step=3)
    old = ray.get(pool.actors[0].ready.remote())
    pending = pool.submit(reqs)
    time.sleep(0.05)
    ray.kill(pool.actors[0], no_restart=False)  # injected fault: the actor dies mid-batch
    z = RewardPool.gather(pending, len(reqs))
    assert len(z) == 96 and all(len(v) == 4 for v in z)
    new = ray.get(pool.actors[0].ready.remote())
    assert new["pid"] != old["pid"] and new["restarted"]
    assert pool.metrics()["restarts"] == 1
    # the call in flight was retried on the new actor, not answered by the old one
    assert pool.stats()[0]["requests"] >= len(reqs)
    assert not psutil.pid_exists(old["pid"]) or psutil.Process(old["pid"]).status() == "zombie"
    # nothing of the old engine survives: no children of the dead actor, and only the new
    # actor's engine (in-process) exists
    assert _engine_processes(old["pid"]) == []
    assert _engine_processes(new["pid"]) == []
    # the restarted engine scores the same requests the same way
    np.testing.assert_allclose(pool.score(reqs[:4]), z[:4], atol=1e-4)
    assert os.getpid() != new["pid"]


def test_frames_named_alike_in_two_videos_are_scored_from_their_own_pixels(
        pool, clip_dir, real_frames, tmp_path):
    """The actor names each frame (video, frame number) for vLLM's caches instead of hashing
    its pixels: frame 10 of another video is another image. Checked against the
    `transformers` backend, which caches nothing."""
    from dataclasses import replace

    from refocus_ray.evidence import write_mp4
    from refocus_ray.scoring import TransformersBackend

    other = tmp_path / "reversed.mp4"
    write_mp4(other, iter(real_frames[::-1]), 25.0, crf=23)
    reqs = [ScoreRequest(str(v), (10, 100, 200), "Which object is it?",
                         ("cat", "moon", "page", "coffee"))
            for v in (clip_dir / "long.mp4", other)]  # fmt: skip
    z = [pool.score([r])[0] for r in reqs]  # two engine calls: the first video's frames cached
    ref = TransformersBackend(replace(pool.cfg, backend="transformers")).score(reqs)
    assert np.abs(np.subtract(*ref)).max() > 1e-3  # the two videos' frames do differ
    np.testing.assert_allclose(z, ref, atol=1e-4)


def test_bad_request_fails_alone(pool, clip_dir):
    good = _requests(clip_dir, 3, offset=50)
    bad = ScoreRequest(str(clip_dir / "long.mp4"), (5, 5000), "Which object is it?", ("cat", "moon"))
    pending = pool.submit([*good, bad])
    with pytest.raises(ray.exceptions.RayTaskError, match="Out of bound"):
        RewardPool.gather(pending, 4)
    assert len(pool.score(good)) == 3  # the actor is alive and the good requests are scored


@ray.remote
class StuckScorerFault:
    """Injected fault: a scorer actor that is alive but never answers."""

    def ready(self) -> dict:
        return {"model_id": "stuck-fault", "pid": os.getpid(), "restarted": False}

    def score(self, requests, caller=""):
        time.sleep(3600)


def test_a_stuck_actor_is_an_error_not_a_hang(ray_local, clip_dir):
    cfg = ReferenceConfig(backend="vllm", model="unused", request_timeout_s=2.0,
                          pool_name="stuck-fault")
    stuck = StuckScorerFault.remote()
    pool = RewardPool([stuck], cfg)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="request_timeout_s"):
        pool.score(_requests(clip_dir, 2))
    assert time.monotonic() - t0 < 30
    ray.kill(stuck)
