"""GRPO: the math by hand, the env's mechanics and reward batching, the RLlib pieces end to end.

Everything runs on real data: real clips, real cached pool features (EfficientNet), real query
features (MiniLM) (conftest `run_cfg`). Rewards come from the reward pool (conftest `scorer`): a
real vLLM engine on a tiny random-init Idefics3 (`forge.build_random_model`, the plumbing model)
in a Ray actor.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from envs.frame_selection import (
    FrameSelectionVectorEnv,
    QuerySource,
    load_query_table,
    score_requests,
)
from refocus_ray.config import ConfigError, build, load_config
from refocus_ray.grpo import (
    GroupAdvantages,
    GRPOConfig,
    SelectorRLModule,
    TrainConfig,
    _sample_round,
    group_advantages,
    grpo_loss,
    k_at,
)

G = 4  # group size in these tests
POLICY = {"d_model": 64, "n_heads": 2, "n_layers": 2}


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def table(run_cfg):
    return load_query_table(QuerySource.of(run_cfg, "train", min_frames=8))


class CountingScorer:
    """Counting wrapper around a real scorer: records every call and its requests."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def score(self, requests):
        self.calls.append(list(requests))
        return self.inner.score(requests)


def _env(table, scorer=None, **kw) -> FrameSelectionVectorEnv:
    args = {"num_envs": 2 * G, "group_size": G, "k": 4, "k_max": 8, "f_max": 32, "scorer": scorer}
    return FrameSelectionVectorEnv(table, **{**args, **kw})


def _module(obs_space, act_space, run_cfg, seed: int = 0) -> SelectorRLModule:
    torch.manual_seed(seed)
    src = QuerySource.of(run_cfg, "train", min_frames=8)
    return SelectorRLModule(observation_space=obs_space, action_space=act_space,
                            model_config={"policy": POLICY, "query_source": src.to_dict()})


# ------------------------------------------------------------------------------ the math


def test_group_advantages_by_hand():
    # group 7: mean 0, population std 0.5 -> A = +-0.5 / 0.5 = +-1
    # group 3: all equal -> zero variance -> masked, A = 0
    # group 9: r = [1, 0, 0, 0]: mean 1/4, std = sqrt((9/16 + 3/16) / 4) = sqrt(3)/4
    #          A = (3/4) / (sqrt(3)/4) = sqrt(3) and (-1/4) / (sqrt(3)/4) = -1/sqrt(3)
    r = np.array([0.5, -0.5, 0.5, -0.5, 0.2, 0.2, 0.2, 0.2, 1.0, 0.0, 0.0, 0.0])
    g = np.array([7, 7, 7, 7, 3, 3, 3, 3, 9, 9, 9, 9])
    adv, valid = group_advantages(r, g, eps=0.0)
    np.testing.assert_allclose(adv[:4], [1, -1, 1, -1], atol=1e-6)
    np.testing.assert_array_equal(adv[4:8], 0)
    s3 = math.sqrt(3)
    np.testing.assert_allclose(adv[8:], [s3, -1 / s3, -1 / s3, -1 / s3], rtol=1e-6)
    np.testing.assert_array_equal(valid, [True] * 4 + [False] * 4 + [True] * 4)


def test_grpo_loss_by_hand():
    # two episodes, K = 2. Episode 0: A = +1, rho = [1.5, 0.9]; episode 1: A = -1, rho = [0.5, 1.1]
    # clip 0.2: min(rho A, clip(rho) A) = [min(1.5, 1.2), min(0.9, 0.9)] = [1.2, 0.9]
    #                                     [min(-0.5, -0.8), min(-1.1, -1.1)] = [-0.8, -1.1]
    # L_pg = -(1.2 + 0.9 - 0.8 - 1.1) / 4 = -0.05;  H = (1 + 2 + 3 + 4) / 4 = 2.5
    # L = -0.05 - 1e-3 * 2.5 = -0.0525
    old = torch.tensor([[-2.0, -1.0], [-3.0, -0.5]])
    logp = (old + torch.log(torch.tensor([[1.5, 0.9], [0.5, 1.1]])))
    logp.requires_grad_(True)
    entropy = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    loss, stats = grpo_loss(logp, old, torch.tensor([1.0, -1.0]), torch.tensor([True, True]),
                            entropy, clip=0.2, beta=1e-3)
    assert loss.item() == pytest.approx(-0.0525, abs=1e-6)
    assert stats["policy_loss"].item() == pytest.approx(-0.05, abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(0.5)  # 1.5 and 0.5 are outside [0.8, 1.2]
    loss.backward()
    # dL/dl = -rho A / 4 where unclipped; 0 where the clipped branch is the minimum
    np.testing.assert_allclose(logp.grad.numpy(), [[0.0, -0.9 / 4], [0.0, 1.1 / 4]], atol=1e-6)
    np.testing.assert_allclose(entropy.grad.numpy(), np.full((2, 2), -1e-3 / 4), atol=1e-9)


def test_zero_variance_groups_give_zero_gradient(table, run_cfg):
    env = _env(table)
    mod = _module(env.single_observation_space, env.single_action_space, run_cfg)
    obs, _ = env.reset()
    picks = np.stack([np.arange(4) + i for i in range(2 * G)])  # distinct frames per episode
    batch = {"query": torch.as_tensor(obs["query"]),
             "show_options": torch.as_tensor(obs["show_options"]),
             "actions": torch.as_tensor(picks)}
    old = torch.full((2 * G, 4), -3.0)
    # group 0 (rows 0-3): equal rewards; group 1 (rows 4-7): a spread
    rewards = np.array([0.3] * G + [0.9, -0.2, 0.1, -0.6])
    adv, valid = group_advantages(rewards, np.repeat([0, 1], G))
    assert not valid[:G].any() and valid[G:].all()

    def grads(rows):
        mod.zero_grad()
        out = mod._forward_train({k: v[rows] for k, v in batch.items()})
        loss, _ = grpo_loss(out["logp"], old[rows], torch.as_tensor(adv)[rows],
                            torch.as_tensor(valid)[rows], out["entropy"])
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                for p in mod.parameters()]

    zero_group_only = grads(np.arange(G))
    assert all(float(g.abs().max()) == 0.0 for g in zero_group_only)
    both, spread_only = grads(np.arange(2 * G)), grads(np.arange(G, 2 * G))
    assert any(float(g.abs().max()) > 0 for g in both)
    for a, b in zip(both, spread_only):  # adding the zero-variance group changes nothing
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # batch shape: float noise


def test_curriculum_schedule():
    cur = [[4, 2], [8, 3], [16, 1]]
    assert [k_at(cur, i) for i in range(8)] == [4, 4, 8, 8, 8, 16, 16, 16]


# ---------------------------------------------------------------------------------- env


def test_training_warns_once_when_groups_stop_differing():
    """A run whose groups all earn the same reward cannot move the policy: the user is told
    once, after a full window of such iterations, and a single informative iteration resets
    the count. The series is g3's shape (docs/benchmarks.md): 0.23 at first, then ~0.01."""
    from refocus_ray.train import SignalWatch

    watch = SignalWatch(min_spread=0.02, window=5)
    spreads = [0.23, 0.14, 0.01, 0.01, 0.01, 0.01, 0.30, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01,
               0.01]
    said = [(i, m) for i, v in enumerate(spreads, 1)
            if (m := watch.update({"iteration": i, "reward_group_std_mean": v}))]
    assert [i for i, _ in said] == [12]  # 8..12 is the first run of 5; 3..6 was cut at 7
    assert "no signal" in said[0][1] and "reward_landscape" in said[0][1]
    assert watch.update({"iteration": 15}) is None  # rows without the metric are ignored


def test_env_masks_picks_and_terminates_after_k(table):
    env = _env(table)
    obs, _ = env.reset()
    assert env.observation_space.contains(obs)
    sizes = [len(table.queries[q].frames) for q in obs["query"]]
    np.testing.assert_array_equal(obs["action_mask"].sum(1), sizes)
    rng = np.random.default_rng(0)
    for t in range(4):
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in obs["action_mask"]])
        done = env.advance(actions)
        obs = env._obs()
        assert (obs["step"] == t + 1).all()
        np.testing.assert_array_equal(obs["chosen"][:, t], actions)
        assert (obs["action_mask"][np.arange(2 * G), actions] == 0).all()
        assert len(done) == (2 * G if t == 3 else 0)  # exactly K picks, all groups together
        if t < 3:  # picking any already chosen frame again is refused, and changes nothing
            with pytest.raises(ValueError, match="already chosen"):
                env.advance(obs["chosen"][:, 0])
            np.testing.assert_array_equal(env._obs()["step"], obs["step"])
    assert (obs["chosen"][:, 4:] == -1).all()
    assert len({tuple(c) for c in obs["chosen"][:, :4]}) == 2 * G
    assert all(len(set(c[:4])) == 4 for c in obs["chosen"])  # never a repeat
    # a pick outside the pool (padding) is refused too
    env2 = _env(table)
    o2, _ = env2.reset()
    with pytest.raises(ValueError, match="outside the pool"):
        env2.advance(np.full(2 * G, 31 if o2["action_mask"][0, 31] == 0 else 40))
    # NEXT_STEP autoreset: the next call resets every finished group onto new queries
    before = obs["group"].copy()
    env.advance(np.zeros(2 * G, np.int64))
    after = env._obs()
    assert (after["step"] == 0).all() and not np.intersect1d(before, after["group"]).size


def test_query_stream_groups_dropout_and_runner_slices(table):
    env = _env(table, options_dropout=0.5, num_envs=4 * G)
    seen, shows = [], []
    for _ in range(20):
        obs, _ = env.reset()
        for g in range(4):  # a group shares query, K and the options flag
            members = slice(g * G, (g + 1) * G)
            assert len(set(obs["query"][members])) == 1
            assert len(set(obs["show_options"][members])) == 1
            assert len(set(obs["group"][members])) == 1
            shows.append(int(obs["show_options"][g * G]))
        seen.extend(obs["query"][:: G].tolist())
    assert 0.25 < np.mean(shows) < 0.75
    # every epoch of the stream visits each query once (9 queries, shuffled)
    assert sorted(seen[:9]) == list(range(9))
    # same cursor -> same queries (resumable); two runners take disjoint slices
    a, b = _env(table), _env(table)
    a.configure(cursor=5, stream_offset=0, stream_stride=2)
    b.configure(cursor=5, stream_offset=1, stream_stride=2)
    qa, qb = a.reset()[0], b.reset()[0]
    assert not set(qa["group"]) & set(qb["group"])
    a.configure(cursor=5)
    np.testing.assert_array_equal(a.reset()[0]["query"], qa["query"])


@pytest.mark.vllm
def test_group_shares_query_and_rewards_come_from_one_call(table, scorer):
    counting = CountingScorer(scorer)
    env = _env(table, scorer=counting, num_envs=3 * G, options_dropout=1.0)
    obs, _ = env.reset()
    rng = np.random.default_rng(1)
    for t in range(4):
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in obs["action_mask"]])
        obs, rewards, term, trunc, infos = env.step(actions)
        assert len(counting.calls) == (1 if t == 3 else 0)
    assert term.all() and not trunc.any()
    (call,) = counting.calls
    assert len(call) == 3 * G  # every finished episode of every group in ONE call
    for g in range(3):
        reqs = call[g * G: (g + 1) * G]
        q = table.queries[int(obs["query"][g * G])]
        # one (video, question, options) per group, options kept for the reward although the
        # policy's query hid them (options_dropout = 1)
        assert {(r.video, r.question, r.options) for r in reqs} == {(q.video, q.question,
                                                                    q.options)}
        assert obs["show_options"][g * G] == 0 and len(q.options) == 4
        for r, chosen in zip(reqs, obs["chosen"][g * G: (g + 1) * G]):
            assert list(r.frames) == sorted(q.frames[chosen[:4]].tolist())  # chronological
    # rewards are the reference model's: the same call again gives the same r
    r2, _ = score_requests(scorer, call, [table.queries[int(q)].answer for q in obs["query"]],
                           "tanh_margin")
    np.testing.assert_allclose(rewards, r2, atol=1e-5)
    assert ((rewards > -1) & (rewards < 1)).all() and infos["_margin"].all()
    assert env.pop_stats()["reward_calls"] == 1


# --------------------------------------------------------------------------- RL module


def test_module_plans_distinct_picks_and_rescore_matches_sampler(table, run_cfg):
    from ray.rllib.core.columns import Columns

    env = _env(table, options_dropout=0.5, k=6)
    mod = _module(env.single_observation_space, env.single_action_space, run_cfg)
    obs, _ = env.reset()
    logps = []
    for _ in range(6):
        out = mod.forward_exploration({Columns.OBS: {k: torch.as_tensor(v)
                                                     for k, v in obs.items()}})
        env.advance(out[Columns.ACTIONS].numpy())
        logps.append(out[Columns.ACTION_LOGP])
        obs = env._obs()
    chosen = torch.as_tensor(obs["chosen"][:, :6])
    assert all(len(set(c.tolist())) == 6 for c in chosen)
    assert not mod._plans  # finished episodes leave no cached plan behind
    with torch.no_grad():
        re = mod._forward_train({"query": torch.as_tensor(obs["query"]),
                                 "show_options": torch.as_tensor(obs["show_options"]),
                                 Columns.ACTIONS: chosen})
    # the learner's teacher-forced pass reproduces the behaviour log-probs: same queries,
    # same options flag, same picks
    torch.testing.assert_close(re["logp"], torch.stack(logps, 1), atol=1e-4, rtol=1e-4)
    assert (re["entropy"] > 0).all() and (re["entropy"] <= math.log(32) + 1e-4).all()


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("section, message", [
    ({"clip_eps": 0.1}, "train.clip_eps: unknown key"),
    ({"group_size": 1}, "train.group_size: must be >= 2"),
    ({"curriculum": [[4, 10], [8]]}, "train.curriculum"),
    ({"groups_per_batch": 6, "minibatch_groups": 4}, "train.minibatch_groups"),
    ({"options_dropout": 1.5}, "train.options_dropout"),
    ({"clip": "wide"}, "train.clip: expected"),
    ({"select_split": "test"}, "train.select_split: 'test' would pick the policy on the split"),
    ({"select_split": "dev"}, "train.select_split: must be val, train or null"),
])
def test_train_section_names_bad_keys(section, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        build(TrainConfig, section, "train")


def test_grpo_config_validates(run_cfg):
    cfg = load_config(None, {**_overrides(run_cfg), "train": {"group_size": G,
                             "groups_per_env_runner": 2, "groups_per_batch": 3}})
    with pytest.raises(ConfigError, match=r"train\.groups_per_batch: must be a multiple"):
        GRPOConfig.from_run_config(cfg).validate()
    bad = GRPOConfig.from_run_config(load_config(None, {**_overrides(run_cfg),
                                                        "train": {"group_size": G}}))
    bad.env_runners(num_envs_per_env_runner=G + 1)
    with pytest.raises(ConfigError, match=r"env_runners\.num_envs_per_env_runner"):
        bad.validate()
    with pytest.raises(TypeError, match="clip_eps"):
        GRPOConfig().training(clip_eps=0.1)
    with pytest.raises(ConfigError, match=r"train\.curriculum: K=64 exceeds pool\.max_frames"):
        GRPOConfig.from_run_config(load_config(None, {**_overrides(run_cfg),
                                                      "train": {"curriculum": [[64, 1]]}}))
    with pytest.raises(ConfigError, match=r"policy\.d_model"):
        GRPOConfig.from_run_config(load_config(None, {**_overrides(run_cfg),
                                                      "policy": {"d_model": 0}}))


def _overrides(run_cfg) -> dict:
    return {"run_dir": run_cfg.run_dir, "data.kind": "table", "data.table": run_cfg.data.table,
            "encoders.frame_size": 64, "pool.max_frames": 32}


# ---------------------------------------------------------------------------- end to end


@pytest.mark.vllm
def test_algorithm_trains_whole_groups_with_curriculum(run_cfg, scorer):
    counting = CountingScorer(scorer)
    cfg = load_config(None, {**_overrides(run_cfg), "policy": POLICY, "train": {
        "group_size": G, "groups_per_env_runner": 2, "groups_per_batch": 2,
        "curriculum": [[4, 1], [8, 2]], "lr": 1e-3, "seed": 3}})
    algo = GRPOConfig.from_run_config(cfg, scorer=counting).build_algo()
    try:
        learner = algo.learner_group._learner.module["default_policy"]
        w0 = [p.detach().clone() for p in learner.parameters()]
        results = [algo.train() for _ in range(3)]
        ks = [r["grpo"]["k"] for r in results]
        assert ks == [4, 8, 8]
        for r in results:
            g = r["grpo"]
            assert g["groups"] == 2 and g["reward_calls"] == 1 and g["reward_requests"] == 2 * G
            assert g["time_rollout_s"] >= g["time_reward_wait_s"] > 0
        # one call per round, groups of G requests on one question each
        assert [len(c) for c in counting.calls] == [2 * G] * 3
        assert [len(c[0].frames) for c in counting.calls] == [4, 8, 8]
        trained = [r for r in results if r["grpo"]["updates"] > 0]
        assert trained  # a random reference model still spreads rewards within a group
        if trained:
            lrn = trained[0]["learners"]["default_policy"]
            assert lrn["approx_kl"] < 1e-3 and abs(lrn["ratio_mean"] - 1) < 1e-2
            assert 0 < lrn["entropy"] <= math.log(32) + 1e-4
            moved = any(not torch.equal(a, b) for a, b in zip(w0, learner.parameters()))
            assert moved
            # the env runner got the new weights
            runner = algo.env_runner.module
            for a, b in zip(learner.parameters(), runner.parameters()):
                torch.testing.assert_close(a.detach(), b.detach())
        # the learner connector: whole groups -> advantages; a split group is an error
        episodes = _sample_round(algo.env_runner, 4, 1000, 2 * G)[0]
        rows = GroupAdvantages(group_size=G)(rl_module=None, batch={},
                                             episodes=episodes)["default_policy"]
        assert rows["actions"].shape == (2 * G, 4) and rows["action_logp"].shape == (2 * G, 4)
        for g in np.unique(rows["group"]):
            assert abs(rows["advantages"][rows["group"] == g].sum()) < 1e-4
        with pytest.raises(ValueError, match="partial GRPO groups"):
            GroupAdvantages(group_size=G)(rl_module=None, batch={}, episodes=episodes[: G + 1])
    finally:
        algo.stop()


@pytest.mark.vllm
def test_remote_env_runner_attaches_to_the_reward_pool(run_cfg, scorer):
    """The production path: an env runner process finds the pool by name and batches there."""
    before = sum(s["requests"] for s in scorer.stats())
    cfg = load_config(None, {**_overrides(run_cfg), "policy": POLICY,
                             "reference": {"pool_name": scorer.cfg.pool_name},
                             "train": {"group_size": G, "groups_per_env_runner": 2,
                                       "groups_per_batch": 2, "curriculum": [[4, 1]],
                                       "num_env_runners": 1}})
    algo = GRPOConfig.from_run_config(cfg).build_algo()
    try:
        g = algo.train()["grpo"]
        assert (g["groups"], g["reward_calls"], g["reward_requests"]) == (2, 1, 2 * G)
        assert sum(s["requests"] for s in scorer.stats()) - before == 2 * G
    finally:
        algo.stop()


@pytest.mark.vllm
def test_train_checkpoints_resumes_and_exports_the_policy(run_cfg, scorer):
    from refocus_ray.policy import load
    from refocus_ray.train import latest_checkpoint, train

    def cfg(iterations: int, curriculum=([4, 1], [8, 5])):
        return load_config(None, {**_overrides(run_cfg), "policy": POLICY, "train": {
            "group_size": G, "groups_per_env_runner": 1, "groups_per_batch": 1,
            "curriculum": list(curriculum), "iterations": iterations, "checkpoint_every": 2}})

    def metrics(run):
        return [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]

    run = train(cfg(4), scorer=scorer, log=lambda _: None)  # uninterrupted, for comparison
    straight, straight_policy = metrics(run), load(run / "train" / "policy").state_dict()
    shutil.rmtree(run / "train")

    train(cfg(3), scorer=scorer, log=lambda _: None)  # checkpoints at 2 and 3 (the last)
    assert latest_checkpoint(cfg(3)).name == "iter_000003"
    run = train(cfg(4), resume=True, scorer=scorer, log=lambda _: None)
    rows = metrics(run)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert [r["k"] for r in rows] == [4, 8, 8, 8]  # the curriculum continues after the resume
    assert all(r["reward_calls"] == 1 and -1 < r["reward_mean"] < 1 for r in rows)
    # the resumed run is the uninterrupted one: same questions, same sampled frames, same weights
    assert [r["reward_mean"] for r in rows] == [r["reward_mean"] for r in straight]
    policy = load(run / "train" / "policy")
    assert policy.cfg.d_model == POLICY["d_model"]
    for name, value in policy.state_dict().items():
        assert torch.equal(value, straight_policy[name]), name
    # a changed setting is not silently ignored: RLlib would resume with the checkpoint's
    changed = cfg(6, curriculum=([4, 6],))
    with pytest.raises(ConfigError, match=r"train.curriculum=\[\[4, 1\], \[8, 5\]\] \(the config "
                       r"now says \[\[4, 6\]\]\)"):
        train(changed, resume=True, scorer=scorer, log=lambda _: None)
    assert latest_checkpoint(cfg(4)).name == "iter_000004"  # nothing lost


def test_select_split_exports_the_best_checkpoint_on_val(run_cfg, scorer):
    """train.select_split scores each checkpoint's policy on val (at every curriculum K) and
    exports the best one; the last one stays in policy_last/."""
    from refocus_ray.policy import load
    from refocus_ray.train import train

    cfg = load_config(None, {**_overrides(run_cfg), "policy": POLICY, "train": {
        "group_size": G, "groups_per_env_runner": 1, "groups_per_batch": 1, "lr": 3e-3,
        "curriculum": [[4, 3], [8, 3]], "iterations": 6, "checkpoint_every": 1,
        "select_split": "val"}})
    run = train(cfg, scorer=scorer, log=lambda _: None) / "train"
    rows = [json.loads(line) for line in (run / "selection.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["split"] == "val" and r["n_questions"] == 1 and set(r) >= {"acc_k4", "acc_k8"}
               and r["score"] == (r["acc_k4"] + r["acc_k8"]) / 2 for r in rows)
    chosen = json.loads((run / "selection.json").read_text())["chosen"]
    assert chosen == max(rows, key=lambda r: (r["score"], r["margin_k4"] + r["margin_k8"]))
    exported = load(run / "policy").state_dict()
    best = load(run / "checkpoints" / f"iter_{chosen['iteration']:06d}" / "policy").state_dict()
    assert all(torch.equal(v, best[n]) for n, v in exported.items())
    last = load(run / "policy_last").state_dict()
    assert all(torch.equal(v, last[n]) for n, v in load(
        run / "checkpoints" / "iter_000006" / "policy").state_dict().items())


def test_env_name_survives_a_ray_restart():
    """RLlib finds the env by name in the current Ray cluster's registry, which a new cluster
    does not have: building the algorithm registers it again (seen: a driver that restarted Ray
    after importing the env failed with NameNotFound)."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import ray\n"
        "from ray.tune.registry import _global_registry, ENV_CREATOR\n"
        "import envs.frame_selection as fs\n"
        "from refocus_ray.config import load_config\n"
        "from refocus_ray.grpo import GRPOConfig\n"
        "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False); ray.shutdown()\n"
        "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "before = _global_registry.contains(ENV_CREATOR, fs.ENV_NAME)\n"
        "try:\n"
        "    GRPOConfig.from_run_config(load_config(None, {'run_dir': 'none'}))\n"
        "except Exception:\n"
        "    pass  # no data here: only the registration on the way matters\n"
        "print(before, _global_registry.contains(ENV_CREATOR, fs.ENV_NAME))\n"
        "ray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                         text=True, timeout=300, cwd=str(Path(__file__).resolve().parent.parent))
    assert out.stdout.split()[-2:] == ["False", "True"], out.stdout + out.stderr[-2000:]
