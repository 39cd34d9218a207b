"""The evidence-video benchmark: layout rules, answers by construction, determinism, real mp4s."""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations, pairwise
from pathlib import Path

import numpy as np
import pytest

from refocus_ray.dataset import SCHEMA, read_table
from refocus_ray.evidence import (
    K_VALUES,
    EvidenceConfig,
    analytic_hit_rate,
    clip_paths,
    compute_stats,
    generate,
    load_clip,
    object_variant,
    plan,
    rows,
    uniform_hit_rate,
)

TINY = EvidenceConfig(videos=6, min_duration_s=30.0, max_duration_s=40.0, workers=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, list[dict], dict]:
    path = generate(tmp_path_factory.mktemp("evidence"), TINY, progress=False)
    layout = json.loads((path.parent / "layout.json").read_text())
    return path, read_table(path).to_pylist(), {v["video_id"]: v for v in layout["videos"]}


@pytest.fixture(scope="module")
def moderate():
    """200 planned (not rendered) videos: enough for rates and balance."""
    return plan(EvidenceConfig(videos=200))


def _key(span: dict) -> tuple[float, float]:
    return span["start_s"], span["end_s"]


def test_schema_and_ids(data):
    path, rs, layout = data
    assert read_table(path).schema.equals(SCHEMA)
    assert {r["split"] for r in rs} == {"train", "val", "test"}
    for r in rs:
        assert r["question_id"] == f"{r['video_id']}_{r['family']}"
        assert r["video_path"] == f"videos/{r['video_id']}.mp4"
        assert (path.parent / r["video_path"]).is_file()
        assert all(len(o.split()) == 1 and o.islower() for o in r["options"])
        assert r["duration_s"] == layout[r["video_id"]]["duration_s"]


def test_segments_layout(data):
    _, rs, layout = data
    for v in layout.values():
        segs = v["segments"]
        assert 5 <= len(segs) <= 6 and len({s["object"] for s in segs}) == len(segs)
        for s in segs:
            assert 0.01 <= (s["end"] - s["start"]) / v["n_frames"] <= 0.03
            assert 0 <= s["start"] < s["end"] <= v["n_frames"]
        assert all(a["end"] <= b["start"] for a, b in pairwise(segs))
    for r in rs:
        if r["family"] == "global":
            assert r["evidence"] == [{"start_s": 0.0, "end_s": r["duration_s"]}]
            continue
        assert 2 <= len(r["distractors"]) <= 4, r["question_id"]
        spans = {(s["start_s"], s["end_s"]) for s in layout[r["video_id"]]["segments"]}
        got = [_key(s) for s in r["evidence"] + r["distractors"]]
        assert len(got) == len(set(got)) and set(got) == spans


def test_multi_segment_share(data, moderate):
    for rs in (data[1], rows(moderate)):
        assert np.mean([len(r["evidence"]) >= 2 for r in rs]) >= 0.5


def test_answers_by_construction(data):
    _, rs, layout = data
    for r in rs:
        v = layout[r["video_id"]]
        obj = {(s["start_s"], s["end_s"]): s["object"] for s in v["segments"]}
        present = set(obj.values())
        ev = [obj.get(_key(s)) for s in r["evidence"]]
        answer = r["options"][r["answer"]]
        if r["family"] == "appear":
            assert ev == [answer] and not present & (set(r["options"]) - {answer})
        elif r["family"] == "first":
            assert set(ev) == set(r["options"]) and 2 <= len(ev) <= 4
            assert answer == ev[0]  # evidence is in time order
        elif r["family"] == "after":
            order = [s["object"] for s in v["segments"]]
            x = r["question"].rstrip("?").split()[-1]
            assert ev == [x, answer] and order.index(answer) == order.index(x) + 1
            assert set(r["options"]) <= present and x not in r["options"]
        elif r["family"] == "count":
            listed = r["question"].split(": ")[1].rstrip("?").split(", ")
            assert len(listed) == 4 and set(ev) == present & set(listed)
            assert r["options"] == ["one", "two", "three", "four"] and r["answer"] + 1 == len(ev)
        else:
            assert r["family"] == "global" and answer == v["background"]


def test_answer_positions_balanced(moderate):
    pos = Counter((r["family"], r["answer"]) for r in rows(moderate))
    for fam in ("appear", "after", "count", "global"):
        counts = [pos[(fam, i)] for i in range(4)]
        assert max(counts) - min(counts) <= 3, (fam, counts)


def test_splits_use_disjoint_background(moderate):
    used: dict[str, dict[str, list]] = {}
    for p in moderate:
        used.setdefault(p.background, {}).setdefault(p.split, []).extend(
            (c.start_s, c.end_s) for c in p.pieces
        )
    for clip, by_split in used.items():
        for a, b in combinations(by_split, 2):
            for s0, e0 in by_split[a]:
                assert all(e0 <= s1 or e1 <= s0 for s1, e1 in by_split[b]), (clip, a, b)


def test_uniform_hit_rate_matches_analytic(moderate):
    rs = rows(moderate)
    for k in K_VALUES:
        for require_all in (False, True):
            measured = uniform_hit_rate(rs, k, 8.0, require_all=require_all)
            assert abs(measured - analytic_hit_rate(rs, k, require_all)) < 0.1, (k, require_all)
    assert uniform_hit_rate(rs, 4, 8.0) < 0.25  # small K usually misses the evidence


def test_videos_decode_with_objects_in_place(data):
    import decord

    path, _, layout = data
    for v in layout.values():
        vr = decord.VideoReader(str(path.parent / "videos" / f"{v['video_id']}.mp4"))
        assert len(vr) == v["n_frames"] and vr.get_avg_fps() == pytest.approx(8.0)
        seg = v["segments"][0]
        frame = vr[(seg["start"] + seg["end"]) // 2].asnumpy()
        assert frame.shape == (120, 160, 3)
        want = object_variant(seg["object"], seg["variant"], TINY.size)
        assert np.abs(frame.astype(float) - want).mean() < 12  # the object, up to h264 loss


def test_same_seed_same_bytes_and_frames(data, tmp_path):
    import decord

    path, _, _ = data
    # fresh worker processes, a different worker count: the output must not change
    again = generate(tmp_path, EvidenceConfig(**{**vars(TINY), "workers": 2}), progress=False)
    assert again.read_bytes() == path.read_bytes()
    assert (tmp_path / "layout.json").read_bytes() == (path.parent / "layout.json").read_bytes()
    name = "videos/test_0000.mp4"
    a, b = (decord.VideoReader(str(d / name)) for d in (path.parent, tmp_path))
    assert np.array_equal(
        a.get_batch(range(len(a))).asnumpy(), b.get_batch(range(len(b))).asnumpy()
    )
    assert (path.parent / name).read_bytes() == (tmp_path / name).read_bytes()
    other = plan(EvidenceConfig(**{**vars(TINY), "seed": 1}))
    assert rows(other) != read_table(path).to_pylist()


def test_compute_stats(data, capsys):
    path, rs, _ = data
    stats = compute_stats(path)
    assert json.loads((path.parent / "stats.json").read_text()) == stats
    assert stats["n_questions"] == len(rs) and stats["n_videos"] == 6
    assert sum(s["questions"] for s in stats["per_split"].values()) == len(rs)
    assert set(stats["uniform"]) == {"4", "8", "16", "32"}
    assert set(stats["uniform"]["8"]) == {
        "uniform_hit_rate",
        "uniform_hit_rate_analytic",
        "uniform_hit_rate_all",
        "uniform_hit_rate_all_analytic",
    }
    assert "uniform sampling" in capsys.readouterr().out


def test_background_clips_split_by_time():
    clips = clip_paths()
    assert {"bunny", "bikes", "phone"} <= set(clips)
    clip = load_clip(str(clips["bunny"]), TINY.size)
    ranges = [clip.split_range(s, TINY.clip_cuts) for s in ("train", "val", "test")]
    assert ranges[0][0] == 0 and ranges[-1][1] == clip.duration_s
    assert all(a[1] == b[0] for a, b in pairwise(ranges))


@pytest.mark.parametrize(
    "bad",
    [
        {"videos": 0},
        {"size": (161, 120)},
        {"split_fractions": (0.5, 0.5, 0.5)},
        {"segment_fraction": (0.03, 0.01)},
        {"min_duration_s": 5.0, "max_duration_s": 5.0},
        {"clip_cuts": (0.8, 0.6)},
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="EvidenceConfig"):
        EvidenceConfig(**bad)


def test_families_narrow_the_questions_not_the_videos():
    """`data.families` keeps the benchmark's videos and their questions of those families, so a
    narrowed benchmark's test questions are the full benchmark's, not other ones."""
    full = plan(EvidenceConfig(videos=30))
    only = plan(EvidenceConfig(videos=30, families=("appear", "first")))
    assert [(p.video_id, p.segments) for p in only] == [(p.video_id, p.segments) for p in full]
    kept = [q for p in full for q in p.questions if q["family"] in ("appear", "first")]
    assert [q for p in only for q in p.questions] == kept
    assert {q["family"] for q in kept} == {"appear", "first"}


def test_videos_without_a_question_of_the_families_are_not_rendered(tmp_path):
    """A narrowed benchmark writes only the videos its table reads (about half the videos have
    no `appear` question: six objects leave too few absent ones for its options)."""
    cfg = EvidenceConfig(videos=8, min_duration_s=8.0, max_duration_s=10.0, workers=1,
                         families=("appear",))
    planned = plan(cfg)
    path = generate(tmp_path, cfg, progress=False)
    used = set(read_table(path).column("video_id").to_pylist())
    assert used == {p.video_id for p in planned if p.questions}
    assert 0 < len(used) < len(planned)
    assert {f.stem for f in (tmp_path / "videos").glob("*.mp4")} == used


def test_more_training_videos_keep_the_val_and_test_videos():
    """The embedded config grows train only (560 videos at 0.8 / 0.075 / 0.125 has the val and
    test videos of 280 at the default shares): results stay comparable across the two."""
    small = plan(EvidenceConfig(videos=20))  # 12 / 3 / 5
    big = plan(EvidenceConfig(videos=40, split_fractions=(0.8, 0.075, 0.125)))  # 32 / 3 / 5

    def by_split(plans, split):
        return [(p.video_id, p.segments, p.pieces, p.questions) for p in plans if p.split == split]

    for split in ("val", "test"):
        assert by_split(big, split) == by_split(small, split) and by_split(small, split)
    assert by_split(big, "train")[:12] == by_split(small, "train")
    assert len(by_split(big, "train")) == 32


def test_cli_names_bad_split_fractions(tmp_path):
    from refocus_ray.cli import main

    with pytest.raises(SystemExit, match="split_fractions must sum to 1"):
        main(["data", "evidence", "--out", str(tmp_path), "--videos", "10",
              "--split-fractions", "0.5", "0.5", "0.5"])
    assert not any(tmp_path.iterdir())  # nothing written


def test_default_config_is_big_enough():
    cfg = EvidenceConfig()
    counts = cfg.split_counts()
    assert sum(counts.values()) == cfg.videos and counts["test"] >= 67  # >= 300 questions at 4.5
