"""Reward formulas on hand-computed values, ties and more than four options."""

import math

import pytest

from refocus_ray.reward import correct, get_reward, margin, max_prob, prob_margin, tanh_margin


def test_tanh_margin_matches_paper_formula():
    z = [2.0, 0.5, -1.0, 1.0]
    assert tanh_margin(z, 0) == pytest.approx(math.tanh((2.0 - 1.0) / 2))
    assert tanh_margin(z, 2) == pytest.approx(math.tanh((-1.0 - 2.0) / 2))
    # equals the probability margin over the pair {y*, strongest distractor}
    a, b = math.exp(2.0), math.exp(1.0)
    assert tanh_margin(z, 0) == pytest.approx((a - b) / (a + b))


def test_ties_give_zero_reward_and_are_not_correct():
    z = [1.0, 1.0, 0.0]
    assert margin(z, 0) == 0 and tanh_margin(z, 0) == 0 and prob_margin(z, 0) == 0
    assert correct(z, 0) == 0.0


def test_more_than_four_options():
    z = [0.1, 0.2, 3.0, 0.3, 2.5, -4.0, 0.0]
    assert tanh_margin(z, 2) == pytest.approx(math.tanh(0.25))
    assert correct(z, 2) == 1.0 and correct(z, 4) == 0.0
    p = [math.exp(v) for v in z]
    s = sum(p)
    assert prob_margin(z, 2) == pytest.approx((p[2] - p[4]) / s)
    assert max_prob(z) == pytest.approx(p[2] / s)


def test_bounds_and_sign():
    for z, y in [([50.0, -50.0], 0), ([-50.0, 50.0], 0)]:
        r = tanh_margin(z, y)
        assert -1 <= r <= 1 and (r > 0) == (correct(z, y) == 1)


def test_unknown_reward_and_bad_answer():
    with pytest.raises(ValueError, match="reward must be one of"):
        get_reward("accuracy")
    with pytest.raises(ValueError, match="answer 3"):
        margin([0.0, 1.0], 3)
