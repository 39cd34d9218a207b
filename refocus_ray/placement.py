"""Where a training job's roles run: resource specs from config, the plan, and a fit check.

Roles and where their resource specs live in a run config:

    reward actors   ``reference:``  num_actors, num_cpus_per_actor, num_gpus_per_actor, resources,
                                    label_selector, placement_strategy (a placement group)
    env runners     ``train:``      num_env_runners, num_cpus_per_env_runner,
                                    num_gpus_per_env_runner, env_runner_resources
    learner         ``train:``      num_learners (0 = inside the driver), num_cpus_per_learner,
                                    num_gpus_per_learner, learner_resources
    driver          ``cluster:``    driver_cpus (placed by ``ray job submit --entrypoint-num-*``)

``cluster.nodes`` optionally declares the cluster's node kinds; ``refocus train --dry-run`` then
checks that every bundle fits (label selectors, custom resources and the reward actors'
placement-group strategy included) without starting Ray. The check is a first-fit model of
Ray's scheduler, good for catching impossible layouts, not a promise of Ray's exact choice.

RLlib 2.60 takes custom resources for env runners and learners but no label selectors; pin
them to node kinds with a custom resource (``ray start --resources='{"rollout": 64}'``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from refocus_ray.config import Config, ConfigError, build

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
RESERVED = ("CPU", "GPU", "memory", "object_store_memory")  # have their own keys
_SELECTOR = re.compile(r"^!?(in\((?P<set>[^()]*)\)|(?P<one>[^(),!][^(),]*))$")


# ------------------------------------------------------------------------- validation


def check_amounts(key: str, **amounts: float) -> None:
    """CPU/GPU amounts: >= 0; GPUs above 1 must be whole (Ray's rule)."""
    for name, v in amounts.items():
        if v < 0:
            raise ConfigError(f"{key}.{name}: must be >= 0, got {v!r}")
        if "gpus" in name and v > 1 and v != int(v):
            raise ConfigError(f"{key}.{name}: fractional GPUs must be <= 1, got {v!r}")


def check_custom(key: str, resources: dict[str, Any]) -> None:
    """Custom resources: name -> amount >= 0; CPU/GPU/memory have their own keys."""
    for name, v in resources.items():
        if name in RESERVED:
            raise ConfigError(f"{key}.{name}: set {name} with its own key, not as a custom "
                              "resource")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{key}.{name}: must be a number >= 0, got {v!r}")


def check_label_selector(key: str, selector: dict[str, Any]) -> None:
    """Ray label selectors: ``value``, ``!value``, ``in(a,b)``, ``!in(a,b)``."""
    for name, v in selector.items():
        if not isinstance(v, str) or not _SELECTOR.match(v.strip()):
            raise ConfigError(f"{key}.{name}: must be 'value', '!value', 'in(a,b)' or "
                              f"'!in(a,b)', got {v!r}")


def check_strategy(key: str, strategy: str) -> None:
    if strategy and strategy not in STRATEGIES:
        raise ConfigError(f"{key}: must be one of {list(STRATEGIES)} or '' (no placement "
                          f"group), got {strategy!r}")


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Does a node with `labels` satisfy `selector` (Ray's semantics for the four forms)."""
    for name, expr in selector.items():
        expr = expr.strip()
        negate = expr.startswith("!")
        m = _SELECTOR.match(expr)
        values = ({s.strip() for s in m["set"].split(",")} if m and m["set"] is not None
                  else {expr.lstrip("!")})
        hit = labels.get(name) in values
        if hit == negate:
            return False
    return True


# ------------------------------------------------------------------------------ config


@dataclass
class NodeKind:
    """One kind of node of the cluster (``cluster.nodes`` entry)."""

    name: str = "node"
    count: int = 1
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def check(self, key: str) -> None:
        if self.count < 1:
            raise ConfigError(f"{key}.count: must be >= 1, got {self.count}")
        check_amounts(key, num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        check_custom(f"{key}.resources", self.resources)
        for k, v in self.labels.items():
            if not isinstance(v, str):
                raise ConfigError(f"{key}.labels.{k}: must be a string, got {v!r}")


@dataclass
class ClusterConfig:
    """The ``cluster:`` section: the driver's CPUs and, optionally, the node kinds."""

    driver_cpus: float = 1.0
    nodes: list = field(default_factory=list)  # of NodeKind mappings

    def check(self, key: str) -> None:
        check_amounts(key, driver_cpus=self.driver_cpus)
        self.nodes = [n if isinstance(n, NodeKind) else build(NodeKind, n, f"{key}.nodes[{i}]")
                      for i, n in enumerate(self.nodes)]


# -------------------------------------------------------------------------------- plan


@dataclass
class Role:
    """`count` identical bundles of one role."""

    name: str
    count: int
    bundle: dict[str, float]
    label_selector: dict[str, str] = field(default_factory=dict)
    strategy: str = ""  # placement-group strategy over this role's bundles; "" = none
    where: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"count": self.count, "bundle": self.bundle}
        if self.label_selector:
            d["label_selector"] = self.label_selector
        d["placement_group"] = self.strategy or None
        if self.where:
            d["where"] = self.where
        return d


def bundle(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
    """A Ray resource bundle; zero amounts left out."""
    out = {"CPU": float(cpus), "GPU": float(gpus), **{k: float(v) for k, v in custom.items()}}
    return {k: v for k, v in out.items() if v}


def roles(cfg: Config) -> list[Role]:
    """The roles a training job of `cfg` requests (validates the sections it reads)."""
    from refocus_ray.grpo import TrainConfig
    from refocus_ray.scoring import ReferenceConfig

    t: TrainConfig = build(TrainConfig, cfg.section("train"), "train")
    ref: ReferenceConfig = build(ReferenceConfig, cfg.section("reference"), "reference")
    cl: ClusterConfig = build(ClusterConfig, cfg.section("cluster"), "cluster")
    local_learner = t.num_learners == 0
    out = [
        Role("reward_actor", ref.num_actors,
             bundle(ref.num_cpus_per_actor, ref.num_gpus_per_actor, ref.resources),
             dict(ref.label_selector), ref.placement_strategy,
             f"vLLM engine ({ref.backend}, {ref.model}) in a Ray actor"),
        Role("driver", 1,
             bundle(max(cl.driver_cpus, t.num_cpus_per_learner if local_learner else 0),
                    t.num_gpus_per_learner if local_learner else 0, {}),
             where="the job's entry point" + (" holding the learner" if local_learner else "")
             + "; placed by `ray job submit --entrypoint-num-cpus/--entrypoint-num-gpus`"),
    ]
    if t.num_learners:
        out.append(Role("learner", t.num_learners,
                        bundle(t.num_cpus_per_learner, t.num_gpus_per_learner,
                               t.learner_resources), where="RLlib learner actor"))
    if t.num_env_runners:
        out.append(Role("env_runner", t.num_env_runners,
                        bundle(t.num_cpus_per_env_runner, t.num_gpus_per_env_runner,
                               t.env_runner_resources),
                        where=f"RLlib env runner: {t.group_size * t.groups_per_env_runner} "
                        f"episodes in flight ({t.groups_per_env_runner} groups of "
                        f"{t.group_size})"))
    else:
        out[1].where += "; sampling runs in the driver too (train.num_env_runners = 0)"
    return out


def fit(roles_: list[Role], nodes: list[NodeKind]) -> dict[str, Any]:
    """Place every bundle on the declared nodes (first fit; the biggest, most constrained
    roles first). Returns {"fits", "nodes": per-node roles and free resources, "error"}."""
    free = [{"name": f"{n.name}-{i}", "labels": n.labels,
             "free": {"CPU": n.num_cpus, "GPU": n.num_gpus, **n.resources}, "roles": {}}
            for n in nodes for i in range(n.count)]

    def fits(node: dict, b: dict[str, float], sel: dict[str, str]) -> bool:
        return selector_matches(sel, node["labels"]) and all(
            node["free"].get(k, 0.0) + 1e-9 >= v for k, v in b.items())

    def take(node: dict, role: Role) -> None:
        for k, v in role.bundle.items():
            node["free"][k] -= v
        node["roles"][role.name] = node["roles"].get(role.name, 0) + 1

    order = sorted(roles_, key=lambda r: (-r.bundle.get("GPU", 0), -bool(r.label_selector),
                                          -r.bundle.get("CPU", 0)))
    error = None
    for role in order:
        placed: list[dict] = []
        if role.strategy == "STRICT_PACK":  # one node must hold the whole group
            whole = {k: v * role.count for k, v in role.bundle.items()}
            node = next((n for n in free if fits(n, whole, role.label_selector)), None)
            placed = [node] * role.count if node is not None else []
            for n in placed:
                take(n, role)
        else:
            for _ in range(role.count):
                pool = [n for n in free if fits(n, role.bundle, role.label_selector) and not (
                    role.strategy == "STRICT_SPREAD" and any(n is p for p in placed))]
                if role.strategy in ("SPREAD", "STRICT_SPREAD"):  # fewest of this role first
                    pool.sort(key=lambda n: n["roles"].get(role.name, 0))
                if not pool:
                    break
                take(pool[0], role)
                placed.append(pool[0])
        if len(placed) < role.count:
            short = {k: v for k, v in role.bundle.items()
                     if not any(n["free"].get(k, 0.0) + 1e-9 >= v for n in free)}
            error = (f"{role.name}: only {len(placed)} of {role.count} bundles {role.bundle} "
                     f"fit (placement group: {role.strategy or 'none'}"
                     f"{'; label selector ' + str(role.label_selector) if role.label_selector else ''})"
                     + (f"; no node has {short} left" if short else ""))
            break
    nodes_out = [{"node": n["name"], "roles": {k: v for k, v in n["roles"].items() if v},
                  "free": {k: round(v, 3) for k, v in n["free"].items()}} for n in free]
    return {"fits": error is None, "nodes": nodes_out, "error": error}


def plan(cfg: Config) -> dict[str, Any]:
    """What a training job of `cfg` would request from Ray, per role and in total, and (with
    ``cluster.nodes``) whether and where it fits. Starts nothing."""
    rs = roles(cfg)
    totals: dict[str, float] = {}
    for r in rs:
        for k, v in r.bundle.items():
            totals[k] = totals.get(k, 0.0) + v * r.count
    out: dict[str, Any] = {"roles": {r.name: r.to_dict() for r in rs}, "totals": totals}
    nodes = build(ClusterConfig, cfg.section("cluster"), "cluster").nodes
    if nodes:
        have: dict[str, float] = {}
        for n in nodes:
            for k, v in {"CPU": n.num_cpus, "GPU": n.num_gpus, **n.resources}.items():
                have[k] = have.get(k, 0.0) + v * n.count
        out["cluster"] = {"totals": have, **fit(rs, nodes)}
    return out
