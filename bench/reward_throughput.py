"""Reward scoring throughput: the pool vs per-subset transformers vs generate-then-parse.

How to run (after `make demo` has forged the reference model):
    .venv/bin/python bench/reward_throughput.py [--json out.json]
    .venv/bin/python bench/reward_throughput.py --model DIR --table questions.parquet

Workload: 16 GRPO groups of 8 random chronological subsets of K = 8 frames from test videos
(distinct subsets: the cache is never hit). Measured in one run:
  (a) the reward pool (vLLM scorer actors, micro-batching), all groups in flight at once, for
      each pool layout of `--layouts`: by default two actors of one core each (2x1: on a CPU
      machine an engine per core, as a cluster has one per GPU: vLLM's per-request input
      processing is Python, one core per engine) with requests routed by load (a video's
      group leaves its home actor when that one is a group ahead of the other), the same
      with every group sent to its video's home actor (2x1:home), then one actor on both
      cores (1x2);
  (b) the `transformers` backend, one subset per call under inference_mode (both cores);
  (c) vLLM generate-then-parse: up to 4 generated tokens per subset, answer read from text;
and, per layout, the pool with 2 concurrent callers vs 1 (each caller sends one group at a
time; runs alternate `--repeats` times on fresh subsets and the medians are reported, as the
machine is shared). For each, where the actors' time went: engine busy fraction, mean engine
batch, engine ms per request, queue wait. On one engine, two callers can beat one by at most
(engine ms/request at one caller) / (at two) while the engine is busy, as it is on a 2-core CPU;
on two engines by twice that, when the callers' groups go to different actors (routing by
load sends them there; by home actor only, they collide half the time).
Goals on 2 cores: a/b >= 2; 2 callers >= 1.5x one. a/c is reported without a goal (one
prefill is about calibrated scores for every option, not speed). The JSON's top-level pool
figures are the first layout's; every layout's are under "layouts". ~4 min on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

for k, v in {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
             "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
             "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(k, v)


def workload(table: Path, groups: int, size: int, k: int, seed: int, offset: int = 0):
    """`groups` x `size` ScoreRequests: each group one test question, distinct subsets."""
    from refocus_ray.dataset import read_table, resolve_video
    from refocus_ray.scoring import ScoreRequest
    from refocus_ray.video import pool_indices, probe

    rng = np.random.default_rng(seed)
    rows = [r for r in read_table(table).to_pylist() if r["split"] == "test"]
    picks = rng.choice(len(rows), groups + offset, replace=False)[offset:]
    out = []
    for i in picks:
        r = rows[i]
        video = str(resolve_video(table, r["video_path"]))
        info = probe(video)
        pool = pool_indices(info.n_frames, info.fps, 128, 4.0)
        out.append([
            ScoreRequest(video, tuple(sorted(int(f) for f in rng.choice(pool, k, replace=False))),
                         r["question"], tuple(r["options"]))
            for _ in range(size)
        ])  # fmt: skip
    return out


def _totals(pool) -> dict[str, float]:
    """The actors' counters, summed over the pool."""
    stats = pool.stats()
    return {k: sum(st[k] for st in stats) for k in stats[0] if isinstance(stats[0][k], float | int)}


def run_pool(pool, groups, callers: int) -> tuple[float, dict[str, float]]:
    """Subsets/s with `callers` threads, each sending its groups one at a time, and where the
    actors' time went: engine busy fraction (per actor), mean engine batch, queue wait."""
    share = [groups[i::callers] for i in range(callers)]
    before = _totals(pool)
    t = time.perf_counter()
    threads = [threading.Thread(target=lambda g=g: [pool.score(x) for x in g]) for g in share]
    [th.start() for th in threads]
    [th.join() for th in threads]
    wall = time.perf_counter() - t
    d = {k: v - before[k] for k, v in _totals(pool).items()}
    n = sum(map(len, groups))
    return n / wall, {"engine_busy": (d["engine_s"] + d["fetch_s"]) / wall / len(pool.actors),
                      "mean_batch": d["scored"] / max(d["engine_calls"], 1),
                      "engine_ms_per_request": 1e3 * d["engine_s"] / max(d["scored"], 1),
                      "queue_wait_ms": 1e3 * d["queue_wait_s"] / max(d["scored"], 1)}


def measure_pool(args, mk, actors: int, cpus: int, by_load: bool) -> dict[str, Any]:
    """(a) and the 1-vs-2-caller runs for one pool layout: `actors` scorer actors of `cpus`
    CPUs each, pinned to their own cores when they fit the machine; requests routed by load
    (`reference.route_by_load`) or to their video's home actor only."""
    import ray

    from refocus_ray.reward_pool import RewardPool
    from refocus_ray.scoring import ReferenceConfig

    cores = list(range(actors * cpus)) if actors * cpus <= (os.cpu_count() or 1) else []
    cfg = ReferenceConfig(model=args.model, max_model_len=2048, pool_name=f"bench-{actors}x{cpus}",
                          num_actors=actors, num_cpus_per_actor=cpus,
                          cpu_cores=cores if actors > 1 else [], route_by_load=by_load)  # fmt: skip
    res: dict[str, Any] = {}
    pool = RewardPool.start(cfg)
    pool.score([r for g in mk(99, 0) for r in g])  # warm-up, every actor
    # decode every workload's frames up front, in every actor (routing by load may send a
    # group away from home): the comparison is the engine, not decord
    caller_seeds = range(10, 10 + 2 * args.repeats)
    for s in (1, *caller_seeds):
        ray.get([a.prefetch.remote([r for g in mk(s, 0) for r in g]) for a in pool.actors])
    if pool.balancing:  # what routing by load adds to every call: asking the actors
        probe = []
        for _ in range(100):
            t = time.perf_counter()
            pool.loads()
            probe.append(1e3 * (time.perf_counter() - t))
        res["route_probe_ms"] = statistics.median(probe)
    before = _totals(pool)
    batch = [r for g in mk(1, 0) for r in g]
    t = time.perf_counter()
    pool.score(batch)
    res["subsets_per_s_pool"] = len(batch) / (time.perf_counter() - t)
    after = _totals(pool)
    res["mean_batch_size"] = len(batch) / max(after["engine_calls"] - before["engine_calls"], 1)
    res["engine_ms_per_request_all_in_flight"] = (
        1e3 * (after["engine_s"] - before["engine_s"]) / len(batch))
    runs: dict[int, list] = {1: [], 2: []}
    for i, seed in enumerate(caller_seeds):  # 1, 2, 1, 2, ...: neighbours share the load
        runs[1 + i % 2].append(run_pool(pool, mk(seed, 0), 1 + i % 2))
    for callers, name in ((1, "1_caller"), (2, "2_callers")):
        res[f"subsets_per_s_pool_{name}"] = statistics.median(v for v, _ in runs[callers])
        for k in runs[callers][0][1]:
            res[f"{k}_{name}"] = statistics.median(split[k] for _, split in runs[callers])
    pairs = [b / a for (a, _), (b, _) in zip(runs[1], runs[2])]
    res["ratio_two_callers_vs_one_runs"] = pairs
    res["ratio_two_callers_vs_one"] = statistics.median(pairs)
    # one engine: two callers can gain only what a bigger engine batch saves per request
    res["ratio_two_callers_ceiling"] = min(actors, 2) * (
        res["engine_ms_per_request_1_caller"] / res["engine_ms_per_request_2_callers"])
    pool.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/embedded/forge/checkpoint")
    ap.add_argument("--table", default="runs/embedded/data/questions.parquet")
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="1-caller/2-caller runs (medians)")
    ap.add_argument("--layouts", default="2x1,2x1:home,1x2",
                    help="pool layouts to measure, ACTORSxCPUS[:home] each, the first the "
                         "headline: 2x1 = two scorer actors of one core each, 1x2 = one actor on "
                         "both cores (Ray sets an actor's thread count to its CPUs); both use the "
                         "two cores (b) and (c) run on. ':home' routes every request to its "
                         "video's home actor (reference.route_by_load: false)")
    ap.add_argument("--json")
    args = ap.parse_args()

    import ray

    from refocus_ray.scoring import ReferenceConfig, TransformersBackend, VLLMBackend

    cfg = ReferenceConfig(model=args.model, max_model_len=2048)
    mk = lambda seed, off: workload(Path(args.table), args.groups, args.group_size, args.k,
                                    seed, off)
    res: dict[str, Any] = {}
    # (b) first, in a quiet process: measured after the pools it ran 20-40% slower on some runs
    tf = TransformersBackend(cfg)
    reqs = [r for g in mk(4, 0) for r in g][:64]
    tf.score(reqs[:1])
    for r in reqs:  # decode outside the timed loop: the comparison is the model call
        tf.store.get(r.video, r.frames)
    t = time.perf_counter()
    for r in reqs:
        tf.score([r])
    res["subsets_per_s_transformers"] = len(reqs) / (time.perf_counter() - t)
    del tf

    layouts = {lay: tuple(int(x) for x in lay.split(":")[0].split("x"))
               for lay in args.layouts.split(",")}
    ray.init(address="local", num_cpus=max(2, *(a * c for a, c in layouts.values())),
             include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray_reward_bench_"))  # never another's cluster
    res["layouts"] = {lay: measure_pool(args, mk, a, c, not lay.endswith(":home"))
                      for lay, (a, c) in layouts.items()}
    ray.shutdown()

    from vllm import SamplingParams

    vb = VLLMBackend(cfg)
    reqs = [r for g in mk(5, 0) for r in g]
    items = [(vb.store.get(r.video, r.frames), r) for r in reqs]
    sc = vb.scorer
    prompts = [{"prompt": sc.prompt(len(f), r.question, r.options),
                "multi_modal_data": {"image": sc.images(f)}} for f, r in items]
    params = SamplingParams(max_tokens=4, temperature=0)
    sc.llm.generate(prompts[:2], params, use_tqdm=False)
    t = time.perf_counter()
    outs = sc.llm.generate(prompts, params, use_tqdm=False)
    parsed = [next((i for i, o in enumerate(r.options) if o in out.outputs[0].text), -1)
              for (_, r), out in zip(items, outs)]
    res["subsets_per_s_generate_parse"] = len(prompts) / (time.perf_counter() - t)
    res["generate_parse_unparsed_fraction"] = float(np.mean([p < 0 for p in parsed]))

    for lay in res["layouts"].values():
        lay["ratio_pool_vs_sequential"] = lay["subsets_per_s_pool"] / res["subsets_per_s_transformers"]
        lay["ratio_pool_vs_generate"] = lay["subsets_per_s_pool"] / res["subsets_per_s_generate_parse"]
    res.update(next(iter(res["layouts"].values())))  # the first layout is the headline
    w = args.groups * args.group_size
    print(f"workload: {args.groups} groups x {args.group_size} subsets of K={args.k} ({w})")
    print(f"(b) transformers, one per call     {res['subsets_per_s_transformers']:8.1f} subsets/s")
    print(f"(c) vLLM generate-then-parse       {res['subsets_per_s_generate_parse']:8.1f} subsets/s")
    for name, lay in res["layouts"].items():
        a, c = name.split(":")[0].split("x")
        how = ", routed home actor only" if name.endswith(":home") else ", routed by load"
        print(f"(a) reward pool, {a} actor(s) x {c} CPU(s){how if a != '1' else ''}, all in flight "
              f"{lay['subsets_per_s_pool']:8.1f}"
              f" subsets/s (mean engine batch {lay['mean_batch_size']:.1f}, engine "
              f"{lay['engine_ms_per_request_all_in_flight']:.1f} ms/request)")
        if "route_probe_ms" in lay:
            print(f"    asking the actors their load   {lay['route_probe_ms']:8.2f} ms per call (median)")
        print(f"    1 caller / 2 callers           {lay['subsets_per_s_pool_1_caller']:8.1f} / "
              f"{lay['subsets_per_s_pool_2_callers']:.1f} subsets/s (medians of {args.repeats})")
        for who in ("1_caller", "2_callers"):
            print(f"    {who:9s}: engine busy {lay['engine_busy_' + who]:.0%}, mean batch "
                  f"{lay['mean_batch_' + who]:.1f}, engine {lay['engine_ms_per_request_' + who]:.1f}"
                  f" ms/request, queue wait {lay['queue_wait_ms_' + who]:.1f} ms/request")
        print(f"    a/b = {lay['ratio_pool_vs_sequential']:.2f}x (goal >= 2)   "
              f"a/c = {lay['ratio_pool_vs_generate']:.2f}x   "
              f"2 callers / 1 = {lay['ratio_two_callers_vs_one']:.2f}x (goal >= 1.5; runs "
              f"{', '.join(f'{r:.2f}' for r in lay['ratio_two_callers_vs_one_runs'])}; "
              f"engine-bound ceiling {lay['ratio_two_callers_ceiling']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
