"""Asynchronous sampling (``train.async_sampling``): the env runners sample the next iteration
while the learner updates on this one, with the same whole groups, K and questions as
synchronous sampling, and a resumed run picks the stream up where its checkpoint left it.

Real run: conftest's cached pools and question features (`run_cfg`), one remote RLlib env runner
calling the reward pool (a vLLM engine on the random-init plumbing Idefics3, `scorer`).
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from refocus_ray.config import ConfigError, build, load_config
from refocus_ray.grpo import GROUP, QUERY, SHOW_OPTIONS, GRPOConfig, TrainConfig

G, ROUNDS = 4, 2  # group size; one group per runner and round, so 2 rounds per iteration
POLICY = {"d_model": 64, "n_heads": 2, "n_layers": 2}
REQUESTS_PER_ITERATION = ROUNDS * G


def _cfg(run_cfg, pool_name: str, async_sampling: bool):
    return load_config(None, {
        "run_dir": run_cfg.run_dir, "data.kind": "table", "data.table": run_cfg.data.table,
        "encoders.frame_size": 64, "pool.max_frames": 32, "policy": POLICY,
        "reference": {"pool_name": pool_name},
        "train": {"group_size": G, "groups_per_env_runner": 1, "groups_per_batch": ROUNDS,
                  "num_env_runners": 1, "curriculum": [[4, 1], [8, 5]], "lr": 1e-3, "seed": 7,
                  "async_sampling": async_sampling}})  # fmt: skip


class CollectedRounds:
    """Spy on the real EnvRunnerGroup: records the episodes each collected sampling round
    returned to the driver, and per round (tag) how many env runners it was launched on and
    how many returned it (the calls go through unchanged)."""

    def __init__(self, group) -> None:
        self.fetch, self.launch = group.fetch_ready_async_reqs, group.foreach_env_runner_async
        self.episodes, self.launched, self.returned = [], {}, {}
        group.fetch_ready_async_reqs, group.foreach_env_runner_async = self, self._launch

    def _launch(self, func, tag=None, **kwargs) -> int:
        self.launched[tag] = self.launch(func, tag=tag, **kwargs)
        return self.launched[tag]

    def __call__(self, **kwargs):
        out = self.fetch(**kwargs)
        self.returned[kwargs["tags"]] = self.returned.get(kwargs["tags"], 0) + len(out)
        for _, (episodes, _, _) in out:
            self.episodes.extend(episodes)
        return out

    def take(self) -> list:
        out, self.episodes = self.episodes, []
        return out

    def lost(self) -> int:
        """Rounds launched on an env runner that never returned them, over collected rounds."""
        return sum(self.launched[tag] - n for tag, n in self.returned.items())


def assert_whole_groups(episodes, group_size: int) -> int:
    """Check that `episodes` are whole GRPO groups (group_size finished episodes of the group's
    K each); return how many groups."""
    sizes = Counter(int(e.get_observations(0)[GROUP]) for e in episodes)
    assert set(sizes.values()) <= {group_size}, sizes
    (k,) = {int(e.get_observations(0)["k"]) for e in episodes} or {0}
    assert all(e.is_terminated and len(e) == k for e in episodes)
    return len(sizes)


def _stream(episodes) -> list[tuple[int, int, bool, int]]:
    """(group id = stream position, query, options shown, K) per group, in stream order."""
    return sorted({(int(o[GROUP]), int(o[QUERY]), bool(o[SHOW_OPTIONS]), int(o["k"]))
                   for o in (e.get_observations(0) for e in episodes)})


def _requests(scorer) -> int:
    return sum(s["requests"] for s in scorer.stats())


def _train(algo, rounds: CollectedRounds) -> tuple[dict, list]:
    result = algo.train()
    return result["grpo"], rounds.take()


def test_async_sampling_is_validated_by_name(run_cfg):
    with pytest.raises(ConfigError, match=r"train\.async_sampling: needs train\.num_env_runners"):
        build(TrainConfig, {"async_sampling": True}, "train")
    with pytest.raises(ConfigError, match=r"train\.async_sampling: expected"):
        build(TrainConfig, {"async_sampling": "yes", "num_env_runners": 1}, "train")
    assert build(TrainConfig, {"async_sampling": True, "num_env_runners": 1}, "train")
    algo_cfg = GRPOConfig.from_run_config(_cfg(run_cfg, "unused", True))
    assert algo_cfg.async_sampling
    algo_cfg.env_runners(num_env_runners=0)  # the driver cannot sample while it learns
    with pytest.raises(ConfigError, match=r"train\.async_sampling: needs"):
        algo_cfg.validate()


@pytest.mark.vllm
@pytest.mark.slow
def test_async_sampling_overlaps_learning_keeps_groups_and_queries_and_resumes(
        run_cfg, scorer, tmp_path):
    from ray.rllib.algorithms.algorithm import Algorithm

    iterations = 3
    # synchronous reference run: the stream of groups it consumes, iteration by iteration
    algo = GRPOConfig.from_run_config(_cfg(run_cfg, scorer.cfg.pool_name, False)).build_algo()
    try:
        spy = CollectedRounds(algo.env_runner_group)
        sync = [_train(algo, spy) for _ in range(iterations)]
    finally:
        algo.stop()

    algo = GRPOConfig.from_run_config(_cfg(run_cfg, scorer.cfg.pool_name, True)).build_algo()
    ckpt = tmp_path / "iter_2"
    try:
        spy = CollectedRounds(algo.env_runner_group)
        before = _requests(scorer)
        runs = []
        for i in range(iterations):
            runs.append(_train(algo, spy))
            if i == 1:  # iteration 3's rounds are in flight while this saves
                algo.save_to_path(str(ckpt))
        # the 4th iteration's groups are sampled and scored without another train() call:
        # sampling runs while the driver is elsewhere (here: idle; in training: learning)
        deadline = time.monotonic() + 120
        while (_requests(scorer) - before < (iterations + 1) * REQUESTS_PER_ITERATION
               and time.monotonic() < deadline):
            time.sleep(0.2)
        assert _requests(scorer) - before == (iterations + 1) * REQUESTS_PER_ITERATION
    finally:
        algo.stop()

    for (g_sync, eps_sync), (g_async, eps_async) in zip(sync, runs):
        # the same questions, option dropout and K, group for group, as synchronous sampling
        assert _stream(eps_async) == _stream(eps_sync)
        assert assert_whole_groups(eps_async, G) == ROUNDS
        # the iteration's metrics count its own batch, not the one launched in the meantime
        assert (g_async["groups"], g_async["reward_calls"], g_async["reward_requests"]) == (
            ROUNDS, ROUNDS, REQUESTS_PER_ITERATION)
        assert g_async["k"] == g_sync["k"] and 0 <= g_async["learner_wait_frac"] <= 1
    assert [g["k"] for g, _ in runs] == [4, 8, 8]
    assert sum(g["updates"] for g, _ in runs) > 0  # a random reference still spreads rewards
    positions = [p for _, eps in runs for p, *_ in _stream(eps)]
    assert positions == list(range(iterations * ROUNDS))  # no question skipped or repeated

    # resume from the checkpoint taken with iteration 3's rounds in flight: they are dropped
    # and launched again from the same cursors, so iteration 3 sees the same questions
    algo = Algorithm.from_checkpoint(str(ckpt))
    try:
        assert algo.config.async_sampling and algo.training_iteration == 2
        spy = CollectedRounds(algo.env_runner_group)
        g_resumed, eps_resumed = _train(algo, spy)
        assert algo.training_iteration == 3
    finally:
        algo.stop()
    assert _stream(eps_resumed) == _stream(runs[2][1])
    assert (g_resumed["k"], g_resumed["groups"], g_resumed["reward_requests"]) == (
        8, ROUNDS, REQUESTS_PER_ITERATION)
