"""The held-out check that ends training: refocus vs uniform vs random at K on test questions.

The reference model answers from each method's frames; accuracy is the share of questions with
margin > 0. `refocus` is one temperature-1 sample (first K picks, sorted), averaged over seeds,
as the released code uses the policy; `random` is averaged over the same number of seeds.
Writes `heldout.json` in the run's train directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from refocus_ray import selectors
from refocus_ray.config import Config
from refocus_ray.dataset import read_table, resolve_video
from refocus_ray.reward import margin
from refocus_ray.scoring import ScoreRequest

MULTI_FAMILIES = ("first", "after", "count")  # questions that need two or more segments


def heldout_questions(cfg: Config, split: str = "test", min_pool: int = 1) -> list[dict[str, Any]]:
    """Rows of `split` whose pool and question features are cached, with both attached."""
    from refocus_ray.features import load_pools, load_question_features

    pools, qfeat = load_pools(cfg), load_question_features(cfg)
    table_path = cfg.table_path()
    rows = []
    for r in read_table(table_path).to_pylist():
        if r["split"] != split or r["video_id"] not in pools or r["question_id"] not in qfeat:
            continue
        if len(pools[r["video_id"]].frames) < min_pool:
            continue
        r["pool"], (r["q_emb"], r["opt_emb"]) = pools[r["video_id"]], qfeat[r["question_id"]]
        r["video"] = str(resolve_video(table_path, r["video_path"]))
        rows.append(r)
    return rows


def score_selections(pool_client, rows: list[dict[str, Any]], positions: list[np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray, list[float | None]]:
    """(correct [n], margin [n], evidence recall [n]) of the reference model on each selection."""
    reqs = [ScoreRequest(r["video"], tuple(int(f) for f in r["pool"].frames[p]), r["question"],
                         tuple(r["options"])) for r, p in zip(rows, positions)]
    z = pool_client.score(reqs)
    m = np.array([margin(zi, r["answer"]) for zi, r in zip(z, rows)])
    rec = [selectors.evidence_recall(r["pool"].t_s[p], r["evidence"]) for r, p in zip(rows, positions)]
    return (m > 0).astype(float), m, rec


def selection_score(policy, rows: list[dict[str, Any]], examples: list, pool_client,
                    ks: list[int], seed: int = 0) -> dict[str, float]:
    """Accuracy and mean margin of one temperature-1 sample of `policy` on `rows` (from
    `heldout_questions`, with their policy `examples`) at each K, and their mean accuracy as
    `score`: what `train` compares checkpoints by when ``train.select_split`` is set."""
    out: dict[str, float] = {}
    for k in ks:
        c, m, _ = score_selections(pool_client, rows, selectors.refocus(policy, examples, k,
                                                                        seed=seed))
        out[f"acc_k{k}"], out[f"margin_k{k}"] = float(c.mean()), float(m.mean())
    out["score"] = float(np.mean([out[f"acc_k{k}"] for k in ks]))
    return out


def heldout(cfg: Config, policy, pool_client, k: int = 4, seeds: int = 3,
            split: str = "test", train_seconds: float | None = None,
            policy_iteration: int | None = None) -> dict[str, Any]:
    """Evaluate and write `<run_dir>/train/heldout.json`; returns the record."""
    from refocus_ray.policy import example_from_pool

    rows = heldout_questions(cfg, split, min_pool=k)
    if not rows:
        raise ValueError(f"no {split} questions with cached features: run `refocus prepare`")
    examples = [example_from_pool(r["pool"], r["q_emb"], r["opt_emb"]) for r in rows]
    methods: dict[str, list[list[np.ndarray]]] = {
        "uniform": [[selectors.uniform(len(r["pool"].frames), k) for r in rows]],
        "random": [[selectors.random(len(r["pool"].frames), k, np.random.default_rng([s, i]))
                    for i, r in enumerate(rows)] for s in range(seeds)],
        "refocus": [selectors.refocus(policy, examples, k, seed=s) for s in range(seeds)],
    }
    multi = np.array([r["family"] in MULTI_FAMILIES for r in rows])
    out: dict[str, Any] = {"split": split, "k": k, "seeds": seeds, "n_questions": len(rows),
                           "n_multi": int(multi.sum())}
    for name, runs in methods.items():
        accs, margins, recalls = [], [], []
        for positions in runs:
            c, m, rec = score_selections(pool_client, rows, positions)
            accs.append(c)
            margins.append(m)
            recalls.append([x for x in rec if x is not None])
        acc = np.mean(accs, axis=0)  # per question, mean over seeds
        out[f"acc_{name}_k{k}"] = float(acc.mean())
        out[f"acc_{name}_k{k}_multi"] = float(acc[multi].mean()) if multi.any() else None
        out[f"margin_{name}_k{k}"] = float(np.mean(margins))
        out[f"evidence_recall_{name}_k{k}"] = float(np.mean([np.mean(r) for r in recalls]))
        out[f"_per_question_{name}"] = acc.tolist()
    diff = np.array(out["_per_question_refocus"]) - np.array(out["_per_question_uniform"])
    boot = np.random.default_rng(0).choice(len(diff), (2000, len(diff)))
    out[f"refocus_minus_uniform_k{k}"] = float(diff.mean())
    out[f"refocus_minus_uniform_k{k}_ci95_low"] = float(np.percentile(diff[boot].mean(1), 2.5))
    out["train_seconds"] = train_seconds
    out["policy_iteration"] = policy_iteration  # the exported checkpoint (train.select_split)
    for key in [k_ for k_ in out if k_.startswith("_per_question")]:
        out.pop(key)
    path = Path(cfg.run_path) / "train" / "heldout.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return out


def verdict(res: dict[str, Any]) -> str:
    """One line a user reads first: did the trained policy beat uniform on held-out data?"""
    k = res.get("k", 4)
    d, low = res[f"refocus_minus_uniform_k{k}"], res[f"refocus_minus_uniform_k{k}_ci95_low"]
    beats = "beats" if low > 0 else "does NOT beat"
    return (f"held-out ({res['split']}, K={k}, {res['n_questions']} questions): refocus "
            f"{res[f'acc_refocus_k{k}']:.3f} vs uniform {res[f'acc_uniform_k{k}']:.3f} "
            f"({d:+.3f}, paired-bootstrap 95% low {low:+.3f}) and random "
            f"{res[f'acc_random_k{k}']:.3f}: the policy {beats} uniform sampling")
