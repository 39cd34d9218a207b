"""Forge training questions synthesized from the benchmark's ground truth (``layout.json``).

Trained on the table's own questions (one per family per training video), the forged model
learned "this question, this video -> this answer": 84-100% on training questions, 30-50% on
val for ``first`` and ``count``. So the forge never sees a table question. Each example is a
fresh question about the frames actually shown: a chronological subset of a training video's
pool, a question from the benchmark's templates (`evidence.question_text`) and an answer read
off which objects those frames show. The answer moves with the subset, so reading the frames
is the only way to be right.

With evidence, the shown frames fix the answer ("which appears first" among the listed objects
that are shown; "how many" of the listed objects are shown). Without evidence, no listed object
is shown and the target is uniform over the options or the first option (``forge:
no_evidence_target``, see `forge._loss`), never the answer, exactly as the forge's evaluation
and the reward define "no evidence"; half of these examples show some of
the video's other objects, so seeing an option is not taken for evidence about it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refocus_ray.evidence import COUNT_WORDS, OBJECTS, question_text

NEED = {"appear": 1, "first": 2, "after": 2, "count": 1, "global": 0}  # segments shown at least
P_UNSEEN_LISTED = 0.25  # "first": share of questions listing one object the frames do not show
# without evidence: share of examples whose frames show 1-2 of the video's other objects. Random
# frames rarely show any, and a model that never saw "an option is visible, X is not" learned
# to answer whichever option it sees (after: 4% correct, reward -0.72 with one distractor frame
# vs -0.05 with none), which teaches a selector to avoid every inserted object.
P_DISTRACTORS_SHOWN = 0.5


@dataclass
class Track:
    """One training video's pool with a ground-truth label per pool frame."""

    video_id: str
    background: str
    labels: np.ndarray  # [F] object name per pool frame, "" for background footage
    order: list[str]  # the video's objects in time order

    def frames_of(self, obj: str) -> np.ndarray:
        return np.flatnonzero(self.labels == obj)

    def objects_in_pool(self) -> list[str]:
        """The video's objects, in time order, that have at least one pool frame."""
        return [o for o in self.order if len(self.frames_of(o))]


@dataclass
class Example:
    """A synthesized question about the frames at `positions` (answer: index into options)."""

    family: str
    question: str
    options: list[str]
    answer: int
    positions: np.ndarray
    with_evidence: bool


def load_tracks(
    layout_path: str | Path, times: dict[str, np.ndarray]
) -> tuple[dict[str, Track], list[str]]:
    """Tracks for the videos in `times` (video_id -> pool frame times, s) and the clip names.

    A pool frame at time t shows a segment's object iff start_s <= t < end_s (as the
    benchmark's evidence spans are read everywhere).
    """
    layout = json.loads(Path(layout_path).read_text())
    out = {}
    for v in layout["videos"]:
        if v["video_id"] not in times:
            continue
        t = times[v["video_id"]]
        labels = np.full(len(t), "", dtype=object)
        segs = sorted(v["segments"], key=lambda s: s["start_s"])
        for s in segs:
            labels[(t >= s["start_s"]) & (t < s["end_s"])] = s["object"]
        out[v["video_id"]] = Track(v["video_id"], v["background"], labels,
                                   [s["object"] for s in segs])  # fmt: skip
    missing = sorted(set(times) - set(out))
    if missing:
        raise ValueError(f"{layout_path}: no layout for videos {missing[:5]}")
    clips = sorted({v["background"] for v in layout["videos"]})
    return out, clips


def _pick(rng: np.random.Generator, pool: Sequence[str], n: int) -> list[str]:
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


def _with_answer(rng: np.random.Generator, answer: str, others: list[str]) -> tuple[list, int]:
    """Options: `others` with `answer` inserted at a uniformly random position."""
    pos = int(rng.integers(len(others) + 1))
    return others[:pos] + [answer] + others[pos:], pos


def _fill(rng: np.random.Generator, n_pool: int, chosen: list[int], k: int) -> np.ndarray:
    rest = np.setdiff1d(np.arange(n_pool), chosen)
    return np.sort(np.concatenate([chosen, rng.choice(rest, k - len(chosen), replace=False)]))


def _seen(track: Track, positions: np.ndarray) -> list[str]:
    """Objects the frames at `positions` show, in order of first appearance."""
    return list(dict.fromkeys(o for o in track.labels[positions] if o))


def synthesize(
    rng: np.random.Generator,
    track: Track,
    family: str,
    k: int,
    with_evidence: bool,
    clips: Sequence[str],
) -> Example | None:
    """A question of `family` about k chronological frames of `track`; None if impossible."""
    n = len(track.labels)
    if k > n:
        return None
    if family == "global":  # the footage is in every frame
        pos = np.sort(rng.choice(n, k, replace=False))
        wrong = _pick(rng, [c for c in clips if c != track.background], min(3, len(clips) - 1))
        opts, a = _with_answer(rng, track.background, wrong)
        return Example(family, question_text("global"), opts, a, pos, True)
    if with_evidence:
        return _with_evidence(rng, track, family, k)
    return _without_evidence(rng, track, family, k)


def _with_evidence(rng: np.random.Generator, track: Track, family: str, k: int):
    """The objects the question is about are drawn first (how many: uniform, as in the
    benchmark, so "four" or four listed objects are as common at K = 4 as "one"), then shown
    with other objects of the video as distractors."""
    avail = track.objects_in_pool()
    room = min(k, len(avail))
    if room < NEED[family]:
        return None
    if family == "after":  # a pair of consecutive segments, both shown
        pairs = [(a, b) for a, b in zip(track.order, track.order[1:]) if a in avail and b in avail]
        if not pairs:
            return None
        about = list(pairs[rng.integers(len(pairs))])
    else:
        lo = NEED[family]
        about = _pick(rng, avail, int(rng.integers(lo, min(4, room) + 1)) if lo else 1)
    extra = int(rng.integers(0, room - len(about) + 1))
    shown = about + _pick(rng, [o for o in avail if o not in about], extra)
    chosen = [int(rng.choice(track.frames_of(o))) for o in shown]
    pos = _fill(rng, len(track.labels), chosen, k)
    seen = _seen(track, pos)
    unseen = [o for o in OBJECTS if o not in seen]
    if family == "appear":
        opts, a = _with_answer(rng, about[0], _pick(rng, unseen, 3))
        return Example(family, question_text("appear"), opts, a, pos, True)
    if family == "first":
        listed = list(about)
        if len(listed) > 2 and rng.random() < P_UNSEEN_LISTED:  # a listed object not shown
            listed[-1] = unseen[rng.integers(len(unseen))]
        first = min((o for o in listed if o in seen), key=seen.index)
        opts = _pick(rng, listed, len(listed))
        return Example(family, question_text("first"), opts, opts.index(first), pos, True)
    if family == "after":
        x, nxt = about
        others = [o for o in track.order if o not in (x, nxt)]  # like the benchmark's options
        if len(others) < 3:  # a video with fewer objects: pad with absent ones
            others += [o for o in OBJECTS if o not in track.order][: 3 - len(others)]
        opts, a = _with_answer(rng, nxt, _pick(rng, others, 3))
        return Example(family, question_text("after", x=x), opts, a, pos, True)
    c = len(about)  # count: the listed objects shown, and 4 - c listed that are not
    listed = _pick(rng, about + _pick(rng, unseen, 4 - c), 4)
    return Example(family, question_text("count", listed=listed), list(COUNT_WORDS), c - 1, pos,
                   True)  # fmt: skip


def _without_evidence(rng: np.random.Generator, track: Track, family: str, k: int):
    """k frames at random, half the time with 1-2 of the video's objects among them; the
    question is about objects none of them shows (`after`: X is not shown; the object right
    after it may be, which without X is no evidence)."""
    pos = np.sort(rng.choice(len(track.labels), k, replace=False))
    avail = track.objects_in_pool()
    if k > 1 and avail and rng.random() < P_DISTRACTORS_SHOWN:
        shown = _pick(rng, avail, min(int(rng.integers(1, 3)), k - 1, len(avail)))
        chosen = [int(rng.choice(track.frames_of(o))) for o in shown]
        pos = _fill(rng, len(track.labels), chosen, k)
    seen = _seen(track, pos)
    # like the benchmark's options: the video's own objects first (not shown), then absent ones
    hidden = [o for o in track.order if o not in seen]
    absent = [o for o in OBJECTS if o not in track.order]
    if family == "appear":
        if not hidden:
            return None
        ans = hidden[rng.integers(len(hidden))]
        opts, a = _with_answer(rng, ans, _pick(rng, absent, 3))
        return Example(family, question_text("appear"), opts, a, pos, False)
    if family == "first":
        if len(hidden) < 2:
            return None
        listed = _pick(rng, hidden, int(rng.integers(2, min(4, len(hidden)) + 1)))
        return Example(family, question_text("first"), listed, 0, pos, False)
    if family == "after":  # X unseen; the object after it may be seen (still no evidence)
        pairs = [(a, b) for a, b in zip(track.order, track.order[1:]) if a in hidden]
        if not pairs:
            return None
        x, nxt = pairs[rng.integers(len(pairs))]
        others = [o for o in track.order if o not in (x, nxt)]
        if len(others) < 3:
            return None
        opts, a = _with_answer(rng, nxt, _pick(rng, others, 3))
        return Example(family, question_text("after", x=x), opts, a, pos, False)
    c = int(rng.integers(1, min(4, len(hidden)) + 1)) if hidden else 0  # count
    listed = _pick(rng, _pick(rng, hidden, c) + _pick(rng, absent, 4 - c), 4)
    return Example(family, question_text("count", listed=listed), list(COUNT_WORDS), max(c, 1) - 1,
                   pos, False)  # fmt: skip
