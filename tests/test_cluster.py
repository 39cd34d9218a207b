"""A real multi-node Ray cluster on one machine: work spreads over nodes and training survives
losing a reward node, an env runner and the driver.

`ray.cluster_utils.Cluster` starts one raylet per node on 127.0.0.1, each with its own CPUs and
custom resources (layout in `cluster`). Rewards come from a real vLLM engine on the random
plumbing VLM (conftest); the learner is RLlib; the data are conftest's real clips and features.
Every fault is real: a node's processes are SIGKILLed (`Cluster.remove_node`), an env runner
process is SIGKILLed (synchronous and asynchronous sampling), the training driver (a `refocus
train` subprocess) is SIGKILLed. Each test prints its figure (`[reliability] ...`, run with -s);
docs/reliability.md records them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import LOCAL_RAY, free_port
from test_async_sampling import CollectedRounds, assert_whole_groups

from refocus_ray.config import Config, load_config

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
G = 4  # group size
POLICY = {"d_model": 32, "n_heads": 2, "n_layers": 1}


def _wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.1):
    """Poll until `predicate()` is truthy; fail (never hang) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)
    return value


@pytest.fixture(scope="module")
def cluster():
    """Four raylets on 127.0.0.1, one CPU each (so a 1-CPU task or actor owns its node):

        head      1 CPU                     the driver (this process); data tasks, env runners
        worker    1 CPU                     data tasks, env runners
        reward-1  1 CPU + {"reward": 1}     where the reward actor starts ("a GPU node")
        reward-2  1 CPU + {"reward": 1}     where it must move when reward-1 is lost

    A local Ray instance of an earlier module is shut down first and restarted afterwards.
    """
    import ray
    from ray.cluster_utils import Cluster

    was_local = ray.is_initialized()
    ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths live in it
    os.makedirs(f"{tmp}/ray")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp  # Ray's default temp dir (and address file) for this module
    node = {"node_ip_address": "127.0.0.1"}
    c = Cluster(initialize_head=True, head_node_args={
        **node, "num_cpus": 1, "include_dashboard": False, "dashboard_port": free_port(),
        "dashboard_agent_listen_port": free_port()})
    c.names = {c.head_node.node_id: "head"}
    for name, res in [("worker", {}), ("reward-1", {"reward": 1}), ("reward-2", {"reward": 1})]:
        c.names[c.add_node(**node, num_cpus=1, resources=res).node_id] = name
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(tmp, ignore_errors=True)
        if was_local:
            ray.init(**LOCAL_RAY)


@pytest.fixture(scope="module")
def reward_pool(cluster, plumbing_reference):
    """One scorer actor that needs {"reward": 1}: it starts on reward-1 or reward-2. Its 1 s
    batching window keeps every reward call in flight long enough to lose a node under it."""
    pytest.importorskip("vllm")
    from refocus_ray.reward_pool import RewardPool
    from refocus_ray.scoring import ReferenceConfig

    pool = RewardPool.start(ReferenceConfig(**{
        **plumbing_reference, "pool_name": "test-cluster-scorer", "resources": {"reward": 1.0},
        "max_wait_ms": 1000.0}))
    yield pool
    pool.shutdown()


def _actor_info(pool) -> dict:
    import ray

    return ray.get(pool.actors[0].ready.remote())


def _run_config(run_cfg: Config, d: Path, **sections) -> Path:
    """A config file for a new run dir holding a copy of run_cfg's feature cache."""
    from refocus_ray.features import features_dir

    shutil.copytree(features_dir(run_cfg), d / "run" / "features")
    raw = {**run_cfg.to_dict(), "run_dir": str(d / "run"), "policy": POLICY, **sections}
    (d / "run.yaml").write_text(yaml.safe_dump(raw))
    return d / "run.yaml"


def _train_section(**kw) -> dict:
    return {"group_size": G, "groups_per_env_runner": 1, "groups_per_batch": 1,
            "curriculum": [[4, 100]], "lr": 1e-3, "seed": 0, **kw}


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "train" / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------ Ray Data prepare


def test_prepare_runs_tasks_on_several_nodes(cluster, clip_dir, tmp_path):
    from refocus_ray import features

    rows = [{"question_id": f"q-{name}", "video_id": name,
             "video_path": str(clip_dir / f"{name}.mp4"), "question": "What is shown?",
             "options": ["bikes", "cars"], "answer": 0, "split": "train"}
            for name in ["short", "mid", "long", "truncated", "notes"]]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, {"run_dir": str(tmp_path / "run"), "data.kind": "table",
                             "data.table": str(tmp_path / "qa.jsonl"),
                             "encoders.frame_size": 64, "pool.max_frames": 16})
    s = features.prepare_frames(cfg, progress=False)
    assert (s.decoded, len(s.failed)) == (3, 2)  # the two broken files are reported, not fatal
    decode, encode = s.nodes["decode"], s.nodes["encode"]
    print(f"\n[reliability] prepare: decode tasks per node "
          f"{ {cluster.names[n]: c for n, c in decode.items()} }, encoder per node "
          f"{ {cluster.names[n]: c for n, c in encode.items()} }")
    assert sum(decode.values()) == sum(encode.values()) == 5  # every video, each once
    # the encoder actor holds its node's only CPU: decoding runs elsewhere meanwhile
    assert len(set(decode) | set(encode)) >= 2
    assert len(features.load_pools(cfg)) == 3


# ------------------------------------------------------------------------ reward node lost


def _crash(cluster, node) -> None:
    """Lose `node` as a machine crash does: SIGKILL every process it ran at once. Its worker
    processes (the actor's) go first: `Cluster.remove_node` kills the raylet and its services,
    and workers that outlive their raylet for a moment could still answer calls."""
    import psutil
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    for p in psutil.Process(raylet).children(recursive=True):
        p.kill()
    cluster.remove_node(node, allow_graceful=False)


class NodeLossScorer:
    """Fault injection (a test double around the real reward pool): on reward call `at` it
    removes the node hosting the scorer actor while that call's requests are in flight, then
    waits for the answers like any caller. Counts requests sent and answers received."""

    def __init__(self, pool, cluster, at: int) -> None:
        self.pool, self.cluster, self.at = pool, cluster, at
        self.calls = self.sent = self.answered = 0
        self.before = _actor_info(pool)
        self.inflight, self.after, self.recover_s, self.retried = 0, {}, 0.0, -1

    def score(self, requests):
        import ray

        self.calls += 1
        self.sent += len(requests)
        pending = self.pool.submit(requests)
        if self.calls == self.at:
            refs = [ref for _, ref in pending]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            self.inflight = len(requests) if not ready else 0
            node = next(n for n in self.cluster.worker_nodes
                        if n.node_id == self.before["node_id"])
            t0 = time.perf_counter()
            _crash(self.cluster, node)
        z = self.pool.gather(pending, len(requests))
        if self.calls == self.at:
            self.recover_s = time.perf_counter() - t0
            self.after = _actor_info(self.pool)
            self.retried = ray.get(self.pool.actors[0].get_stats.remote())["requests"]
        self.answered += sum(len(v) > 0 for v in z)
        return z


@pytest.mark.vllm
def test_losing_the_reward_node_mid_training(cluster, reward_pool, run_cfg, tmp_path):
    import psutil

    from refocus_ray.train import latest_checkpoint, train

    path = _run_config(run_cfg, tmp_path, train=_train_section(
        groups_per_env_runner=2, groups_per_batch=2, iterations=3, checkpoint_every=2))
    cfg = load_config(path)
    fault = NodeLossScorer(reward_pool, cluster, at=2)  # iteration 2's reward call
    home = cluster.names[fault.before["node_id"]]
    assert home in ("reward-1", "reward-2")
    train(cfg, scorer=fault, log=lambda _: None)

    rows = _metrics(cfg.run_path)
    episodes = 2 * G  # per iteration: 2 groups of G
    new_home = cluster.names.get(fault.after["node_id"])
    print(f"\n[reliability] reward node lost in iteration 2: actor {home} -> {new_home}, "
          f"{fault.inflight} in-flight requests retried, answered {fault.answered}/{fault.sent}"
          f", episodes lost {3 * episodes - sum(r['groups'] * G for r in rows)}, iterations "
          f"lost {3 - len(rows)}, recovered in {fault.recover_s:.1f} s (engine restart)")
    # the actor lives on the other reward node now, restarted by Ray
    assert not psutil.pid_exists(fault.before["pid"])
    assert fault.after["restarted"] and new_home in ("reward-1", "reward-2") and new_home != home
    assert reward_pool.metrics()["restarts"] >= 1  # what a pool-driven run logs per iteration
    # the requests in flight when the node died reached the new actor once each, were answered
    assert fault.inflight == episodes and fault.retried == episodes
    # no episode silently dropped or scored twice
    assert fault.sent == fault.answered == 3 * episodes
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert all(r["groups"] == 2 and r["reward_requests"] == episodes for r in rows)
    # training went on to the next checkpoint and the end
    assert (cfg.run_path / "train" / "checkpoints" / "iter_000002" / "DONE").exists()
    assert latest_checkpoint(cfg).name == "iter_000003"


# ------------------------------------------------------------------------- env runner lost


def _fault_at_sample(group, worker_index: int, call: int, marker: Path,
                       hang: bool = False) -> None:
    """Fault injection: env runner `worker_index` SIGKILLs its own process (or, `hang`, sleeps
    for an hour: alive but stuck) when its `call`-th `sample()` starts (its round launched and
    in flight, none of its episodes returned), after writing the wall time to `marker`. The
    process Ray restarts in its place runs unarmed. (An outside killer timed by reward
    requests raced the round: under load the runner could finish it before the kill landed.)"""

    def arm(runner) -> None:
        sample, calls = runner.sample, []

        def sample_or_die(*args, **kwargs):
            calls.append(None)
            if len(calls) == call:
                marker.write_text(repr(time.time()))
                if hang:
                    time.sleep(3600)
                os.kill(os.getpid(), signal.SIGKILL)
            return sample(*args, **kwargs)

        runner.sample = sample_or_die

    group.foreach_env_runner(arm, local_env_runner=False, remote_worker_ids=[worker_index])


@pytest.mark.vllm
@pytest.mark.parametrize("async_sampling", [False, True], ids=["sync", "async"])
def test_killed_env_runner_is_replaced_and_training_continues(reward_pool, run_cfg, tmp_path,
                                                              async_sampling):
    """Runner 1 of 2 dies as its second round starts: synchronous, inside iteration 2; async,
    while the driver learns on iteration 1 (iteration 2's rounds were launched before that)."""
    from refocus_ray.grpo import GRPOConfig

    path = _run_config(run_cfg, tmp_path, reference={"pool_name": reward_pool.cfg.pool_name},
                       train=_train_section(num_env_runners=2, groups_per_batch=2,
                                            async_sampling=async_sampling))
    algo = GRPOConfig.from_run_config(load_config(path)).build_algo()
    group = algo.env_runner_group
    rounds = CollectedRounds(group)

    def runners() -> dict[int, int]:
        return dict(group.foreach_env_runner(lambda r: (r.worker_index, os.getpid()),
                                             local_env_runner=False))

    try:
        before = runners()
        assert sorted(before) == [1, 2]
        marker = tmp_path / "killed"
        _fault_at_sample(group, worker_index=1, call=2, marker=marker)
        # train until >= 2 iterations began after the kill and the batch is whole again: RLlib
        # marks runner 1 unhealthy, Ray restarts its process, the first iteration that finds
        # it up restores it; training goes on meanwhile
        results, groups, started_after, recover_s = [], [], [], None
        deadline = time.monotonic() + 300
        while sum(started_after) < 2 or groups[-1] < 2:
            assert time.monotonic() < deadline, f"not recovered in 300 s: groups {groups}"
            started_after.append(marker.exists())
            results.append(algo.train())
            groups.append(int(results[-1]["grpo"]["groups"]))
            # every trained group whole: G finished episodes, none from the dropped round
            assert assert_whole_groups(rounds.take(), G) == groups[-1]
            if recover_s is None and 1 in groups and groups[-1] == 2:
                recover_s = time.time() - float(marker.read_text())
        after = runners()
        healthy = [r["fault_tolerance"]["num_healthy_workers"] for r in results]
        mode = "async" if async_sampling else "sync"
        print(f"\n[reliability] env runner killed with a round in flight ({mode}): groups per "
              f"iteration {groups} (2 expected), healthy runners {healthy}: rounds lost "
              f"{rounds.lost()}, episodes lost {rounds.lost() * G}, then "
              f"{groups.count(1) - rounds.lost()} iteration(s) on 1 runner while it restarted; "
              f"iterations lost 0; back to 2 runners in {recover_s:.1f} s")
        # only the dead runner's in-flight round was dropped; the other runner's group trained
        assert rounds.lost() == 1 and groups[:2] == [2, 1]
        assert groups[1:] == sorted(groups[1:]) and groups[-1] == 2
        assert algo.training_iteration == len(results) >= 3
        # the metrics show the runner count dropping and restored
        assert healthy[0] == 2 and min(healthy) == 1 and healthy[-1] == 2
        assert results[-1]["fault_tolerance"]["num_remote_worker_restarts"] >= 1
        assert group.num_healthy_remote_workers() == 2
        assert sorted(after) == [1, 2] and after[1] != before[1] and after[2] == before[2]
        # the replacement samples with the learner's current weights (async: this call queues
        # behind its in-flight round and the weight push that follows it)
        learner = algo.learner_group.get_weights()["default_policy"]
        runner = group.foreach_env_runner(lambda r: r.module.get_state(inference_only=True),
                                          local_env_runner=False, remote_worker_ids=[1])[0]
        assert runner.keys() <= learner.keys()
        for k, v in runner.items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(learner[k]), err_msg=k)
    finally:
        algo.stop()


@pytest.mark.vllm
def test_stuck_env_runner_is_an_error_not_a_hang(reward_pool, run_cfg, tmp_path):
    """A runner alive but stuck mid-round: training stops with an error naming
    train.sample_timeout_s instead of waiting forever."""
    from refocus_ray.grpo import GRPOConfig

    path = _run_config(run_cfg, tmp_path, reference={"pool_name": reward_pool.cfg.pool_name},
                       train=_train_section(num_env_runners=1, sample_timeout_s=5))
    algo = GRPOConfig.from_run_config(load_config(path)).build_algo()
    group = algo.env_runner_group
    pid = group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False)[0]
    try:
        # stuck from its first round: a legitimately slow round on a loaded machine cannot
        # trip the 5 s timeout before the fault does
        _fault_at_sample(group, worker_index=1, call=1, marker=tmp_path / "stuck", hang=True)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="sample_timeout_s"):
            algo.train()
        assert time.monotonic() - t0 < 60
    finally:
        os.kill(pid, signal.SIGKILL)  # the stuck process would block a graceful stop
        algo.stop()


# ------------------------------------------------------------------------------ driver lost


def _refocus(args: list[str], log: Path, cluster) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    return subprocess.Popen([sys.executable, "-m", "refocus_ray.cli", *args], cwd=PROJECT_ROOT,
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.mark.vllm
def test_killed_driver_resumes_from_its_last_checkpoint(cluster, plumbing_reference, run_cfg,
                                                        tmp_path):
    iterations = 4
    path = _run_config(run_cfg, tmp_path, train=_train_section(iterations=iterations,
                                                               checkpoint_every=1),
                       reference={**plumbing_reference, "pool_name": "test-cluster-driver"})
    run = load_config(path).run_path
    first = _refocus(["train", "--config", str(path)], tmp_path / "first.log", cluster)
    try:
        ckpt = run / "train" / "checkpoints" / "iter_000001" / "DONE"
        _wait_for(lambda: ckpt.exists() or first.poll() is not None, 300, "the first checkpoint",
                  poll_s=0.05)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        first.send_signal(signal.SIGKILL)
        t_kill = time.perf_counter()
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    done_before = len(_metrics(run))
    last = max(int(p.parent.name[5:]) for p in run.glob("train/checkpoints/iter_*/DONE"))
    assert last < iterations  # killed before the end

    second = _refocus(["train", "--config", str(path), "--resume"], tmp_path / "second.log",
                      cluster)
    try:
        _wait_for(lambda: len(_metrics(run)) > last and _metrics(run)[-1]["iteration"] > last
                  or second.poll() is not None, 300, "the first resumed iteration", poll_s=0.2)
        recover_s = time.perf_counter() - t_kill
        assert second.wait(300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        if second.poll() is None:
            second.kill()
    log = (tmp_path / "second.log").read_text()
    rows = _metrics(run)
    print(f"\n[reliability] driver SIGKILLed after its checkpoint at iteration {last}: "
          f"iterations lost {done_before - last}, episodes lost {(done_before - last) * G}, "
          f"first resumed iteration {recover_s:.1f} s after the kill (new driver + reward "
          f"engine start)")
    assert f"resumed at iteration {last}" in log
    assert [r["iteration"] for r in rows] == list(range(1, iterations + 1))
    # each iteration logs the reward pool's figures (the resumed run's pool counts anew)
    assert all(r["reward_pool_requests"] > 0 and r["reward_pool_restarts"] == 0
               and 0 <= r["reward_pool_cache_hit_rate"] <= 1 and r["reward_pool_p95_ms"] > 0
               for r in rows)
    assert (run / "train" / "policy" / "model.safetensors").exists()
    assert (run / "train" / "heldout.json").exists()
