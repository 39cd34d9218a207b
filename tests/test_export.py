"""Export: the released evaluation's shelve DBs, Parquet and JSONL, read back with the standard
library and numpy only, checked against DESIGN.md's export format.

The run directory holds real clips and a feature cache written in its real on-disk format
(`features.write_pool`, real pool frame numbers) with seeded random feature vectors: an
untrained policy only needs features of the right shape, and this keeps the module free of Ray.
"""

from __future__ import annotations

import json
import shelve

import numpy as np
import pytest
import yaml

from refocus_ray import cli, features, policy
from refocus_ray.config import file_hash, load_config
from refocus_ray.export import export, frame_indices, lmms_docs_key_fn, shelve_key
from refocus_ray.features import PoolFeatures
from refocus_ray.video import pool_indices

CLIPS = {"short": (80, 8.0), "mid": (1000, 25.0), "long": (1000, 5.0)}  # n_frames, fps
MAX_FRAMES, FALLBACK = 48, 40  # pools: short 40 (<= fallback: uniform), mid/long 48


@pytest.fixture(scope="module")
def run(tmp_path_factory, clip_dir):
    d = tmp_path_factory.mktemp("export")
    rows = []
    for i, name in enumerate(CLIPS):
        for j in range(2):
            rows.append({"question_id": f"{name}-{j}", "video_id": name,
                         "video_path": str(clip_dir / f"{name}.mp4"),
                         "question": f"Which object appears ({j})?",
                         "options": ["cat", "moon", "page", "coffee"], "answer": (i + j) % 4,
                         "split": "test", "family": "appear",
                         "evidence": [{"start_s": 1.0, "end_s": 2.0}]})
    (d / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"run_dir": str(d / "run"), "data": {"kind": "table", "table": str(d / "qa.jsonl")},
           "encoders": {"frame_size": 64},
           "pool": {"max_frames": MAX_FRAMES, "uniform_fallback_frames": FALLBACK}}
    (d / "cfg.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(d / "cfg.yaml")
    cache = features.frame_cache_dir(cfg)
    cache.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (n, fps) in CLIPS.items():
        idx = pool_indices(n, fps, MAX_FRAMES, cfg.pool.max_fps)
        feats = rng.standard_normal((len(idx), 1280)).astype(np.float32)
        features.write_pool(cache / f"{file_hash(clip_dir / f'{name}.mp4')}.parquet",
                            PoolFeatures(idx, idx / fps, feats, fps, n))
    features.prepare_questions(cfg)
    pdir = policy.save(policy.SelectorPolicy(policy.PolicyConfig(d_model=32, n_layers=1,
                                                                 n_heads=2)), d / "policy")
    return cfg, d, rows, pdir


def _read(path) -> dict:
    with shelve.open(str(path), "r") as db:
        return {k: db[k] for k in db}


def test_frame_indices_match_the_released_script():
    frame_idx = np.array([0, 10, 20, 30, 40, 50, 60, 70])
    cand = np.array([[5, 1, 7, 2], [0, 1, 2, 3]], np.int32)
    np.testing.assert_array_equal(frame_indices(frame_idx, cand, 3, 4), [10, 50, 70])
    np.testing.assert_array_equal(frame_indices(frame_idx, cand, 3, 4, candidate=1), [0, 10, 20])
    uniform = np.linspace(0, 70, 3, dtype=int)
    np.testing.assert_array_equal(frame_indices(frame_idx, None, 3, 4), uniform)
    np.testing.assert_array_equal(frame_indices(frame_idx, cand, 3, 8), uniform)  # F <= fallback
    with pytest.raises(ValueError, match="--steps"):
        frame_indices(frame_idx, cand, 5, 4)


def test_cli_export_round_trip(run, capsys):
    cfg, d, rows, pdir = run
    out = d / "out"
    assert cli.main(["export", "--config", str(d / "cfg.yaml"), "--checkpoint", str(pdir),
                     "--k", "4", "8", "--rollouts", "4", "--steps", "32", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_questions"] == 6 and summary["uniform_fallback"] == {"4": 2, "8": 2}

    pools = features.load_pools(cfg)
    sel = _read(out / "selection" / "DB")
    assert len(sel) == 6
    by_qid = {}
    for key, value in sel.items():
        context, doc = json.loads(key)
        assert key == json.dumps((context, doc))
        assert "image" not in doc and "video_path" not in doc
        assert context.startswith(doc["question"]) and "A. cat" in context
        by_qid[doc["question_id"]] = (key, value)
        pool = pools[doc["video_id"]]
        assert set(value) == {"frame_idx", "candidates", "distribution"}
        assert value["frame_idx"] == [int(f) for f in pool.frames]
        assert all(type(f) is int for f in value["frame_idx"])
        cand, dist = value["candidates"], value["distribution"]
        assert cand.dtype == np.int32 and cand.shape == (4, 32)
        assert cand.min() >= 0 and cand.max() < len(pool.frames)
        assert all(len(set(r.tolist())) == 32 for r in cand)  # no frame twice in a rollout
        assert dist.dtype == np.float16 and dist.shape == (len(pool.frames),)
        assert abs(float(np.exp(dist.astype(np.float64)).sum()) - 1) < 0.02  # log mean prob
    assert set(by_qid) == {r["question_id"] for r in rows}

    table = [json.loads(line) for line in (out / "selections.jsonl").read_text().splitlines()]
    import pyarrow.parquet as pq

    assert pq.read_table(out / "selections.parquet").to_pylist() == table
    assert {tuple(sorted(t)) for t in table} == {
        ("frame_indices", "k", "question_id", "timestamps_s", "video_id")}
    for k in (4, 8):
        fi = _read(out / "frameidx" / f"cand0_nf{k}" / "DB")
        assert set(fi) == set(sel)
        for qid, (key, value) in by_qid.items():
            frames = fi[key]
            assert isinstance(frames, np.ndarray) and frames.dtype.kind == "i"
            assert frames.shape == (k,) and (np.diff(frames) >= 0).all()
            f_idx = np.array(value["frame_idx"])
            if len(f_idx) <= FALLBACK:  # short: uniform over the pool's first..last frame
                expect = np.linspace(f_idx[0], f_idx[-1], k, dtype=int)
            else:
                expect = np.sort(f_idx[value["candidates"][0, :k]])
            np.testing.assert_array_equal(frames, expect)
            row = next(t for t in table if t["question_id"] == qid and t["k"] == k)
            assert row["frame_indices"] == frames.tolist()
            fps = pools[row["video_id"]].fps
            np.testing.assert_allclose(row["timestamps_s"], frames / fps)


def test_pool_shorter_than_rollout_has_no_candidates(run):
    cfg, d, _, pdir = run
    res = export(cfg, pdir, ks=[8], n_rollouts=2, steps=44, out_dir=d / "long-rollouts")
    assert res["no_candidates"] == 2  # the two questions on the 40-frame pool
    sel = _read(d / "long-rollouts" / "selection" / "DB")
    fi = _read(d / "long-rollouts" / "frameidx" / "cand0_nf8" / "DB")
    for key, v in sel.items():
        doc = json.loads(key)[1]
        if doc["video_id"] == "short":
            assert v["candidates"] is None and v["distribution"] is None
            np.testing.assert_array_equal(
                fi[key], np.linspace(v["frame_idx"][0], v["frame_idx"][-1], 8, dtype=int))
        else:
            assert v["candidates"].shape == (2, 44)


def test_lmms_eval_keys_and_determinism(run):
    cfg, d, rows, pdir = run
    docs = d / "lmms_docs.jsonl"
    with docs.open("w") as f:
        for r in rows:
            doc = {"video": f"{r['video_id']}.mp4", "question": r["question"],
                   "image": "not part of the key", "qid": r["question_id"]}
            context = f"<video>\n{r['question']}\nAnswer:"
            line = {"question_id": r["question_id"], "context": context, "doc": doc}
            f.write(json.dumps(line) + "\n")
    for out in ("lmms-a", "lmms-b"):
        export(cfg, pdir, ks=[4], key_fn=lmms_docs_key_fn(docs), out_dir=d / out)
    a, b = (_read(d / out / "frameidx" / "cand0_nf4" / "DB") for out in ("lmms-a", "lmms-b"))
    expect = {shelve_key(f"<video>\n{r['question']}\nAnswer:",
                         {"video": f"{r['video_id']}.mp4", "question": r["question"],
                          "qid": r["question_id"]}) for r in rows}
    assert set(a) == expect
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same seed, same frames
