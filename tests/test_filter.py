"""The reward-variance data filter: window geometry by hand, config errors, and the stage end to
end on real clips scored by the reward pool (a real vLLM engine on the random-init plumbing
Idefics3), including what `train.table: filtered` then trains on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refocus_ray.config import ConfigError, load_config
from refocus_ray.filtering import (
    LazyScorer,
    configuration_positions,
    configurations,
    filter_config,
)

# ----------------------------------------------------------------------------- geometry


def test_windows_are_25_percent_at_12_5_percent_stride_and_wrap():
    conf = configurations(16)
    assert len(conf) == 16
    windows, complements = conf[:8], conf[8:]
    # 16 frames: window i = frames [2i, 2i + 4) of the circular timeline, in arc order
    for i in range(7):
        assert windows[i].tolist() == [2 * i, 2 * i + 1, 2 * i + 2, 2 * i + 3]
    assert windows[7].tolist() == [14, 15, 0, 1]  # the last window wraps around the end
    # a complement is the rest of the pool, starting where its window ends
    assert complements[0].tolist() == list(range(4, 16))
    assert complements[7].tolist() == list(range(2, 14))
    assert complements[6].tolist() == list(range(12))  # window 6 = [12, 16): no wrap
    for w, c in zip(windows, complements):
        assert sorted([*w, *c]) == list(range(16)) and not set(w) & set(c)
    # the paper's pool: 128 frames -> 32 per window, starting every 16
    big = configurations(128)
    assert [len(w) for w in big[:8]] == [32] * 8 and [w[0] for w in big[:8]] == list(range(0, 128, 16))
    # a pool not divisible by 8: every frame still lies in exactly two windows
    odd = configurations(10)
    counts = np.bincount(np.concatenate(odd[:8]), minlength=10)
    assert counts.tolist() == [2] * 10
    assert all(len(w) in (2, 3) for w in odd[:8])


def test_k_frames_per_configuration_sorted_distinct_inside():
    pos = configuration_positions(16, 3)
    # evenly along the arc, endpoints included: window 7 = arc [14, 15, 0, 1] -> 14, 15, 1
    assert pos[7].tolist() == [1, 14, 15]
    assert pos[8].tolist() == [4, 9, 15]  # complement of window 0: arc 4..15
    assert pos[0].tolist() == [0, 1, 3]
    for conf, p in zip(configurations(128), configuration_positions(128, 8)):
        assert len(p) == 8 and len(set(p.tolist())) == 8
        assert p.tolist() == sorted(p.tolist()) and set(p.tolist()) <= set(conf.tolist())
    # a configuration smaller than K shows all of its frames
    small = configuration_positions(16, 8)
    assert [len(p) for p in small] == [4] * 8 + [8] * 8
    with pytest.raises(ValueError, match="at least 4"):
        configuration_positions(3, 2)


# ------------------------------------------------------------------------------- config


@pytest.mark.parametrize("section, message", [
    ({"threshold": -0.1}, "filter.threshold: must be >= 0"),
    ({"k": 9}, "filter.k: 9 frames do not fit a 25% window"),  # pool.max_frames=32 -> 8
    ({"k": 0}, "filter.k: must be >= 1"),
    ({"splits": ["dev"]}, "filter.splits"),
    ({"thresh": 0.1}, "filter.thresh: unknown key"),
])
def test_bad_filter_config_names_the_key(section, message):
    cfg = load_config(None, {"pool.max_frames": 32, "filter": section})
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        filter_config(cfg)


def test_cli_reports_bad_config_before_starting_anything():
    from refocus_ray.cli import main

    with pytest.raises(SystemExit, match=r"config error: filter\.threshold"):
        main(["filter", "--config", "configs/embedded.yaml", "--set", "filter.threshold=-1"])


def test_train_table_choice():
    from refocus_ray.train import training_config

    cfg = load_config(None, {"run_dir": "/nonexistent/run"})
    assert training_config(cfg).table_path() == cfg.table_path()  # default: the run's table
    with pytest.raises(ConfigError, match=r"train\.table: must be one of"):
        training_config(load_config(None, {"train": {"table": "kept"}}))
    with pytest.raises(FileNotFoundError, match="refocus filter"):
        training_config(load_config(None, {"run_dir": "/nonexistent/run",
                                           "train": {"table": "filtered"}}))


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def filter_cfg(run_cfg, clip_dir, plumbing_reference, tmp_path_factory):
    """The run's train/val questions with families and relative video paths, plus one whose
    video could not be prepared (a text file named .mp4: no cached pool)."""
    from refocus_ray.dataset import SCHEMA, read_table

    d = tmp_path_factory.mktemp("filter-data")
    rows = [r for r in read_table(run_cfg.table_path()).to_pylist() if r["split"] != "test"]
    rows.append({**rows[0], "question_id": "broken-q", "video_id": "notes",
                 "video_path": str(clip_dir / "notes.mp4")})
    for r in rows:
        r["family"] = "global" if r["question"] == "What is shown?" else "appear"
        r["video_path"] = os.path.relpath(r["video_path"], d)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), d / "qa.parquet")
    return {"run_dir": run_cfg.run_dir, "data.kind": "table", "data.table": str(d / "qa.parquet"),
            "encoders.frame_size": 64, "pool.max_frames": 32, "reference": plumbing_reference}


@pytest.mark.vllm
def test_filter_stage_end_to_end(filter_cfg, scorer):
    from envs.frame_selection import QuerySource, load_query_table
    from refocus_ray.dataset import SCHEMA, read_table, resolve_video
    from refocus_ray.pipeline import filter_stage
    from refocus_ray.train import training_config

    cfg = load_config(None, {**filter_cfg, "filter": {"k": 4, "splits": ["train", "val"]}})
    res = filter_stage(cfg, scorer=scorer, progress=False)
    out = cfg.run_path / "filter"
    for name in ("kept.parquet", "filter_scores.parquet", "variance_hist.png",
                 "filter_summary.json", "stage.json"):
        assert (out / name).stat().st_size > 0, name

    scores = pq.read_table(out / "filter_scores.parquet").to_pylist()
    assert len(scores) == 10  # 9 train + 1 val; the broken one is skipped, not scored
    for s in scores:
        m = np.asarray(s["margins"])
        assert m.shape == (16,) and np.all(np.abs(m) < 1)  # tanh margins
        assert s["variance"] == pytest.approx(np.var(m))  # population variance
        assert s["kept"] == (s["variance"] > 0.2)
    # the model reads the frames: the 16 configurations do not all give the same margin
    assert max(s["variance"] for s in scores) > 0
    summary = json.loads((out / "filter_summary.json").read_text())
    assert summary["skipped"].keys() == {"broken-q"} and "no cached pool" in summary["skipped"]["broken-q"]
    assert res["skipped"] == 1 and res["errors"] == 0 and summary["errors"] == {}
    assert set(summary["per_family"]) == {"global", "appear"}
    assert sum(f["n"] for f in summary["per_family"].values()) == 10

    # a threshold that splits the train questions: re-selects from the stored margins
    train_var = [s["variance"] for s in scores if s["split"] == "train"]
    threshold = float(np.median(train_var))
    before = sum(s["requests"] for s in scorer.stats())
    cfg = load_config(None, {**filter_cfg, "filter": {"k": 4, "splits": ["train", "val"],
                                                     "threshold": threshold}})
    lazy = LazyScorer(lambda: scorer)  # what the stage wraps its reward pool in
    res = filter_stage(cfg, scorer=lazy, progress=False)
    assert sum(s["requests"] for s in scorer.stats()) == before  # nothing scored again
    assert lazy.started is None  # so no engine would have been started
    expected = {s["question_id"] for s in scores if s["variance"] > threshold}
    kept_path = out / "kept.parquet"
    kept = read_table(kept_path)  # validates every row against the dataset schema
    assert pq.read_schema(kept_path).remove_metadata().equals(SCHEMA)
    assert set(kept.column("question_id").to_pylist()) == expected
    assert res["n_kept"] == len(expected) and 0 < len(expected) < 10
    summary = json.loads((out / "filter_summary.json").read_text())
    assert summary["kept_fraction"] == pytest.approx(len(expected) / 10)
    assert sum(f["kept"] for f in summary["per_family"].values()) == len(expected)
    for p in kept.column("video_path").to_pylist():  # rebased: relative to the kept table
        assert not Path(p).is_absolute() and resolve_video(kept_path, p).is_file()

    # train.table: filtered trains on exactly the kept train questions
    tcfg = training_config(load_config(None, {**filter_cfg, "train": {"table": "filtered"}}))
    assert tcfg.table_path() == kept_path and "table" not in tcfg.section("train")
    queries = load_query_table(QuerySource.of(tcfg, "train", min_frames=4)).queries
    assert {q.question_id for q in queries} == {
        s["question_id"] for s in scores if s["split"] == "train" and s["variance"] > threshold}


class FailOnVideo:
    """Injected fault: every call that includes a request on `video` raises (as a call on an
    unreadable video would); all other calls go to the real reward pool."""

    def __init__(self, inner, video: str) -> None:
        self.inner, self.video = inner, video

    def score(self, requests):
        if any(r.video.endswith(self.video) for r in requests):
            raise RuntimeError(f"{self.video}: injected decoding failure")
        return self.inner.score(requests)


@pytest.mark.vllm
def test_a_failing_question_is_reported_and_the_rest_kept(filter_cfg, scorer):
    from refocus_ray.pipeline import filter_stage

    cfg = load_config(None, {**filter_cfg, "filter": {"k": 2}})  # k=2: margins not stored yet
    res = filter_stage(cfg, scorer=FailOnVideo(scorer, "short.mp4"), progress=False)
    summary = json.loads((cfg.run_path / "filter" / "filter_summary.json").read_text())
    assert set(summary["errors"]) == {"short-q0", "short-q1", "short-q2"}
    assert "injected decoding failure" in summary["errors"]["short-q0"]
    assert res["n_scored"] == 6  # the other train questions, each scored once
    # the next run scores only what failed
    before = sum(s["requests"] for s in scorer.stats())
    cfg = load_config(None, {**filter_cfg, "filter": {"k": 2, "threshold": 0.19}})
    res = filter_stage(cfg, scorer=scorer, progress=False)
    assert sum(s["requests"] for s in scorer.stats()) - before == 3 * 16
    assert res["n_scored"] == 9 and res["errors"] == 0
