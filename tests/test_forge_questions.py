"""Forge training questions: the answer is what the frames shown say, for every family."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refocus_ray import forge_questions as fq
from refocus_ray.evidence import COUNT_WORDS, OBJECTS

ORDER = ["cat", "moon", "page", "clock", "horse"]  # a video's objects in time order
CLIPS = ["bikes", "bunny", "phone", "street"]


def _track() -> fq.Track:
    """A 100-frame pool: each object shows on 3 frames at 10, 30, 50, 70, 90."""
    labels = np.full(100, "", dtype=object)
    for i, o in enumerate(ORDER):
        labels[10 + 20 * i : 13 + 20 * i] = o
    return fq.Track("v", "bikes", labels, ORDER)


def _listed(ex: fq.Example) -> list[str]:
    if ex.family == "count":
        return ex.question.split(": ")[1].rstrip("?").split(", ")
    return ex.options


@pytest.mark.parametrize("family", ["appear", "first", "after", "count"])
def test_with_evidence_answers_follow_the_frames_shown(family):
    rng, track = np.random.default_rng(0), _track()
    for _ in range(300):
        k = int(rng.choice([4, 8, 16]))
        ex = fq.synthesize(rng, track, family, k, True, CLIPS)
        assert ex is not None and ex.with_evidence
        pos = ex.positions
        assert len(pos) == k and np.all(np.diff(pos) > 0) and pos.max() < 100
        seen = [o for o in dict.fromkeys(track.labels[pos]) if o]
        answer = ex.options[ex.answer]
        if family == "appear":  # exactly one option is shown: the answer
            assert [o for o in ex.options if o in seen] == [answer]
        elif family == "first":  # the earliest shown among the listed
            assert answer == min((o for o in ex.options if o in seen), key=seen.index)
        elif family == "after":  # the next object shown after the anchor
            x = ex.question.removeprefix("Which object appears right after the ").rstrip("?")
            assert seen[seen.index(x) + 1] == answer
        else:
            assert ex.options == list(COUNT_WORDS)
            assert ex.answer + 1 == sum(o in seen for o in _listed(ex))


@pytest.mark.parametrize("family", ["appear", "first", "after", "count"])
def test_without_evidence_no_listed_object_is_shown(family):
    """...and often other objects of the video are: seeing an option is not evidence for it."""
    rng, track = np.random.default_rng(1), _track()
    made = shows_others = after_answer_seen = 0
    for _ in range(200):
        ex = fq.synthesize(rng, track, family, 8, False, CLIPS)
        if ex is None:
            continue
        made += 1
        seen = set(track.labels[ex.positions]) - {""}
        shows_others += bool(seen)
        assert not ex.with_evidence
        if family == "after":
            x = ex.question.removeprefix("Which object appears right after the ").rstrip("?")
            assert x not in seen  # the answer may be seen: without X it is no evidence
            after_answer_seen += ex.options[ex.answer] in seen
            assert ORDER.index(ex.options[ex.answer]) == ORDER.index(x) + 1
        else:
            assert not seen & set(_listed(ex))
        assert set(_listed(ex)) <= set(OBJECTS)
    assert made > 150
    assert shows_others > 0.3 * made
    assert family != "after" or after_answer_seen > 0.05 * made


def test_global_names_the_footage_and_impossible_requests_are_none():
    rng, track = np.random.default_rng(2), _track()
    ex = fq.synthesize(rng, track, "global", 4, True, CLIPS)
    assert ex.options[ex.answer] == "bikes" and sorted(ex.options) == CLIPS
    assert fq.synthesize(rng, track, "first", 1, True, CLIPS) is None  # 2 segments, K = 1
    assert fq.synthesize(rng, track, "appear", 101, True, CLIPS) is None  # K > pool


def test_load_tracks_labels_pool_frames_by_span(tmp_path):
    layout = {"videos": [{"video_id": "v", "background": "bunny", "segments": [
        {"object": "moon", "start_s": 2.0, "end_s": 3.0},
        {"object": "cat", "start_s": 0.5, "end_s": 1.0}]}]}  # fmt: skip
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    times = np.arange(0, 4, 0.5)  # 0, 0.5, ..., 3.5
    tracks, clips = fq.load_tracks(tmp_path / "layout.json", {"v": times})
    assert clips == ["bunny"] and tracks["v"].order == ["cat", "moon"]
    assert tracks["v"].labels.tolist() == ["", "cat", "", "", "moon", "moon", "", ""]
    with pytest.raises(ValueError, match="no layout for videos"):
        fq.load_tracks(tmp_path / "layout.json", {"w": times})


def test_count_answers_are_balanced_even_at_small_k():
    """Like the benchmark's, "four" is as common as "one" at K = 4 (all four listed shown)."""
    rng, track = np.random.default_rng(3), _track()
    answers = [fq.synthesize(rng, track, "count", 4, True, CLIPS).answer for _ in range(800)]
    shares = np.bincount(answers, minlength=4) / len(answers)
    assert shares.min() > 0.18, shares
