"""The reward pool's routing: a video's requests go to its home actor, unless that actor has a
group more queued than another; then the less loaded engine takes them
(`reference.route_by_load`).

Policy, not engine: two scorer actors with the real `transformers` backend on the random
plumbing Idefics3 (they start in seconds). An actor is made busy with a real batch of 64
requests (seconds of work on one core), and the test waits until that actor reports it.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

import numpy as np
import pytest
import ray

from refocus_ray.reward_pool import RewardPool
from refocus_ray.scoring import ReferenceConfig, ScoreRequest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool(plumbing_model, ray_local):
    cfg = ReferenceConfig(backend="transformers", model=str(plumbing_model), answer_mode="letter",
                          pool_name="test-routing", num_actors=2, max_wait_ms=5)  # fmt: skip
    p = RewardPool.start(cfg)
    yield p
    p.shutdown()


SUBSETS = list(itertools.combinations(range(0, 80, 4), 3))  # 1,140; the shortest clip: 80 frames


def _group(video, n: int, base: int) -> list[ScoreRequest]:
    """n distinct requests (no cache hits) on one video, like a GRPO group."""
    return [ScoreRequest(str(video), f, "Which is it?", ("cat", "moon", "page"))
            for f in SUBSETS[base:base + n]]


def _same_home(pool, clip_dir):
    """Two videos with the same home actor (three videos, two actors: there is a pair)."""
    videos = [clip_dir / f"{n}.mp4" for n in ("short", "mid", "long")]
    return next((a, b) for a, b in itertools.combinations(videos, 2)
                if pool.home(str(a)) == pool.home(str(b)))


def _busy(pool, video, base: int) -> tuple[int, list]:
    """Send a batch of 64 new requests on `video` to its (idle) home actor; return once that
    actor reports them queued or running."""
    home = pool.home(str(video))
    pending = pool.submit(_group(video, 64, base))
    assert [pool.route(_group(video, 1, 0), by_load=False)] == [{home: [0]}]
    deadline = time.monotonic() + 60
    while ray.get(pool.actors[home].load.remote()) == 0:
        assert time.monotonic() < deadline and not ray.wait([r for _, r in pending], timeout=0)[0]
        time.sleep(0.01)
    return home, pending


def _scored(pool) -> list[int]:
    return [s["scored"] for s in pool.stats()]


def test_an_idle_pool_sends_each_video_home_and_keeps_a_group_together(pool, clip_dir):
    groups = [_group(clip_dir / f"{n}.mp4", 3, 7) for n in ("short", "mid", "long")]
    for g in groups:
        assert pool.route(g) == {pool.home(g[0].video): [0, 1, 2]}
    # one call of all three: each video's group in one actor, both actors used (when the three
    # share a home, the second group finds home a group ahead of the idle actor)
    routed = pool.route([r for g in groups for r in g])
    assert sorted(sorted(idx) for idx in routed.values()) in (
        [[0, 1, 2], [3, 4, 5, 6, 7, 8]], [[0, 1, 2, 3, 4, 5], [6, 7, 8]],
        [[0, 1, 2, 6, 7, 8], [3, 4, 5]])


def test_a_busy_home_actor_sends_the_next_group_to_the_idle_one(pool, clip_dir):
    v, w = _same_home(pool, clip_dir)
    home, pending = _busy(pool, v, 0)
    before = _scored(pool)
    group = _group(w, 4, 200)
    z = pool.score(group)  # answered by the idle actor while the home actor works
    gained = np.subtract(_scored(pool), before)
    assert gained[1 - home] == 4, gained
    RewardPool.gather(pending, 64)
    # the same scores as the home actor gives them
    home_z = ray.get(pool.actors[home].score.remote(group))
    np.testing.assert_allclose(z, home_z, atol=1e-4)


def test_another_client_sees_the_load_the_actors_report(pool, clip_dir):
    """An env runner's client knows nothing of the driver's calls: it balances on what the
    actors report."""
    v, w = _same_home(pool, clip_dir)
    home, pending = _busy(pool, v, 500)
    runner = RewardPool(pool.actors, pool.cfg)  # what `RewardPool.attach` builds elsewhere
    assert runner.sent == [] and runner.route(_group(w, 4, 300)) == {1 - home: [0, 1, 2, 3]}
    home_only = RewardPool(pool.actors, replace(pool.cfg, route_by_load=False))
    assert home_only.route(_group(w, 4, 300)) == {home: [0, 1, 2, 3]}
    RewardPool.gather(pending, 64)


def test_a_client_holds_no_answered_call(pool, clip_dir):
    """The client remembers its unanswered calls (their results stay pinned in the object store
    while it does): answered ones are dropped, and a client that does not balance (one actor,
    as the embedded training's, or routing by home only) keeps none."""
    pool.score(_group(clip_dir / "mid.mp4", 4, 600))
    pool.loads()
    assert pool.sent == []
    for client in (RewardPool(pool.actors[:1], pool.cfg),
                   RewardPool(pool.actors, replace(pool.cfg, route_by_load=False))):
        for i in range(3):
            client.score(_group(clip_dir / "mid.mp4", 4, 700 + 10 * i))
        assert client.sent == []


def test_a_split_call_answers_every_request_in_its_place(pool, clip_dir):
    """One call of two groups whose videos share a home: the second group finds home a group
    ahead of the other actor and goes there, and every answer comes back at its request's
    position, as the home actor gives it."""
    v, w = _same_home(pool, clip_dir)
    mixed = [r for pair in zip(_group(v, 3, 400), _group(w, 3, 400)) for r in pair]
    alone = [pool.score([r])[0] for r in mixed]  # all scored (and cached) by the home actor
    home = pool.home(str(v))
    assert pool.route(mixed) == {home: [0, 2, 4], 1 - home: [1, 3, 5]}
    np.testing.assert_allclose(pool.score(mixed), alone, atol=1e-4)


@ray.remote
class SilentLoadFault:
    """Injected fault: a scorer actor that is alive but never answers how loaded it is."""

    def ready(self) -> dict:
        return {"model_id": "silent-load-fault"}

    def load(self) -> int:
        time.sleep(3600)
        return 0


def test_an_actor_silent_about_its_load_costs_a_second_not_a_hang(pool, clip_dir):
    """A restarting or stuck actor does not answer the load probe: the client waits 1 s, then
    routes on its own count of unanswered calls."""
    silent = SilentLoadFault.remote()
    group = _group(clip_dir / "mid.mp4", 4, 900)
    home = pool.home(group[0].video)  # the real actor goes there, the silent one beside it
    client = RewardPool([pool.actors[0], silent][:: 1 - 2 * home], pool.cfg)
    t0 = time.monotonic()
    z = client.score(group)  # home: the real actor
    assert 1.0 <= time.monotonic() - t0 < 30
    np.testing.assert_allclose(z, ray.get(pool.actors[0].score.remote(group)), atol=1e-4)
    ray.kill(silent)
