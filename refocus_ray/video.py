"""Video decoding with decord, and the paper's candidate pool.

decord can abort or segfault on bad files, so every decode that touches users' media goes through
`decode_isolated`: a fresh worker process with a timeout. A crash there becomes a `VideoError`
naming the file and the reason; the caller keeps going.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class VideoError(RuntimeError):
    """A video could not be read; the message names the file and the reason."""


@dataclass(frozen=True)
class VideoInfo:
    n_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.fps if self.fps > 0 else 0.0


def pool_size(duration_s: float, max_frames: int, max_fps: float) -> int:
    """F = min(max_frames, max(1, int(duration_s * max_fps))), as in the released code."""
    return min(max_frames, max(1, int(duration_s * max_fps)))


def pool_indices(n_frames: int, fps: float, max_frames: int, max_fps: float) -> np.ndarray:
    """The candidate pool: `np.linspace(0, n_frames - 1, F, dtype=int)` original frame numbers."""
    if n_frames < 1:
        raise ValueError(f"a video needs at least one frame, got n_frames={n_frames}")
    f = min(pool_size(n_frames / fps, max_frames, max_fps), n_frames)
    return np.linspace(0, n_frames - 1, f, dtype=int)


def _reader(path: str, size: int | None):
    import decord  # imported here: a worker process pays for it, not every importer

    decord.bridge.set_bridge("native")
    kw = {"width": size, "height": size} if size else {}
    return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, **kw)


def probe(path: str | Path) -> VideoInfo:
    """Frame count, fps and size, read in-process (use `decode_isolated` for untrusted files)."""
    vr = _reader(str(path), None)
    h, w = vr[0].shape[:2] if len(vr) else (0, 0)
    return VideoInfo(len(vr), float(vr.get_avg_fps()), w, h)


def decode(path: str | Path, indices: np.ndarray | list[int], size: int | None = None) -> np.ndarray:
    """Decode the given frame numbers as uint8 [n, H, W, 3] (squashed to size x size if given)."""
    vr = _reader(str(path), size)
    return vr.get_batch(list(map(int, indices))).asnumpy()


def decode_pool(
    path: str | Path, max_frames: int, max_fps: float, size: int | None = None
) -> tuple[VideoInfo, np.ndarray, np.ndarray]:
    """Probe a video, build its candidate pool and decode it: (info, pool indices, frames)."""
    p = str(path)
    if not os.path.isfile(p):
        raise VideoError(f"{p}: file not found")
    vr = _reader(p, size)
    if len(vr) == 0:
        raise VideoError(f"{p}: no frames")
    first = vr[0].asnumpy()
    full = _reader(p, None)[0].shape if size else first.shape
    info = VideoInfo(len(vr), float(vr.get_avg_fps()), int(full[1]), int(full[0]))
    idx = pool_indices(info.n_frames, info.fps, max_frames, max_fps)
    return info, idx, vr.get_batch(list(map(int, idx))).asnumpy()


def _reason(path: str, exc: Exception) -> str:
    """decord's own messages are vague ("Error reading ..."); ask FFmpeg via PyAV why."""
    try:
        import av

        with av.open(path) as c:
            if not c.streams.video:
                return "no video stream"
    except Exception as e:  # noqa: BLE001 -- the container itself is unreadable: FFmpeg says why
        return f"not a readable video ({e})"
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300] + " (truncated or corrupt stream?)"


def _checked_decode_pool(path: str, max_frames: int, max_fps: float, size: int | None):
    """`decode_pool`, with failures explained (runs in the isolated child)."""
    try:
        return decode_pool(path, max_frames, max_fps, size)
    except VideoError:
        raise
    except Exception as e:  # noqa: BLE001 -- turned into a readable reason
        raise VideoError(_reason(path, e)[:500]) from None


def _isolated_call(out: mp.Queue, fn, args: tuple) -> None:
    try:
        out.put(("ok", fn(*args)))
    except VideoError as e:
        out.put(("error", str(e)))
    except Exception as e:  # noqa: BLE001 -- reported to the parent, which raises VideoError
        out.put(("error", f"{type(e).__name__}: {e}".splitlines()[0][:500]))


def _context() -> mp.context.BaseContext:
    """A forkserver that pre-imports decord: each decode forks a clean, cheap child."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["refocus_ray.video", "decord", "numpy"])
    return ctx


def run_isolated(fn, args: tuple, timeout_s: float, what: str):
    """`fn(*args)` in a child forked from the decoder forkserver: a segfault, abort or hang
    there becomes a `VideoError` naming `what`, and the caller keeps running. `fn` must be a
    module-level function (it is sent to the child by reference)."""
    ctx = _context()
    q = ctx.Queue(maxsize=1)
    proc = ctx.Process(target=_isolated_call, args=(q, fn, args), daemon=True)
    proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                status, payload = q.get(timeout=0.05)
                break
            except queue.Empty:
                if not proc.is_alive() and q.empty():
                    raise VideoError(f"{what}: decoder crashed (exit code {proc.exitcode})"
                                     ) from None
                if time.monotonic() > deadline:
                    raise VideoError(f"{what}: decoding timed out after {timeout_s:.0f} s"
                                     ) from None
    finally:
        proc.join(1)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    if status != "ok":
        raise VideoError(f"{what}: {payload}")
    return payload


def decode_isolated(
    path: str | Path,
    max_frames: int,
    max_fps: float,
    size: int | None = None,
    timeout_s: float = 120.0,
) -> tuple[VideoInfo, np.ndarray, np.ndarray]:
    """`decode_pool` in a child process: a segfault, abort or hang there cannot take us down."""
    p = str(path)
    if not os.path.isfile(p):
        raise VideoError(f"{p}: file not found")
    return run_isolated(_checked_decode_pool, (p, max_frames, max_fps, size), timeout_s, p)
