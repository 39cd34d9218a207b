"""Rewards from the reference model's option scores z (one logit per option).

The paper's reward (project page): r = tanh((z_{y*} - max_{y != y*} z_y) / 2), the correct
option's margin over the strongest distractor, in (-1, 1); r > 0 iff the argmax is correct.
Algebraically it is the probability margin after renormalising the softmax over the pair
{y*, strongest distractor}. The poster's figure uses the full-softmax probability margin
p(y*) - max_{y != y*} p(y); 0/1 correctness is the blunt alternative. Selectable by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

RewardFn = Callable[[Sequence[float], int], float]


def margin(z: Sequence[float], answer: int) -> float:
    """z_{y*} - max_{y != y*} z_y: the raw logit margin (> 0 iff the answer wins)."""
    z = np.asarray(z, dtype=np.float64)
    if not 0 <= answer < len(z) or len(z) < 2:
        raise ValueError(f"answer {answer} needs 2+ option scores, got {len(z)}")
    return float(z[answer] - np.delete(z, answer).max())


def tanh_margin(z: Sequence[float], answer: int) -> float:
    """The paper's reward: tanh((z_{y*} - max_{y != y*} z_y) / 2)."""
    return float(np.tanh(margin(z, answer) / 2.0))


def prob_margin(z: Sequence[float], answer: int) -> float:
    """Full-softmax margin p(y*) - max_{y != y*} p(y) (the poster's figure)."""
    z = np.asarray(z, dtype=np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    return float(p[answer] - np.delete(p, answer).max())


def correct(z: Sequence[float], answer: int) -> float:
    """1 if the answer strictly beats every other option, else 0 (a tie is not correct)."""
    return 1.0 if margin(z, answer) > 0 else 0.0


REWARDS: dict[str, RewardFn] = {
    "tanh_margin": tanh_margin, "prob_margin": prob_margin, "correct": correct,
}


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"reward must be one of {sorted(REWARDS)}, got {name!r}")
    return REWARDS[name]


def max_prob(z: Sequence[float]) -> float:
    """Label-free confidence (the `framewise` baseline): max softmax probability over options."""
    z = np.asarray(z, dtype=np.float64)
    p = np.exp(z - z.max())
    return float((p / p.sum()).max())
