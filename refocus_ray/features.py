"""Candidate pools and the frozen-feature cache, built by a Ray Data pipeline.

Layout under ``<run_dir>/features/``:

    frames/<key>/<video_sha256>.parquet   one row per pool frame: frame (original frame number),
                                          t_s, feature (list<float16>); metadata: fps, n_frames
    questions-<key>.parquet              question_id, text_sha, q_emb, opt_emb (per option)
    errors.jsonl                         one line per video that could not be read

``<key>`` hashes the frame-encoder id and the pool parameters, so a cache entry is keyed by
video content + encoder + pool, as the issue asks. A second run finds every entry and decodes
nothing; a corrupt or missing video is reported with file and reason and the others go on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from refocus_ray.config import Config, file_hash, stable_hash
from refocus_ray.dataset import read_table, resolve_video


@dataclass
class PoolFeatures:
    """One video's candidate pool with its cached frame features."""

    frames: np.ndarray  # int64 [F] original frame numbers
    t_s: np.ndarray  # float64 [F] timestamps
    features: np.ndarray  # float32 [F, d]
    fps: float
    n_frames: int


@dataclass
class PrepareSummary:
    videos: int = 0
    cached: int = 0
    decoded: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    questions_encoded: int = 0
    seconds: float = 0.0
    # Ray node id -> videos decoded / encoded there (shows the work spread over a cluster)
    nodes: dict[str, dict[str, int]] = field(default_factory=lambda: {"decode": {}, "encode": {}})

    def to_dict(self) -> dict[str, Any]:
        return {
            "videos": self.videos, "cached": self.cached, "decoded": self.decoded,
            "failed": len(self.failed), "errors": self.failed,
            "questions_encoded": self.questions_encoded, "seconds": round(self.seconds, 2),
            "nodes": self.nodes,
        }


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def cache_key(cfg: Config) -> str:
    """Frame-cache key: encoder id + input size + pool parameters."""
    e, p = cfg.encoders, cfg.pool
    return stable_hash(
        {"frame": e.frame, "size": e.frame_size, "max_frames": p.max_frames, "max_fps": p.max_fps}
    )


def features_dir(cfg: Config) -> Path:
    return cfg.run_path / "features"


def frame_cache_dir(cfg: Config) -> Path:
    return features_dir(cfg) / "frames" / cache_key(cfg)


def question_cache_path(cfg: Config) -> Path:
    return features_dir(cfg) / f"questions-{stable_hash({'query': cfg.encoders.query})}.parquet"


def write_pool(path: Path, pool: PoolFeatures) -> None:
    table = pa.table(
        {
            "frame": pa.array(pool.frames, pa.int64()),
            "t_s": pa.array(pool.t_s, pa.float64()),
            "feature": pa.array(list(pool.features.astype(np.float16)), pa.list_(pa.float16())),
        }
    ).replace_schema_metadata({"fps": str(pool.fps), "n_frames": str(pool.n_frames)})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)  # atomic: a killed run never leaves a half-written cache entry


def read_pool(path: Path) -> PoolFeatures:
    table = pq.read_table(path)
    meta = table.schema.metadata
    feats = np.stack(table.column("feature").to_numpy(zero_copy_only=False)).astype(np.float32)
    return PoolFeatures(
        frames=table.column("frame").to_numpy(),
        t_s=table.column("t_s").to_numpy(),
        features=feats,
        fps=float(meta[b"fps"]),
        n_frames=int(meta[b"n_frames"]),
    )


def _decode_row(row: dict[str, Any], max_frames: int, max_fps: float, size: int,
                timeout_s: float) -> dict[str, Any]:
    """Ray Data map: decode one pool in an isolated child; failures become an `error` field."""
    from refocus_ray.video import VideoError, decode_isolated

    row = {**row, "decode_node": _node_id()}
    try:
        info, idx, frames = decode_isolated(row["path"], max_frames, max_fps, size, timeout_s)
    except VideoError as e:
        return {**row, "error": str(e), "frames": np.zeros((0, size, size, 3), np.uint8),
                "index": np.zeros(0, np.int64), "fps": 0.0, "n_frames": 0}
    return {**row, "error": "", "frames": frames, "index": idx.astype(np.int64),
            "fps": info.fps, "n_frames": info.n_frames}


class _EncodeFrames:
    """Ray Data actor: one frame encoder, loaded once, encoding one video's pool per call."""

    def __init__(self, name: str, size: int, threads: int, batch_size: int) -> None:
        from refocus_ray.encoders import FrameEncoder

        self.encoder = FrameEncoder(name, size, threads, batch_size)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        frames = row.pop("frames")
        row["encode_node"] = _node_id()
        row["features"] = (
            self.encoder(frames) if len(frames) else np.zeros((0, self.encoder.dim), np.float32)
        )
        return row


def prepare_frames(
    cfg: Config, progress: bool = True, retry_failed: bool = False
) -> PrepareSummary:
    """Decode every uncached video's pool and cache its frame features (Ray Data).

    Known-bad files (same content hash) are reported again without decoding unless
    `retry_failed`."""
    import ray

    t0 = time.time()
    table_path = cfg.table_path()
    table = read_table(table_path)
    out_dir = frame_cache_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = PrepareSummary()
    todo, seen = [], set()
    for vid, rel in zip(table.column("video_id").to_pylist(), table.column("video_path").to_pylist()):
        if vid in seen:
            continue
        seen.add(vid)
        summary.videos += 1
        path = resolve_video(table_path, rel)
        if not path.is_file():
            summary.failed.append({"video_id": vid, "path": str(path), "error": "file not found"})
            continue
        sha = file_hash(path)
        if (out_dir / f"{sha}.parquet").exists():
            summary.cached += 1
        elif (err := out_dir / f"{sha}.error.json").exists() and not retry_failed:
            summary.failed.append(json.loads(err.read_text()))
        else:
            todo.append({"video_id": vid, "path": str(path), "sha": sha})
    if todo:
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        p, e = cfg.pool, cfg.encoders
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.map(
            _decode_row,
            fn_kwargs={"max_frames": p.max_frames, "max_fps": p.max_fps, "size": e.frame_size,
                       "timeout_s": cfg.prepare.decode_timeout_s},
            compute=ray.data.TaskPoolStrategy(size=cfg.prepare.decode_concurrency),
            num_cpus=0.5,
        )
        ds = ds.map(
            _EncodeFrames, fn_constructor_args=(e.frame, e.frame_size, e.threads, e.batch_size),
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1,
        )
        for row in ds.iter_rows():
            for stage in ("decode", "encode"):
                where = summary.nodes[stage]
                where[row[f"{stage}_node"]] = where.get(row[f"{stage}_node"], 0) + 1
            if row["error"]:
                err = {"video_id": row["video_id"], "path": row["path"], "error": row["error"]}
                # remembered by content hash: a re-run does not decode a known-bad file again
                (out_dir / f"{row['sha']}.error.json").write_text(json.dumps(err))
                summary.failed.append(err)
                continue
            idx = np.asarray(row["index"], np.int64)
            write_pool(
                out_dir / f"{row['sha']}.parquet",
                PoolFeatures(idx, idx / row["fps"], np.asarray(row["features"]), row["fps"],
                             int(row["n_frames"])),
            )
            summary.decoded += 1
    errors = features_dir(cfg) / "errors.jsonl"
    errors.write_text("".join(json.dumps(e) + "\n" for e in summary.failed))
    summary.seconds = time.time() - t0
    return summary


def question_texts(question: str, options: list[str]) -> list[str]:
    """What the query encoder reads: the question, then each option on its own."""
    return [question, *options]


def prepare_questions(cfg: Config) -> int:
    """Encode the question and each option of every question not cached yet; returns how many."""
    from refocus_ray.encoders import QueryEncoder

    table = read_table(cfg.table_path())
    path = question_cache_path(cfg)
    old = pq.read_table(path).to_pylist() if path.exists() else []
    have = {(r["question_id"], r["text_sha"]) for r in old}
    rows, texts = [], []
    for r in table.select(["question_id", "question", "options"]).to_pylist():
        sha = stable_hash(question_texts(r["question"], r["options"]))
        if (r["question_id"], sha) not in have:
            rows.append((r["question_id"], sha, len(r["options"])))
            texts.extend(question_texts(r["question"], r["options"]))
    if not rows:
        return 0
    emb = QueryEncoder(cfg.encoders.query, cfg.encoders.threads)(texts)
    new, i = [], 0
    for qid, sha, n_opt in rows:
        new.append({"question_id": qid, "text_sha": sha, "q_emb": emb[i].tolist(),
                    "opt_emb": emb[i + 1 : i + 1 + n_opt].tolist()})
        i += 1 + n_opt
    keep = {qid for qid, _, _ in rows}
    merged = [r for r in old if r["question_id"] not in keep] + new
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(merged), tmp)
    tmp.replace(path)
    return len(rows)


def load_question_features(cfg: Config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """question_id -> (q_emb [d], opt_emb [n_options, d])."""
    out = {}
    for r in pq.read_table(question_cache_path(cfg)).to_pylist():
        out[r["question_id"]] = (
            np.asarray(r["q_emb"], np.float32), np.asarray(r["opt_emb"], np.float32)
        )
    return out


def load_pools(cfg: Config) -> dict[str, PoolFeatures]:
    """video_id -> cached pool for every video of the run's table that prepare succeeded on."""
    table_path = cfg.table_path()
    table = read_table(table_path)
    out_dir, out = frame_cache_dir(cfg), {}
    for vid, rel in zip(table.column("video_id").to_pylist(), table.column("video_path").to_pylist()):
        if vid in out:
            continue
        path = resolve_video(table_path, rel)
        if path.is_file() and (f := out_dir / f"{file_hash(path)}.parquet").exists():
            out[vid] = read_pool(f)
    return out
