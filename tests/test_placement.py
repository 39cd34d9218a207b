"""Placement from config: the dry-run plan of configs/cluster.yaml, key-naming validation, the fit
check, the RLlib settings it produces, and (slow) reward actors really placed by label on a
two-node Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from refocus_ray.cli import main
from refocus_ray.config import ConfigError, build, load_config
from refocus_ray.placement import NodeKind, Role, fit, selector_matches
from refocus_ray.train import describe_resources

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "configs" / "cluster.yaml"


def test_cluster_config_dry_run_plan_matches_the_documented_gpu_layout(capsys):
    import ray

    was_running = ray.is_initialized()
    plan = describe_resources(load_config(CLUSTER))
    roles = plan["roles"]
    # 8 GPUs: 6 reward actors, 1 learner GPU, env runners on CPUs
    assert roles["reward_actor"]["count"] == 6
    assert roles["reward_actor"]["bundle"] == {"CPU": 4.0, "GPU": 1.0}
    assert roles["reward_actor"]["placement_group"] == "PACK"
    assert roles["learner"]["count"] == 1 and roles["learner"]["bundle"] == {"CPU": 8.0,
                                                                           "GPU": 1.0}
    assert roles["env_runner"]["count"] == 16 and roles["env_runner"]["bundle"] == {"CPU": 1.0}
    assert roles["driver"]["bundle"] == {"CPU": 1.0}
    assert plan["totals"] == {"CPU": 6 * 4 + 8 + 16 + 1.0, "GPU": 7.0}
    assert plan["batch"]["episodes"] == 64 * 16
    node = plan["cluster"]["nodes"][0]
    assert plan["cluster"]["fits"] and node["free"]["GPU"] == 1.0
    assert node["roles"] == {"reward_actor": 6, "learner": 1, "env_runner": 16, "driver": 1}
    assert ray.is_initialized() == was_running  # a dry run starts no Ray work

    # the CLI prints the same plan; a layout that does not fit exits 2 naming the role
    assert main(["train", "--config", str(CLUSTER), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["GPU"] == 7.0
    assert main(["train", "--config", str(CLUSTER), "--dry-run",
                 "--set", "reference.num_actors=8"]) == 2
    err = capsys.readouterr().err
    assert "reward_actor: only 7 of 8 bundles" in err and "'GPU': 1.0" in err


@pytest.mark.parametrize("key, value, message", [
    ("reference.placement_strategy", "BOTH", "reference.placement_strategy: must be one of"),
    ("reference.num_gpus_per_actor", 1.5, "reference.num_gpus_per_actor: fractional GPUs"),
    ("reference.label_selector", {"zone": "in(a"}, "reference.label_selector.zone: must be"),
    ("reference.resources", {"GPU": 1}, "reference.resources.GPU: set GPU with its own key"),
    ("train.num_gpus_per_learner", -1, "train.num_gpus_per_learner: must be >= 0"),
    ("train.env_runner_resources", {"rollout": "x"}, "train.env_runner_resources.rollout"),
    ("train.num_learners", -1, "train.num_learners: must be >= 0"),
    ("cluster.nodes", [{"name": "a", "gpus": 8}], "cluster.nodes[0].gpus: unknown key"),
    ("cluster.nodes", [{"count": 0}], "cluster.nodes[0].count: must be >= 1"),
    ("train.groups_per_batch", 8, "train.groups_per_batch: must be a multiple"),  # RLlib's check
    # the cluster's SigLIP features have no ImageNet head to bridge through
    ("policy.bridge_classes", 1000, "policy.bridge_classes: needs the efficientnet_lite0"),
])
def test_bad_placement_keys_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        describe_resources(load_config(CLUSTER, {key: value}))


def test_fit_honours_labels_custom_resources_and_group_strategies():
    nodes = [NodeKind("a100", 2, 32, 4, labels={"gpu": "a100"}),
             NodeKind("cpu", 1, 64, 0, resources={"rollout": 64})]
    actors = Role("reward_actor", 2, {"CPU": 4.0, "GPU": 1.0}, {"gpu": "a100"}, "STRICT_SPREAD")
    runners = Role("env_runner", 8, {"CPU": 1.0, "rollout": 1.0})
    res = fit([runners, actors], nodes)
    assert res["fits"], res["error"]
    by_node = {n["node"]: n["roles"] for n in res["nodes"]}
    assert by_node == {"a100-0": {"reward_actor": 1}, "a100-1": {"reward_actor": 1},
                       "cpu-0": {"env_runner": 8}}
    # three actors, one per node, on two labelled nodes: impossible
    res = fit([Role("reward_actor", 3, {"GPU": 1.0}, {"gpu": "a100"}, "STRICT_SPREAD")], nodes)
    assert not res["fits"] and "only 2 of 3" in res["error"]
    # STRICT_PACK needs one node with room for the whole group
    assert not fit([Role("reward_actor", 5, {"GPU": 1.0}, {}, "STRICT_PACK")], nodes)["fits"]
    assert fit([Role("reward_actor", 4, {"GPU": 1.0}, {}, "STRICT_PACK")], nodes)["fits"]
    # Ray's selector forms
    assert selector_matches({"gpu": "!in(t4, l4)"}, {"gpu": "a100"})
    assert not selector_matches({"gpu": "!a100"}, {"gpu": "a100"})
    assert selector_matches({"gpu": "in(h100,a100)"}, {"gpu": "a100"})
    assert not selector_matches({"gpu": "a100"}, {})


def test_placement_reaches_rllib_and_the_scorer_actor_options():
    from refocus_ray.grpo import GRPOConfig
    from refocus_ray.reward_pool import actor_options
    from refocus_ray.scoring import ReferenceConfig

    cfg = load_config(CLUSTER, {"train.env_runner_resources": {"rollout": 1},
                                "train.learner_resources": {"trainer": 1}})
    algo = GRPOConfig.from_run_config(cfg)
    assert algo.num_env_runners == 16 and algo.num_cpus_per_env_runner == 1
    assert algo.custom_resources_per_env_runner == {"rollout": 1}
    assert (algo.num_learners, algo.num_gpus_per_learner, algo.num_cpus_per_learner) == (1, 1, 8)
    assert algo.custom_resources_per_learner == {"trainer": 1}
    ref = build(ReferenceConfig, {**cfg.section("reference"), "placement_strategy": "",
                                  "label_selector": {"zone": "b"}}, "reference")
    opts = actor_options(ref)
    assert (opts["num_gpus"], opts["num_cpus"], opts["label_selector"]) == (1, 4, {"zone": "b"})


PLACED = textwrap.dedent("""
    import json, shutil, socket, sys, tempfile
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group_table
    from refocus_ray.forge import build_random_model
    from refocus_ray.reward_pool import RewardPool
    from refocus_ray.scoring import ReferenceConfig

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    if __name__ == "__main__":
        own = tempfile.mkdtemp(prefix="rp-", dir="/tmp")  # our own session dir and ports
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "labels": {"zone": "a"}, "include_dashboard": False,
            "dashboard_port": free_port(), "temp_dir": own})
        other = cluster.add_node(num_cpus=2, labels={"zone": "b"}, temp_dir=own)
        ray.init(address=cluster.address, log_to_driver=False)
        model = build_random_model("idefics3", tempfile.mkdtemp(dir="."))  # in tmp_path
        for strategy in sys.argv[1:]:  # "-" = no placement group
            cfg = ReferenceConfig(model=str(model), answer_mode="letter", max_model_len=2048,
                                  pool_name=f"test-placed{strategy}", label_selector={"zone": "b"},
                                  placement_strategy=strategy.strip("-"))
            pool = RewardPool.start(cfg)
            node = ray.get(pool.actors[0].ready.remote())["node_id"]
            table = placement_group_table(pool.group) if pool.group is not None else {}
            print(json.dumps({"node": node, "labelled": other.node_id,
                              "head": cluster.head_node.node_id,
                              "strategy": table.get("strategy"),
                              "bundles": list(table.get("bundles", {}).values())}), flush=True)
            pool.shutdown()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(own, ignore_errors=True)
""")


@pytest.mark.slow
@pytest.mark.vllm
def test_reward_actor_lands_on_the_labelled_node(tmp_path):
    """A real two-node Ray cluster (two raylets on 127.0.0.1): only node "b" carries the
    label, so the scorer actor (a real vLLM engine) must start there, without and then with a
    placement group (PACK)."""
    pytest.importorskip("vllm")
    script = tmp_path / "placed.py"
    script.write_text(PLACED)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, str(script), "-", "PACK"], env=env, cwd=tmp_path,
                         check=False, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    plain, grouped = [json.loads(line) for line in out.stdout.splitlines()
                      if line.startswith("{")]
    for res in (plain, grouped):
        assert res["node"] == res["labelled"] != res["head"]
    assert plain["strategy"] is None
    assert grouped["strategy"] == "PACK" and grouped["bundles"] == [{"CPU": 1.0}]


def test_a_bad_section_key_is_a_one_line_error_naming_it(tmp_path):
    """Sections validated when their stage starts (policy, train) still fail as a config error
    naming the key, not a traceback."""
    embedded = ROOT / "configs" / "embedded.yaml"
    for key, value in (("policy.bridge", "clip"), ("policy.backbone", "lstm")):
        with pytest.raises(SystemExit, match=rf"config error: {key}: must be one of"):
            main(["train", "--config", str(embedded), "--set", f"run_dir={tmp_path}",
                  "--set", f"{key}={value}", "--dry-run"])


def test_dry_run_checks_the_policy_bridge_size(tmp_path):
    embedded = ROOT / "configs" / "embedded.yaml"
    imagenet = {"run_dir": str(tmp_path), "policy.bridge": "imagenet"}
    with pytest.raises(ConfigError, match="policy.bridge_classes: the ImageNet bridge has 1000"):
        describe_resources(load_config(embedded, {**imagenet, "policy.bridge_classes": 10}))
    describe_resources(load_config(embedded, {**imagenet, "policy.bridge_classes": 1000}))
    # the reference bridge has one class per object and per footage of the benchmark's layout,
    # checked once the layout exists (before the data stage, training checks it at start)
    describe_resources(load_config(embedded, {"run_dir": str(tmp_path)}))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "layout.json").write_text(json.dumps({"videos": [
        {"background": "bikes", "segments": [{"object": "cat"}, {"object": "moon"}]},
        {"background": "carphone", "segments": [{"object": "cat"}]}]}))
    with pytest.raises(ConfigError, match=r"policy.bridge_classes: the reference bridge "
                                          r"\(objects \+ footage\) has 4 classes, got 18"):
        describe_resources(load_config(embedded, {"run_dir": str(tmp_path)}))
    describe_resources(load_config(embedded, {"run_dir": str(tmp_path),
                                              "policy.bridge_classes": 4}))
