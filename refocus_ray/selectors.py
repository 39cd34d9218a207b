"""Frame selectors over a cached candidate pool: what the policy is compared against.

Every selector returns K distinct pool positions (indices into the pool), sorted
chronologically; `pool.frames[positions]` are the original frame numbers.

The baselines are the ones a user would reach for instead of a learned selector:
``uniform`` (the paper's baseline), ``random``, ``diverse`` (k-center greedy on frame features:
coverage without the query), ``relevance_diverse`` (training-free and query-aware, in the
spirit of mDP3: relevance to the question and options through a text-image bridge, traded off
against redundancy), ``framewise`` (score every pool frame alone with the reference model by a
label-free confidence and keep the top K: an expensive oracle-like upper reference for
single-frame evidence) and the policy itself (``refocus``, ``refocus_best_of``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from refocus_ray.policy import PolicyExample, SelectorPolicy, collate


def uniform(pool_size: int, k: int) -> np.ndarray:
    """The paper's baseline: linspace(first, last, K) over the pool, endpoints included."""
    _check(pool_size, k)
    return np.linspace(0, pool_size - 1, k, dtype=int)


def random(pool_size: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """K distinct pool positions at random."""
    _check(pool_size, k)
    return np.sort(rng.choice(pool_size, k, replace=False))


def refocus(policy: SelectorPolicy, examples: Sequence[PolicyExample], k: int, *,
            greedy: bool = False, seed: int = 0, batch_size: int = 64) -> list[np.ndarray]:
    """The trained policy as the released code uses it: one temperature-1 rollout per query
    (or greedy), its first K picks, sorted chronologically."""
    gen = torch.Generator().manual_seed(seed)
    out: list[np.ndarray] = []
    for i in range(0, len(examples), batch_size):
        batch = collate(list(examples[i : i + batch_size]))
        chosen = policy.sample(batch, k, greedy=greedy, generator=gen).chosen
        out.extend(np.sort(c.numpy()) for c in chosen)
    return out


def refocus_best_of(policy: SelectorPolicy, examples: Sequence[PolicyExample], k: int, *,
                    n: int = 8, seed: int = 0, batch_size: int = 16) -> list[np.ndarray]:
    """Best of N temperature-1 rollouts per query by the policy's own total log-probability.

    Label-free and reference-free: the policy ranks its own samples, so this costs N rollouts
    of the selector and nothing else (the released code keeps rollout 0 instead)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[np.ndarray] = []
    for i in range(0, len(examples), batch_size):
        batch = collate(list(examples[i : i + batch_size]))
        s = policy.sample(batch, k, generator=gen, group=n)
        chosen = s.chosen.view(len(batch), n, k)
        best = s.logp.view(len(batch), n, k).sum(-1).argmax(1)
        out.extend(np.sort(chosen[b, int(j)].numpy()) for b, j in enumerate(best))
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def diverse(features: np.ndarray, k: int, start: str = "medoid") -> np.ndarray:
    """k-center greedy on L2-normalised frame features (cosine distance), deterministic.

    Starts from the medoid (the most typical frame) or the first frame, then repeatedly adds the
    frame farthest from everything chosen: maximal visual coverage, blind to the question."""
    f = _unit(features)
    _check(len(f), k)
    if start not in ("medoid", "first"):
        raise ValueError(f"start must be 'medoid' or 'first', got {start!r}")
    dist = 1.0 - f @ f.T
    first = int(dist.sum(1).argmin()) if start == "medoid" else 0
    chosen = [first]
    nearest = dist[first].copy()
    for _ in range(k - 1):
        nearest[chosen] = -np.inf  # never re-pick (ties among duplicates of chosen frames)
        c = int(nearest.argmax())
        chosen.append(c)
        nearest = np.minimum(nearest, dist[c])
    return np.sort(np.asarray(chosen))


def relevance(class_probs: np.ndarray, class_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Query relevance of each frame through the text-image bridge: frame -> ImageNet class
    distribution [F, C]; class names and query texts share the query encoder's space [C, D],
    [T, D]. relevance[f] = max over texts of sum_c p(c | f) * (cos(c, text) - mean_c cos).

    Centring the similarities removes the constant that every class shares with any text, so
    only classes more related to the text than average raise a frame's relevance; the max over
    texts lets a frame that shows any one option count as relevant."""
    sim = _unit(class_emb) @ _unit(np.atleast_2d(text_emb)).T  # [C, T]
    sim -= sim.mean(0, keepdims=True)
    return (np.asarray(class_probs, np.float64) @ sim).max(1)


def relevance_diverse(features: np.ndarray, rel: np.ndarray, k: int, lam: float = 0.5
                      ) -> np.ndarray:
    """Greedy MMR: each step adds argmax_f lam * rel'(f) - (1 - lam) * max_{s chosen} cos(f, s),
    rel' = relevance min-max scaled to [0, 1]. lam = 1 is top-K relevance, lam = 0 pure
    diversity; the first pick is the most relevant frame. Deterministic."""
    f = _unit(features)
    _check(len(f), k)
    r = np.asarray(rel, np.float64)
    r = (r - r.min()) / max(float(r.max() - r.min()), 1e-12)
    sim = f @ f.T
    chosen = [int(r.argmax())]
    redundancy = sim[chosen[0]].copy()
    for _ in range(k - 1):
        score = lam * r - (1.0 - lam) * redundancy
        score[chosen] = -np.inf
        c = int(score.argmax())
        chosen.append(c)
        redundancy = np.maximum(redundancy, sim[c])
    return np.sort(np.asarray(chosen))


def framewise_confidence(pool_client: Any, rows: Sequence[Mapping[str, Any]]
                         ) -> list[np.ndarray]:
    """Label-free confidence of the reference model on every pool frame alone: max_y p(y | frame,
    question, options). One reference call per pool frame; the answer is never read (rows need
    only ``video``, ``pool``, ``question``, ``options``)."""
    from refocus_ray.reward import max_prob
    from refocus_ray.scoring import ScoreRequest

    reqs, sizes = [], []
    for r in rows:
        frames = [int(f) for f in r["pool"].frames]
        sizes.append(len(frames))
        reqs.extend(ScoreRequest(r["video"], (f,), r["question"], tuple(r["options"]))
                    for f in frames)
    z = pool_client.score(reqs)
    conf = np.array([max_prob(zi) for zi in z])
    return list(np.split(conf, np.cumsum(sizes)[:-1]))


def framewise(confidence: np.ndarray, k: int) -> np.ndarray:
    """The K frames the reference model is most confident about alone (ties: earlier first)."""
    c = np.asarray(confidence, np.float64)
    _check(len(c), k)
    return np.sort(np.argsort(-c, kind="stable")[:k])


def evidence_recall(t_s: np.ndarray, spans: Sequence[dict]) -> float | None:
    """Fraction of evidence segments with at least one chosen frame inside (analysis only)."""
    if not spans:
        return None
    hit = [any(s["start_s"] <= t < s["end_s"] for t in t_s) for s in spans]
    return float(np.mean(hit))


def _check(pool_size: int, k: int) -> None:
    if not 0 < k <= pool_size:
        raise ValueError(f"k={k} must be between 1 and the pool size ({pool_size})")
