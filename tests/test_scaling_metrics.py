"""Where rollout time goes, as users read it: the time split in training metrics, the per-request
cost split of the scorer actors, and frame decoding shared by a group's requests."""

from __future__ import annotations

import pytest

from refocus_ray.config import load_config

G = 4


def test_a_batch_decodes_each_frame_of_a_video_once(clip_dir):
    from refocus_ray.scoring import FrameStore

    video = str(clip_dir / "mid.mp4")
    store = FrameStore()
    group = [(video, (3, 40, 90)), (video, (40, 90, 150)), (video, (3, 150, 200))]
    store.warm(group)  # what VLLMBackend.score does first for a batch
    assert store.decoded == 5  # the union {3, 40, 90, 150, 200}, not 9
    frames = store.get(video, (150, 3, 200))
    assert frames.shape[0] == 3 and store.decoded == 5  # served from the store
    assert store.seconds > 0
    # bounded in bytes (least recently used out), never losing the frames a call asked for
    tiny = FrameStore(capacity_bytes=2 * frames[0].nbytes)
    tiny.warm(group)
    assert len(tiny.frames) == 5  # one batch's frames stay until it is served
    assert tiny.get(video, (3, 40)).shape[0] == 2
    assert len(tiny.frames) == 2 and tiny.nbytes <= tiny.capacity_bytes
    assert tiny.get(video, (150, 200, 3)).shape[0] == 3 and tiny.decoded == 7


@pytest.mark.vllm
def test_training_metrics_split_rollout_time_and_the_pool_splits_request_cost(run_cfg, scorer):
    """Two remote env runners against the reward pool: the iteration's metrics say how long the
    runners spent on policy inference and waiting for rewards and how long the learner waited;
    the scorer actor says where each request's time went (queue, frames, engine)."""
    from refocus_ray.grpo import GRPOConfig
    from refocus_ray.train import metrics_row

    before = scorer.stats()[0]
    cfg = load_config(None, {
        "run_dir": run_cfg.run_dir, "data.kind": "table", "data.table": run_cfg.data.table,
        "encoders.frame_size": 64, "pool.max_frames": 32,
        "policy": {"d_model": 64, "n_heads": 2, "n_layers": 2},
        "reference": {"pool_name": scorer.cfg.pool_name},
        "train": {"group_size": G, "groups_per_env_runner": 1, "groups_per_batch": 2,
                  "curriculum": [[4, 1]], "num_env_runners": 2, "seed": 11}})
    algo = GRPOConfig.from_run_config(cfg).build_algo()
    try:
        row = metrics_row(algo.train())
    finally:
        algo.stop()
    after = scorer.stats()[0]

    assert (row["groups"], row["reward_calls"], row["reward_requests"]) == (2, 2, 2 * G)
    # summed over both runners: sampling = policy inference + reward wait + env work
    assert row["time_policy_s"] > 0 and row["time_reward_wait_s"] > 0
    assert row["time_sample_s"] >= row["time_policy_s"] + row["time_reward_wait_s"]
    assert 0 < row["reward_wait_frac"] <= 1
    # the learner waits for the rollouts, then learns, then syncs weights
    total = row["time_rollout_s"] + row["time_learn_s"] + row["time_sync_s"]
    assert row["learner_wait_frac"] == pytest.approx(row["time_rollout_s"] / total, abs=1e-4)

    scored = after["scored"] - before["scored"]
    assert after["requests"] - before["requests"] == 2 * G and 0 < scored <= 2 * G
    for key in ("queue_wait_s", "fetch_s", "engine_s"):
        assert after[key] > before[key], key
    assert after["frames_decoded"] > before["frames_decoded"]
