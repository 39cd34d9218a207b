"""Frame selectors over a cached candidate pool: what the policy is compared against.

Every selector returns K distinct pool positions (indices into the pool), sorted
chronologically; `pool.frames[positions]` are the original frame numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def evidence_recall(t_s: np.ndarray, spans: Sequence[dict]) -> float | None:
    """Fraction of evidence segments with at least one chosen frame inside (analysis only)."""
    if not spans:
        return None
    hit = [any(s["start_s"] <= t < s["end_s"] for t in t_s) for s in spans]
    return float(np.mean(hit))


def _check(pool_size: int, k: int) -> None:
    if not 0 < k <= pool_size:
        raise ValueError(f"k={k} must be between 1 and the pool size ({pool_size})")
