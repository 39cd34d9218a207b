"""How much can *any* selector gain with this reference model? A diagnostic, not a method.

GRPO can only teach the policy what the reference model rewards. This bench asks two
questions on the test split at K frames, scored by the run's reference model on vLLM:

    oracle      one frame from the middle of every evidence segment, the rest uniform: the most
                a selector could give the reference (the evidence column is read, so this is
                analysis only)
    supervised  the run's selector architecture trained *supervised* on evidence frames
                (teacher forcing on the train split, a few minutes on CPU): what the cached
                frame features and question embeddings let a policy find on unseen videos
    uniform     the paper's baseline

With ``--steps 0`` that row ("untrained") is the policy as configured at init: what an
inductive bias alone gives (e.g. ``--set policy.prior_weight=2 --set policy.diversity_weight=10``).

For each it prints accuracy per family, the share of questions whose K frames hit every
evidence segment ("full"), and the accuracy given full and given partial evidence. If the
reference is right only some of the time with full evidence, or confidently wrong with partial
evidence, no selector (learned or not) can beat uniform by much: fix the reference model first.
Training never does this (the policy learns from rewards only).

How to run (after `make demo` or at least its data, features and forge stages):
    .venv/bin/python bench/selector_ceiling.py --config configs/embedded.yaml --json out.json
Expect ~4 minutes on 2 cores (vLLM start, 400 supervised steps, three scoring passes).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from refocus_ray import selectors
from refocus_ray.cli import add_config_args, config_from_args
from refocus_ray.heldout import heldout_questions, score_selections
from refocus_ray.policy import PolicyConfig, SelectorPolicy, collate, example_from_pool


def evidence_targets(row: dict[str, Any], k: int) -> list[int]:
    """Pool positions of one frame per evidence segment (its middle), in time order; `global`
    questions (evidence = the whole video) get K uniform frames."""
    t = row["pool"].t_s
    if row["family"] == "global":
        return [int(i) for i in selectors.uniform(len(t), k)]
    out = []
    for span in row["evidence"] or []:
        inside = np.flatnonzero((t >= span["start_s"]) & (t < span["end_s"]))
        if len(inside):
            out.append(int(inside[len(inside) // 2]))
    return out[:k]


def oracle(row: dict[str, Any], k: int) -> np.ndarray:
    """Every evidence segment's middle frame, then uniform frames (then any) until K."""
    picks = evidence_targets(row, k)
    n = len(row["pool"].frames)
    for f in [*selectors.uniform(n, k), *range(n)]:
        if len(picks) == k:
            break
        if int(f) not in picks:
            picks.append(int(f))
    return np.sort(np.asarray(picks))


def train_supervised(cfg, rows: list[dict[str, Any]], k: int, steps: int, seed: int = 0
                     ) -> SelectorPolicy:
    """Teacher-forced cross-entropy on evidence frames: max sum_t log pi(c*_t | c*_<t)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    policy = SelectorPolicy(PolicyConfig.from_dict(cfg.section("policy")))
    if policy.cfg.bridge_classes:
        from refocus_ray.bridge import bridge_tensors

        policy.set_bridge(**bridge_tensors(cfg))
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-4)
    examples = [example_from_pool(r["pool"], r["q_emb"], r["opt_emb"]) for r in rows]
    targets = [evidence_targets(r, k) for r in rows]
    batch_size = min(32, len(rows))
    t0 = time.time()
    for step in range(steps):
        idx = rng.choice(len(rows), batch_size, replace=False)
        chosen = torch.zeros(batch_size, k, dtype=torch.long)
        mask = torch.zeros(batch_size, k)
        for j, i in enumerate(idx):
            t = targets[i]
            filler = [int(f) for f in rng.permutation(len(rows[i]["pool"].frames)) if f not in t]
            chosen[j] = torch.tensor(t + filler[: k - len(t)])
            mask[j, : len(t)] = 1.0  # only the evidence picks are supervised
        out = policy.rescore(collate([examples[i] for i in idx]), chosen)
        loss = -(out.logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"supervised step {step + 1}/{steps} loss {loss.item():.3f} "
                  f"{time.time() - t0:.0f}s", flush=True)
    return policy.eval()


def breakdown(rows: list[dict[str, Any]], correct: np.ndarray, recall: list,
              margin: np.ndarray) -> dict[str, Any]:
    """Accuracy and mean margin (what the paper's reward is a function of) per family, and
    accuracy given full / partial evidence."""
    out: dict[str, Any] = {}
    fams = np.array([r["family"] for r in rows])
    full = np.array([np.nan if x is None else float(x == 1.0) for x in recall])
    for fam in ["all", *sorted(set(fams))]:
        s = np.ones(len(rows), bool) if fam == "all" else fams == fam
        f, c = full[s], correct[s]
        has = ~np.isnan(f)
        out[fam] = {
            "n": int(s.sum()), "accuracy": round(float(c.mean()), 3),
            "margin": round(float(margin[s].mean()), 3),
            "full_evidence": round(float(f[has].mean()), 3) if has.any() else None,
            "acc_given_full": round(float(c[has][f[has] == 1].mean()), 3)
            if (f[has] == 1).any() else None,
            "acc_given_partial": round(float(c[has][f[has] == 0].mean()), 3)
            if (f[has] == 0).any() else None,
        }  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(ap)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=400, help="supervised steps (batch 32)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    import ray

    from refocus_ray.reward_pool import RewardPool
    from refocus_ray.train import scorer_config

    cfg = config_from_args(args)
    torch.set_num_threads(2)
    train_rows = [r for r in heldout_questions(cfg, "train", args.k)
                  if evidence_targets(r, args.k)]
    rows = heldout_questions(cfg, args.split, args.k)
    print(f"{len(train_rows)} train questions, {len(rows)} {args.split} questions, K={args.k}")
    policy = train_supervised(cfg, train_rows, args.k, args.steps)
    examples = [example_from_pool(r["pool"], r["q_emb"], r["opt_emb"]) for r in rows]
    learned = "supervised" if args.steps else "untrained"
    selections = {
        "uniform": [selectors.uniform(len(r["pool"].frames), args.k) for r in rows],
        learned: selectors.refocus(policy, examples, args.k, seed=0),
        "oracle": [oracle(r, args.k) for r in rows],
    }
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    pool = RewardPool.start(scorer_config(cfg, "reference"))
    try:
        result = {}
        for name, positions in selections.items():
            correct, margin, recall = score_selections(pool, rows, positions)
            result[name] = breakdown(rows, correct, recall, margin)
    finally:
        pool.shutdown()
        ray.shutdown()
    fams = list(result["uniform"])
    print(f"\nreference-model accuracy at K={args.k} on {args.split} "
          "(full = every evidence segment hit; acc|full, acc|partial)")
    print(f"{'family':8s} {'n':>4s} " + " ".join(f"{m:>30s}" for m in result))
    for fam in fams:
        cells = []
        for m in result:
            x = result[m][fam]
            cells.append(f"{x['accuracy']:.2f} full {x['full_evidence'] or 0:.2f} "
                         f"({x['acc_given_full'] if x['acc_given_full'] is not None else '-'}, "
                         f"{x['acc_given_partial'] if x['acc_given_partial'] is not None else '-'})")
        print(f"{fam:8s} {result['uniform'][fam]['n']:4d} " + " ".join(f"{c:>30s}" for c in cells))
    u = result["uniform"]["all"]["accuracy"]
    for m in (learned, "oracle"):
        a = result[m]["all"]["accuracy"]
        print(f"{m} - uniform: {a - u:+.3f} ({a / max(u, 1e-9):.2f}x); mean margin "
              f"{result[m]['all']['margin']:+.2f} vs {result['uniform']['all']['margin']:+.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"k": args.k, "split": args.split, "steps": args.steps, **result}, f,
                      indent=1)


if __name__ == "__main__":
    main()
