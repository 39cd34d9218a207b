"""What does the reference model reward? The reward per family for six kinds of frame sets.

GRPO moves the policy toward whatever frames earn more reward than the group's mean. If the
reference model is confidently wrong when it sees an inserted object that is not the evidence
(a distractor), every object becomes a risk, and the policy learns to avoid them all before it
learns which one a question asks about. This bench measures that landscape on a split at K = 4,
scored by the run's reference model on vLLM (the evidence column is read: analysis only):

    none          4 background frames (no inserted object)
    distractor1   one frame of a distractor segment + 3 background frames
    evidence1     one frame of one evidence segment + 3 background frames
    evidence_all  the middle frame of every evidence segment (up to 4), background filler
    ev1+distr1    one evidence frame and one distractor frame + 2 background frames
    all+distr1    every evidence segment (up to K - 1) and one distractor frame: does the
                  reader still answer when it also sees an object the question is not about?

It prints mean reward (tanh margin) and accuracy per family and kind. A reference model that a
selector can learn against has distractor1 close to none and evidence_all well above both.

How to run (after `make demo`, or at least its data, features and forge stages):
    .venv/bin/python bench/reward_landscape.py --config configs/embedded.yaml --json out.json
About 2 minutes on 2 cores (vLLM start-up and 6 x ~600 scored subsets on the train split).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from refocus_ray.cli import add_config_args, config_from_args
from refocus_ray.heldout import heldout_questions, score_selections

KINDS = ("none", "distractor1", "evidence1", "evidence_all", "ev1+distr1", "all+distr1")


def _frames_in(t: np.ndarray, spans: list[dict[str, float]]) -> list[np.ndarray]:
    return [x for x in (np.flatnonzero((t >= s["start_s"]) & (t < s["end_s"])) for s in spans)
            if len(x)]


def frame_sets(rows: list[dict[str, Any]], k: int, seed: int = 0
               ) -> tuple[list[dict[str, Any]], dict[str, list[np.ndarray]]]:
    """The rows that have evidence, distractor and enough background frames, and for each kind
    the pool positions of its K frames (sorted)."""
    rng = np.random.default_rng(seed)
    kept, out = [], {kind: [] for kind in KINDS}
    for r in rows:
        t = r["pool"].t_s
        ev, di = _frames_in(t, r["evidence"] or []), _frames_in(t, r["distractors"] or [])
        busy = np.concatenate([np.zeros(0, int), *ev, *di])
        bg = np.setdiff1d(np.arange(len(t)), busy)
        if r["family"] == "global" or not ev or not di or len(bg) < k:
            continue
        kept.append(r)
        e1 = int(rng.choice(ev[rng.integers(len(ev))]))
        d1 = int(rng.choice(di[rng.integers(len(di))]))
        filler = [int(f) for f in rng.permutation(bg)]

        def fill(picks: list[int], filler: list[int] = filler) -> np.ndarray:
            return np.sort(np.asarray((picks + [f for f in filler if f not in picks])[:k]))

        out["none"].append(fill([]))
        out["distractor1"].append(fill([d1]))
        out["evidence1"].append(fill([e1]))
        middle = [int(x[len(x) // 2]) for x in ev]
        out["evidence_all"].append(fill(middle[:k]))
        out["ev1+distr1"].append(fill([e1, d1]))
        out["all+distr1"].append(fill(middle[: k - 1] + [d1]))
    return kept, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(ap)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--split", default="train")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    import ray

    from refocus_ray.reward_pool import RewardPool
    from refocus_ray.train import scorer_config

    cfg = config_from_args(args)
    rows, sets = frame_sets(heldout_questions(cfg, args.split, args.k), args.k)
    fams = np.array([r["family"] for r in rows])
    names = sorted(set(fams))
    print(f"{len(rows)} {args.split} questions, K={args.k}: "
          + ", ".join(f"{f} {int((fams == f).sum())}" for f in names))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    pool = RewardPool.start(scorer_config(cfg, "reference"))
    result: dict[str, Any] = {}
    try:
        for kind, positions in sets.items():
            correct, margin, _ = score_selections(pool, rows, positions)
            reward = np.tanh(margin / 2)
            result[kind] = {f: {"reward": round(float(reward[fams == f].mean()), 3),
                                "accuracy": round(float(correct[fams == f].mean()), 3)}
                            for f in names}
            result[kind]["all"] = {"reward": round(float(reward.mean()), 3),
                                   "accuracy": round(float(correct.mean()), 3)}
    finally:
        pool.shutdown()
        ray.shutdown()
    print(f"\nmean reward (accuracy) of the reference model, {args.split}, K={args.k}")
    print(f"{'frames':14s}" + "".join(f"{f:>16s}" for f in [*names, "all"]))
    for kind in KINDS:
        print(f"{kind:14s}" + "".join(
            f"{result[kind][f]['reward']:+9.2f} ({result[kind][f]['accuracy']:.2f})"
            for f in [*names, "all"]))
    gap = result["distractor1"]["all"]["reward"] - result["none"]["all"]["reward"]
    print(f"distractor1 - none: {gap:+.3f} (what one wrong object costs; near 0 is learnable)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"k": args.k, "split": args.split, "n": len(rows), **result}, f, indent=1)


if __name__ == "__main__":
    main()
