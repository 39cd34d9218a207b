"""Evaluation: the baselines' contracts, framewise never reads the answer, and `evaluate` end to
end on a tiny split (real clips, real features, a real vLLM reward pool on a random-init
Idefics3 in letter mode as the reference, the same weights through the transformers backend as
the answerer, an untrained policy), including resuming without new reference calls.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

from refocus_ray import cli, evaluate, selectors

for _k, _v in {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}.items():  # fmt: skip
    os.environ.setdefault(_k, _v)

OPTIONS = ["cat", "moon", "page", "coffee"]


def test_reforging_the_answering_model_reruns_evaluation(tmp_path):
    """The eval stage's fingerprint carries the record of every forge that answers: a re-forged
    answering model must not leave a stale report cached (it did until session 26)."""
    from refocus_ray.config import load_config

    (tmp_path / "qa.jsonl").write_text("{}\n")
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "model.safetensors").write_bytes(b"weights")
    raw = {"run_dir": str(tmp_path / "run"), "data": {"kind": "table",
                                                     "table": str(tmp_path / "qa.jsonl")},
           "reference": {"model": "forge"}, "answerer": {"model": "forge_answerer"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "cfg.yaml")
    fp = lambda: evaluate.fingerprint(cfg, tmp_path / "policy")
    for name in ("forge", "forge_answerer"):
        (cfg.run_path / name).mkdir(parents=True)
        (cfg.run_path / name / "stage.json").write_text('{"fingerprint": "a"}')
    before = fp()
    for name in ("forge_answerer", "forge"):
        (cfg.run_path / name / "stage.json").write_text('{"fingerprint": "b"}')
        assert fp() != before, f"{name} re-forged, the eval fingerprint unchanged"
        before = fp()
    assert fp() == before  # and nothing else moves it


# ------------------------------------------------------------------------ selector contracts


@pytest.mark.parametrize("f,k", [(1, 1), (7, 4), (40, 4), (48, 8), (128, 32), (512, 32)])
def test_uniform_is_the_paper_formula(f, k):
    np.testing.assert_array_equal(selectors.uniform(f, k), np.linspace(0, f - 1, k, dtype=int))


@pytest.mark.parametrize("f", [4, 9, 40, 128])
def test_baselines_pick_k_distinct_sorted_frames_in_the_pool(f):
    rng = np.random.default_rng(f)
    feats = rng.standard_normal((f, 1280)).astype(np.float32)
    for k in sorted({1, min(4, f), min(8, f), f}):
        picks = {
            "uniform": selectors.uniform(f, k),
            "random": selectors.random(f, k, rng),
            "diverse-medoid": selectors.diverse(feats, k, "medoid"),
            "diverse-first": selectors.diverse(feats, k, "first"),
            "relevance-diverse": selectors.relevance_diverse(feats, rng.random(f), k, 0.5),
            "framewise": selectors.framewise(rng.random(f), k),
        }
        for name, p in picks.items():
            assert len(p) == k and len(set(p.tolist())) == k, name
            assert (np.diff(p) > 0).all() and p.min() >= 0 and p.max() < f, name
    dup = np.repeat(feats[:2], 5, axis=0)  # identical frames: still K distinct positions
    assert len(set(selectors.diverse(dup, 6).tolist())) == 6
    with pytest.raises(ValueError, match="between 1 and the pool size"):
        selectors.diverse(feats, f + 1)


def test_diverse_covers_clusters_and_relevance_follows_the_text():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 64)) * 5
    feats = np.concatenate([c + rng.standard_normal((10, 64)) * 0.1 for c in centres])
    assert sorted(p // 10 for p in selectors.diverse(feats, 3)) == [0, 1, 2]
    # 3 classes; the text is class 2's name; frames 20-29 are classified as class 2
    class_emb = np.eye(3)
    probs = np.repeat(np.eye(3), 10, axis=0) * 0.9 + 0.1 / 3
    rel = selectors.relevance(probs, class_emb, np.array([[0.0, 0.0, 1.0]]))
    assert rel[20:].min() > rel[:20].max()
    np.testing.assert_array_equal(selectors.relevance_diverse(feats, rel, 1, 1.0), [20])
    # pure relevance takes the 4 most relevant; with diversity it spreads over the clusters
    assert {p // 10 for p in selectors.relevance_diverse(feats, rel, 4, 1.0)} == {2}
    assert {p // 10 for p in selectors.relevance_diverse(feats, rel, 3, 0.3)} == {0, 1, 2}


def test_shuffled_order_gives_every_question_another_videos_question():
    rows = [{"video_id": v} for v in ["a", "a", "b", "b", "c", "c", "d"]]
    perm = evaluate.shuffled_order(rows)
    assert sorted(perm.tolist()) == list(range(len(rows)))
    assert all(rows[i]["video_id"] != rows[j]["video_id"] for i, j in enumerate(perm))


# ---------------------------------------------------------------------------- a tiny split


@pytest.fixture(scope="module")
def run(tmp_path_factory, clip_dir, ray_local):
    """A prepared 6-question test split, an untrained policy and two running scoring pools."""
    from refocus_ray import features, policy
    from refocus_ray.config import load_config
    from refocus_ray.forge import build_random_model
    from refocus_ray.reward_pool import RewardPool
    from refocus_ray.scoring import ReferenceConfig

    d = tmp_path_factory.mktemp("eval")
    rows = []
    spans = {"short": (2.0, 4.0, 6.0), "mid": (30.0, 34.0, 10.0), "long": (150.0, 170.0, 40.0)}
    for i, name in enumerate(["short", "mid", "long"]):
        ev, end, dis = spans[name]
        for j, fam in enumerate(["appear", "count"]):
            rows.append({"question_id": f"{name}-{fam}", "video_id": name,
                         "video_path": str(clip_dir / f"{name}.mp4"),
                         "question": f"Which object appears? ({fam})", "options": OPTIONS,
                         "answer": (i + j) % 4, "split": "test", "family": fam,
                         "evidence": [{"start_s": ev, "end_s": end}],
                         "distractors": [{"start_s": dis, "end_s": dis + 0.5}]})
    (d / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = str(build_random_model("idefics3", d / "idefics3"))
    ref = {"backend": "vllm", "model": model, "answer_mode": "letter", "max_model_len": 2048,
           "pool_name": "test-eval-reference", "max_wait_ms": 20}
    ans = {**ref, "backend": "transformers", "pool_name": "test-eval-answerer"}
    raw = {"run_dir": str(d / "run"), "data": {"kind": "table", "table": str(d / "qa.jsonl")},
           "encoders": {"frame_size": 64}, "pool": {"max_frames": 48},  # pools: 40, 48, 48
           "reference": ref, "answerer": ans,
           "evaluate": {"ks": [4, 8, 64], "seeds": 2, "best_of": 4, "examples": 2}}
    (d / "cfg.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(d / "cfg.yaml")
    features.prepare_frames(cfg, progress=False)
    features.prepare_questions(cfg)
    pdir = policy.save(policy.SelectorPolicy(policy.PolicyConfig(d_model=32, n_layers=1,
                                                                 n_heads=2)), d / "policy")
    pools = {"reference": RewardPool.start(ReferenceConfig(**ref)),
             "answerer": RewardPool.start(ReferenceConfig(**ans))}
    yield cfg, d, pdir, pools
    for p in pools.values():
        p.shutdown()


def _requests(pools) -> dict[str, int]:
    return {name: sum(s["requests"] for s in p.stats()) for name, p in pools.items()}


def test_framewise_never_reads_the_answer(run):
    from refocus_ray.heldout import heldout_questions

    cfg, _, _, pools = run
    rows = heldout_questions(cfg, "test")
    assert len(rows) == 6

    def picks(rs):
        conf = selectors.framewise_confidence(pools["reference"], rs)
        assert [len(c) for c in conf] == [len(r["pool"].frames) for r in rs]  # 1 call/frame
        return [selectors.framewise(c, 4).tolist() for c in conf]

    base = picks(rows)
    no_answer = [{k: v for k, v in r.items() if k != "answer"} for r in rows]
    assert picks(no_answer) == base
    for a in range(len(OPTIONS)):
        assert picks([{**r, "answer": a} for r in rows]) == base


def test_evaluate_end_to_end_then_resume(run):
    cfg, _, pdir, pools = run
    res = evaluate.evaluate(cfg, pdir, pools=pools, progress=False)
    out = cfg.run_path / "eval"
    rec = json.loads((out / "eval.json").read_text())
    assert set(rec) >= {"results", "config", "checkpoint_sha256"}
    assert rec["config"] == cfg.to_dict() and len(rec["checkpoint_sha256"]) == 64
    assert rec["ks"] == [4, 8]  # 64 does not fit the 40-frame pool
    methods = set(evaluate.METHODS)
    if "relevance-diverse" in rec["skipped_methods"]:  # no ImageNet class names on this machine
        methods.discard("relevance-diverse")
    keys = {"method", "k", "model", "split", "family", "accuracy", "margin", "evidence_recall",
            "select_ms_per_query", "ref_calls_per_query", "n"}
    rows = rec["results"]
    assert all(set(r) == keys for r in rows)
    assert {(r["method"], r["k"], r["model"]) for r in rows} == {
        (m, k, model) for m in methods for k in (4, 8) for model in ("reference", "answerer")}
    assert {r["family"] for r in rows} == {"all", "appear", "count"}
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["evidence_recall"] <= 1
        assert r["split"] == "test" and r["n"] == (6 if r["family"] == "all" else 3)
        assert r["select_ms_per_query"] >= 0
        expect_calls = (40 + 48 * 2) / 3 if r["method"] == "framewise" else 0
        assert r["ref_calls_per_query"] == pytest.approx(expect_calls)
    for name in ("eval.md", "accuracy_vs_k.png", "recall_by_position.png", "recall_heatmap.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "examples").glob("*.png"))) == 2
    md = (out / "eval.md").read_text()
    assert "| refocus-shuffled |" in md and "Gap to `framewise`" in md
    assert "| method | acc K=4 | acc K=8 |" in res["table"]

    # a second run finds every result and asks no model anything
    before = _requests(pools)
    evaluate.evaluate(cfg, pdir, pools=pools, progress=False)
    assert _requests(pools) == before
    # an interrupted run: one result missing is recomputed alone (6 questions, 1 run)
    (out / "partial" / "uniform_k4_reference.json").unlink()
    evaluate.evaluate(cfg, pdir, pools=pools, progress=False)
    after = _requests(pools)
    assert after == {"reference": before["reference"] + 6, "answerer": before["answerer"]}
    again = json.loads((out / "eval.json").read_text())["results"]
    assert [{**r, "select_ms_per_query": 0} for r in again] == [
        {**r, "select_ms_per_query": 0} for r in rows]  # the same results, re-timed uniform


def test_cli_prints_the_table_and_caches_the_stage(run, capsys):
    cfg, d, pdir, pools = run
    before = _requests(pools)
    argv = ["evaluate", "--config", str(d / "cfg.yaml"), "--checkpoint", str(pdir)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "| method | acc K=4 | acc K=8 |" in text and "report:" in text
    assert (cfg.run_path / "eval" / "stage.json").exists()
    assert cli.main(argv) == 0
    assert "cached" in capsys.readouterr().out
    assert _requests(pools) == before


@pytest.mark.parametrize("low, word", [(0.02, "the policy beats"), (-0.01, "does NOT beat")])
def test_heldout_verdict_says_whether_the_policy_beats_uniform(low, word):
    from refocus_ray.heldout import verdict

    res = {"split": "test", "k": 4, "n_questions": 319, "acc_refocus_k4": 0.52,
           "acc_uniform_k4": 0.43, "acc_random_k4": 0.45, "refocus_minus_uniform_k4": 0.09,
           "refocus_minus_uniform_k4_ci95_low": low}
    line = verdict(res)
    assert word in line and "0.520 vs uniform 0.430" in line and "319 questions" in line
