"""Rollout scaling: episodes/s and reward requests/s for 1-2 reward actors x 1-2 env runners.

How to run (after `refocus prepare` has cached the embedded pools):
    nice -n 15 .venv/bin/python bench/rollout_scaling.py --json out.json --png out.png
    nice -n 15 .venv/bin/python bench/rollout_scaling.py --layouts 1x1m8,2x2,2x1,1x2,1x1
    nice -n 15 .venv/bin/python bench/rollout_scaling.py --layouts 1x1,2x2 --async --iterations 6

Workload: real GRPO iterations of the embedded config (configs/embedded.yaml: its cached pools
and query features, the Transformer selector), K = 4, groups of G = 8, 8 groups (64 episodes)
per iteration, env runners as RLlib remote actors calling the reward pool (vLLM scorer actors).
Reference model: the forged Idefics3 at <run_dir>/forge/checkpoint if it exists, else a
random-init Idefics3 from `forge.build_random_model` (the output says which; a random model's
per-request cost is similar, its rewards are meaningless). One pool of 2 scorer actors is
started once (1 CPU each, not pinned unless --pin); a layout with 1 reward actor routes to the
first only.

Per layout (reward actors x env runners), after one warm-up iteration:
  * episodes/s and reward requests/s over the measured iterations (wall time per iteration),
    and episodes/s of the fastest iteration (the least disturbed by other jobs);
  * the iteration's time split: rollouts (the learner waits), learning, weight sync; and each
    env runner's sampling time split into policy inference, waiting for rewards and the rest
    (env stepping, RLlib connectors), from the metrics training writes to metrics.jsonl;
  * the per-request cost inside the scorer actors: queue wait (incl. the batching window),
    frame fetch (decord decode on a cache miss), engine call (processor + prefill);
  * evidence that nothing serialises: runner overlap = sum of runners' sampling time / rollout
    wall time (~2 when two runners sample at once, 1 when they take turns) and the share of
    requests the busiest actor took (0.5 = even split over 2 actors).
Then the "larger groups per request" variant 1x1m8: 1 actor x 1 runner with all 8 groups in
one sampling round (one reward call of 64 requests instead of two of 32). The load on a shared
machine drifts during a run: run the layouts in both orders (--layouts) and compare.
`--async` measures each layout twice in a row, synchronous then with `train.async_sampling`
(a layout `AxRa` is async alone): the env runners sample iteration i + 1 while the learner
learns on i, so the learner's waiting (`learner_wait_frac`: the driver's wait for rollouts over
the iteration) should drop; printed: the async / sync ratio of episodes/s and both wait shares.
*runner busy* = each runner's sampling time over the iteration's wall time (1 = never idle);
in async rows *runner overlap* (sampling over the driver's wait) is not a concurrency measure.
Two cores cannot show speed-up from more actors or runners; the point is the breakdown. The
machine is shared: the 1-minute load average is recorded per layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `envs` (and Ray workers, which get the driver's sys.path)
for k, v in {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
             "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "RAY_USAGE_STATS_ENABLED": "0",
             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}.items():
    os.environ.setdefault(k, v)

G, GROUPS, K = 8, 8, 4  # group size, groups per iteration, frames per episode


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_model(cfg) -> tuple[str, str, str]:
    """(model dir, answer mode, description): the forged checkpoint, else a random Idefics3."""
    from refocus_ray.pipeline import forge_checkpoint

    ckpt = forge_checkpoint(cfg)
    if (ckpt / "config.json").exists():
        return str(ckpt.resolve()), "content", f"forged Idefics3 at {ckpt}"
    from refocus_ray.forge import build_random_model

    d = build_random_model("idefics3", tempfile.mkdtemp(prefix="scaling-vlm-"))
    return str(d), "letter", f"random-init Idefics3 (no forged checkpoint at {ckpt})"


def run_layout(cfg_path: str, reference: dict, actors: int, runners: int, groups_per_runner: int,
               iterations: int, seed: int, pool, async_sampling: bool = False) -> dict[str, Any]:
    """Warm-up + `iterations` GRPO iterations of one layout; figures from metrics and pool."""
    from refocus_ray.config import load_config
    from refocus_ray.grpo import GRPOConfig
    from refocus_ray.train import metrics_row

    cfg = load_config(cfg_path, {
        "reference": {**reference, "num_actors": actors},
        "train.num_env_runners": runners, "train.group_size": G,
        "train.groups_per_env_runner": groups_per_runner, "train.groups_per_batch": GROUPS,
        "train.curriculum": [[K, 10_000]], "train.seed": seed, "train.options_dropout": 0.0,
        "train.async_sampling": async_sampling,
    })
    algo = GRPOConfig.from_run_config(cfg).build_algo()
    try:
        algo.train()  # warm-up: env runners attach to the pool, first plans, first update
        before = pool.stats()
        rows, load = [], os.getloadavg()[0]
        for _ in range(iterations):
            t0 = time.perf_counter()
            row = metrics_row(algo.train())
            row["time_iteration_s"] = time.perf_counter() - t0
            rows.append(row)
        after = pool.stats()
    finally:
        algo.stop()
    out = summarise(rows, before, after, actors, runners, groups_per_runner, load)
    return {**out, "async": async_sampling,
            "layout": out["layout"] + (" async" if async_sampling else "")}


def summarise(rows: list[dict], before: list[dict], after: list[dict], actors: int,
              runners: int, groups_per_runner: int, load: float) -> dict[str, Any]:
    def tot(key: str) -> float:
        return sum(r[key] for r in rows)

    wall = tot("time_iteration_s")
    delta = [{k: a[k] - b[k] for k in ("scored", "queue_wait_s", "fetch_s", "engine_s",
                                        "engine_calls", "requests", "frames_decoded")}
             for a, b in zip(after, before)]
    scored = max(sum(d["scored"] for d in delta), 1)
    served = [d["requests"] for d in delta[:actors]]
    n = len(rows)
    return {
        "layout": f"{actors}x{runners}", "reward_actors": actors, "env_runners": runners,
        "groups_per_request": groups_per_runner, "iterations": n, "load_1min": round(load, 2),
        "episodes_per_s": tot("groups") * G / wall,
        # the least disturbed iteration (the machine is shared)
        "episodes_per_s_best": max(r["groups"] * G / r["time_iteration_s"] for r in rows),
        "reward_requests_per_s": tot("reward_requests") / wall,
        "iteration_s": wall / n,
        # the iteration (driver / learner view), mean seconds
        "rollout_s": tot("time_rollout_s") / n, "learn_s": tot("time_learn_s") / n,
        "sync_s": tot("time_sync_s") / n,
        "learner_wait_frac": tot("time_rollout_s") / max(tot("time_rollout_s")
                                                         + tot("time_learn_s")
                                                         + tot("time_sync_s"), 1e-9),
        # env-runner view, mean seconds per runner and iteration
        "runner_sample_s": tot("time_sample_s") / n / runners,
        "runner_policy_s": tot("time_policy_s") / n / runners,
        "runner_reward_wait_s": tot("time_reward_wait_s") / n / runners,
        "runner_other_s": (tot("time_sample_s") - tot("time_policy_s")
                           - tot("time_reward_wait_s")) / n / runners,
        "reward_wait_frac": tot("time_reward_wait_s") / max(tot("time_sample_s"), 1e-9),
        "runner_overlap": tot("time_sample_s") / max(tot("time_rollout_s"), 1e-9),
        "runner_busy": tot("time_sample_s") / runners / wall,
        "reward_calls_per_iteration": tot("reward_calls") / n,
        "requests_per_call": tot("reward_requests") / max(tot("reward_calls"), 1),
        "client_wait_ms_per_call": 1e3 * tot("time_reward_wait_s") / max(tot("reward_calls"), 1),
        # inside the scorer actors, per scored request
        "queue_wait_ms": 1e3 * sum(d["queue_wait_s"] for d in delta) / scored,
        "fetch_ms": 1e3 * sum(d["fetch_s"] for d in delta) / scored,
        "engine_ms": 1e3 * sum(d["engine_s"] for d in delta) / scored,
        "mean_engine_batch": scored / max(sum(d["engine_calls"] for d in delta), 1),
        "frames_decoded_per_request": sum(d["frames_decoded"] for d in delta) / scored,
        "busiest_actor_share": max(served) / max(sum(served), 1),
        "reward_mean": tot("reward_mean") / n,
    }


COLUMNS = [("layout", "{}"), ("episodes_per_s", "{:.1f}"), ("episodes_per_s_best", "{:.1f}"),
           ("reward_requests_per_s", "{:.1f}"),
           ("iteration_s", "{:.2f}"), ("rollout_s", "{:.2f}"), ("learn_s", "{:.2f}"),
           ("learner_wait_frac", "{:.2f}"), ("runner_policy_s", "{:.2f}"),
           ("runner_reward_wait_s", "{:.2f}"), ("runner_other_s", "{:.2f}"),
           ("runner_overlap", "{:.2f}"), ("runner_busy", "{:.2f}"), ("queue_wait_ms", "{:.1f}"),
           ("fetch_ms", "{:.1f}"),
           ("engine_ms", "{:.1f}"), ("mean_engine_batch", "{:.0f}"),
           ("busiest_actor_share", "{:.2f}"), ("load_1min", "{:.1f}")]


def table(results: list[dict]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for r in results:
        name = r["layout"] + (f" (M={r['groups_per_request']})" if r.get("variant") else "")
        cells = [name] + [f.format(r[c]) for c, f in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_async(results: list[dict]) -> list[dict]:
    """Per layout measured both ways: async / sync episodes/s and the learner's wait shares."""
    def key(r: dict) -> tuple:
        return r["reward_actors"], r["env_runners"], r["groups_per_request"]

    sync = {key(r): r for r in results if not r["async"]}
    out = []
    for a in (r for r in results if r["async"] and key(r) in sync):
        s = sync[key(a)]
        out.append({"layout": s["layout"],
                    "episodes_per_s": [s["episodes_per_s"], a["episodes_per_s"]],
                    "ratio": a["episodes_per_s"] / s["episodes_per_s"],
                    "ratio_best": a["episodes_per_s_best"] / s["episodes_per_s_best"],
                    "learner_wait_frac": [s["learner_wait_frac"], a["learner_wait_frac"]],
                    "runner_busy": [s["runner_busy"], a["runner_busy"]],
                    "load_1min": [s["load_1min"], a["load_1min"]]})
    return out


def plot(results: list[dict], out_png: str, title: str) -> None:
    from refocus_ray.plots import _pyplot

    plt = _pyplot()
    names = [r["layout"] + (f" M={r['groups_per_request']}" if r.get("variant") else "")
             + f"\nload {r['load_1min']:.0f}" for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = range(len(results))
    for ax, parts, ylabel, heading in [
        (axes[0], [("rollout_s", "rollouts (learner waits)"), ("learn_s", "learning"),
                   ("sync_s", "weight sync")], "s / iteration", "iteration (learner view)"),
        (axes[1], [("runner_policy_s", "policy inference"),
                   ("runner_reward_wait_s", "waiting for rewards"),
                   ("runner_other_s", "env + connectors")], "s / iteration / runner",
         "env runner view"),
        (axes[2], [("queue_wait_ms", "queue wait"), ("fetch_ms", "frame fetch (decode)"),
                   ("engine_ms", "engine (processor + prefill)")], "ms / request",
         "per reward request, in the scorer actor"),
    ]:
        bottom = [0.0] * len(results)
        for key, label in parts:
            vals = [r[key] for r in results]
            ax.bar(x, vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(list(x), names)
        ax.set_xlabel("reward actors x env runners")
        ax.set_ylabel(ylabel)
        ax.set_title(heading)
        ax.legend(fontsize=8)
    for i, r in enumerate(results):
        axes[0].annotate(f"{r['episodes_per_s']:.1f} ep/s", (i, r["iteration_s"]),
                         ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/embedded.yaml")
    ap.add_argument("--iterations", type=int, default=4, help="measured per layout")
    ap.add_argument("--layouts", default="1x1,1x2,2x1,2x2,1x1m8",
                    help="in this order: actors x runners [m groups per runner and call] "
                         "[a: asynchronous sampling]")
    ap.add_argument("--async", dest="both", action="store_true",
                    help="run each layout synchronous, then with train.async_sampling")
    ap.add_argument("--pin", action="store_true", help="pin engine i to core i")
    ap.add_argument("--json")
    ap.add_argument("--png")
    args = ap.parse_args()

    import ray

    from refocus_ray.config import load_config
    from refocus_ray.reward_pool import RewardPool
    from refocus_ray.scoring import ReferenceConfig

    base = load_config(args.config)
    model, mode, described = reference_model(base)
    print(f"reference model: {described}")
    # --pin: one core per engine; off by default: on a shared machine a pinned engine starves
    # when another job holds its core (measured: 80x slower engine calls)
    cores = sorted(os.sched_getaffinity(0))[:2] if args.pin else []
    ref_section = {**base.section("reference"), "model": model, "answer_mode": mode,
                   "pool_name": "bench-scaling", "max_wait_ms": 20.0, "cpu_cores": cores}
    tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's socket paths are bounded
    for attempt in range(3):  # under load the raylet can miss Ray's fixed 30 s start window
        try:
            ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
                     _temp_dir=tmp, dashboard_port=free_port())  # 8265: another head's
            break
        except Exception as e:  # Ray raises a bare Exception for this; others re-raised
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            print(f"ray.init: {e}; retrying")
    pool = RewardPool.start(ReferenceConfig(**{**ref_section, "num_actors": 2}))
    results = []
    try:
        runs = []
        for spec in args.layouts.split(","):  # "AxR" (M = 4: 32 requests a call), "AxRmM", +"a"
            spec, is_async = spec.removesuffix("a"), spec.endswith("a")
            ar, _, m = spec.partition("m")
            a, r = (int(v) for v in ar.split("x"))
            for mode in ([False, True] if args.both and not is_async else [is_async]):
                runs.append((a, r, int(m or GROUPS // 2), bool(m), mode))
        for i, (a, r, m, variant, mode) in enumerate(runs):
            # a seed per run: the pool caches frames and scores, so a run repeating the
            # previous run's questions would be served from its cache
            res = run_layout(args.config, ref_section, a, r, m, args.iterations, 100 + i, pool,
                             async_sampling=mode)
            res["variant"] = variant
            results.append(res)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                              for k, v in res.items()}), flush=True)
    finally:
        pool.shutdown()
        ray.shutdown()
    print(f"\nK={K}, G={G}, {GROUPS} groups ({GROUPS * G} episodes) per iteration, "
          f"{args.iterations} measured iterations per layout; reference: {described}")
    print(table(results))
    pairs = compare_async(results)
    for c in pairs:
        print(f"{c['layout']}: async / sync episodes/s {c['ratio']:.2f}x (best iteration "
              f"{c['ratio_best']:.2f}x; {c['episodes_per_s'][0]:.1f} -> "
              f"{c['episodes_per_s'][1]:.1f}); learner waits {c['learner_wait_frac'][0]:.2f} -> "
              f"{c['learner_wait_frac'][1]:.2f} of the iteration; runner busy "
              f"{c['runner_busy'][0]:.2f} -> {c['runner_busy'][1]:.2f}; load "
              f"{c['load_1min'][0]:.1f} / {c['load_1min'][1]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"reference": described, "k": K, "group_size": G,
                                               "groups_per_iteration": GROUPS,
                                               "results": results, "async_vs_sync": pairs},
                                              indent=2))
    if args.png:
        plot(results, args.png, f"GRPO rollouts on 2 shared cores, K={K}, "
             f"{GROUPS}x{G} episodes/iteration; reference: {described}")


if __name__ == "__main__":
    main()
