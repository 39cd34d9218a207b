"""Candidate pools follow the paper's formula, and bad files are reported, not crashed on."""

import numpy as np
import pytest

from refocus_ray.video import VideoError, decode_isolated, pool_indices, probe


@pytest.mark.parametrize("name,n,fps", [("short", 80, 8.0), ("mid", 1000, 25.0), ("long", 1000, 5.0)])
@pytest.mark.parametrize("max_frames,max_fps", [(512, 4.0), (128, 4.0), (64, 2.0)])
def test_pool_matches_released_formula(clip_dir, name, n, fps, max_frames, max_fps):
    info = probe(clip_dir / f"{name}.mp4")
    assert info.n_frames == n and info.fps == pytest.approx(fps, rel=1e-3)
    # released code: F = min(max_frames, max(1, int(duration * max_fps))), linspace over frames
    f = min(max_frames, max(1, int(n / fps * max_fps)))
    expected = np.linspace(0, n - 1, f, dtype=int)
    got = pool_indices(info.n_frames, info.fps, max_frames, max_fps)
    np.testing.assert_array_equal(got, expected)
    _, idx, frames = decode_isolated(clip_dir / f"{name}.mp4", max_frames, max_fps, size=32)
    np.testing.assert_array_equal(idx, expected)
    assert frames.shape == (f, 32, 32, 3) and frames.dtype == np.uint8


@pytest.mark.parametrize("name,reason", [
    ("truncated.mp4", "not a readable video"),
    ("notes.mp4", "not a readable video"),
    ("absent.mp4", "file not found"),
])
def test_bad_files_raise_video_error_naming_file(clip_dir, name, reason):
    with pytest.raises(VideoError) as e:
        decode_isolated(clip_dir / name, 128, 4.0, size=32, timeout_s=30)
    assert name in str(e.value) and reason in str(e.value)


def test_decoder_crash_is_contained(clip_dir, monkeypatch):
    """Fault injection: a decoder that segfaults takes down only its child process."""
    from refocus_ray import video

    def crash(*a, **k):  # injected fault: the worker dies the way a decord abort would
        import os
        import signal
        os.kill(os.getpid(), signal.SIGSEGV)

    monkeypatch.setattr(video, "_context", lambda: __import__("multiprocessing").get_context("fork"))
    monkeypatch.setattr(video, "decode_pool", crash)  # reached through the isolated child
    with pytest.raises(VideoError, match="decoder crashed"):
        video.decode_isolated(clip_dir / "short.mp4", 128, 4.0, timeout_s=30)


def test_pool_rejects_empty_video():
    with pytest.raises(ValueError, match="at least one frame"):
        pool_indices(0, 25.0, 128, 4.0)
