"""The scorer actor's batching policy: callers in a loop share engine calls; a lone caller is
never held back by the batching window.

Policy, not engine: one scorer actor with the real `transformers` backend on the random
plumbing Idefics3 (starts in seconds) and a long window (3 s), so a caller held by the window
and one that is not differ by far more than any scheduling noise.
"""

from __future__ import annotations

import threading

import pytest

from refocus_ray.reward_pool import RewardPool
from refocus_ray.scoring import ReferenceConfig, ScoreRequest

pytestmark = pytest.mark.slow

WINDOW_MS = 3000.0


@pytest.fixture(scope="module")
def pool(plumbing_model, ray_local):
    cfg = ReferenceConfig(backend="transformers", model=str(plumbing_model), answer_mode="letter",
                          pool_name="test-batching", max_wait_ms=WINDOW_MS)  # fmt: skip
    p = RewardPool.start(cfg)
    yield p
    p.shutdown()


def _group(clip_dir, caller: int, call: int) -> list[ScoreRequest]:
    """4 distinct requests (no cache hits) on one video, like a small GRPO group."""
    base = 100 * caller + 20 * call
    return [ScoreRequest(str(clip_dir / "long.mp4"), (base + i, base + i + 20), "Which is it?",
                         ("cat", "moon", "page")) for i in range(4)]  # fmt: skip


def _delta(pool, before):
    after = pool.stats()[0]
    return {k: after[k] - before[k] for k in ("engine_calls", "scored", "queue_wait_s")}


def test_callers_in_a_loop_share_engine_calls(pool, clip_dir):
    before = pool.stats()[0]
    answers: dict[int, list] = {}

    def caller(c: int) -> None:
        answers[c] = [pool.score(_group(clip_dir, c, i)) for i in range(4)]

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    d = _delta(pool, before)
    assert [len(a) for a in answers.values()] == [4, 4] and d["scored"] == 32
    # 8 calls: at most the first and the last go alone (a caller is unknown until answered
    # once; the other has left), every other engine call takes one call of each caller
    assert d["engine_calls"] <= 5, d


def test_lone_caller_is_not_held_by_the_window(pool, clip_dir):
    pool.score(_group(clip_dir, 5, 0))  # after the window of any earlier caller has passed
    before = pool.stats()[0]
    for i in range(1, 4):
        pool.score(_group(clip_dir, 5, i))
    d = _delta(pool, before)
    assert d["engine_calls"] == 3
    # a fixed window would queue every call for WINDOW_MS; nobody else is expected here
    assert d["queue_wait_s"] / d["scored"] < WINDOW_MS / 1e3 / 10, d
