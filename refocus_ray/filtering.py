"""The paper's reward-variance data filter: keep the questions whose answer depends on *when*.

For each QA pair the frozen reference model's margin (the run's reward, `reference.reward`,
default the tanh margin) is measured under 16 frame configurations of the candidate pool: 8
circular temporal windows of 25% width at 12.5% stride and their 8 complements. A question
the model answers about equally well from any part of the video teaches the selector nothing,
so it is dropped; the rest are kept (paper: variance > 0.2 kept 393K of 962K pairs).

Choices the paper leaves open (also in docs/design-choices.md):
- geometry on pool positions: frame j of an F-frame pool is in window i iff
  (j/F - i/8) mod 1 < 1/4, computed exactly in integers; a window covers 25% of the pool and
  the last ones wrap around the end; the complement is the rest of the pool (75%);
- K frames per configuration (`filter.k`, default 8), spread evenly along the configuration's
  arc of the circular timeline (linspace over its frames in arc order, endpoints included) and
  shown chronologically; a configuration with fewer than K frames shows all of them;
- population variance (ddof=0) of the 16 margins; the unbiased estimate is 16/15 of it.

Output in ``<run_dir>/filter/``: ``kept.parquet`` (the kept rows in the dataset schema, video
paths rebased; ``train.table: filtered`` trains on it), ``filter_scores.parquet`` (per question
the 16 margins, their variance, kept), ``variance_hist.png``, ``filter_summary.json`` (kept
fraction overall and per family) and ``margins-<key>.jsonl``: every scored question as soon as
its call returns, so an interrupted run, or one with another threshold, does not score it again.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from refocus_ray.config import Config, ConfigError, build, file_hash, stable_hash
from refocus_ray.scoring import ScoreRequest

N_WINDOWS = 8  # a window starts every 1/8 of the timeline (12.5% stride)
WINDOW_STRIDES = 2  # and spans two strides (25% width)
N_CONFIGS = 2 * N_WINDOWS  # the windows, then their complements
SPLITS = ("train", "val", "test")
VERSION = 1


class Scorer(Protocol):
    """What the filter needs from the reward pool: option scores z per request."""

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]: ...


class LazyScorer:
    """A scorer started on its first request: when every margin is already stored (a new
    threshold, a resumed run that had finished scoring) no engine is started at all."""

    def __init__(self, start: Callable[[], Any]) -> None:
        self._start, self._scorer, self._lock = start, None, threading.Lock()

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        with self._lock:  # the filter calls from several threads
            if self._scorer is None:
                self._scorer = self._start()
        return self._scorer.score(requests)

    @property
    def started(self) -> Any:
        return self._scorer


@dataclass
class FilterConfig:
    """The ``filter:`` section of a run config."""

    threshold: float = 0.2  # keep a question iff the variance of its 16 margins is above this
    k: int = 8  # frames shown per configuration (the paper does not say)
    splits: list[str] = field(default_factory=lambda: ["train"])  # which rows are filtered
    questions_per_call: int = 16  # 16 questions x 16 configurations = 256 requests per call
    calls_in_flight: int = 2  # reward-pool calls outstanding, so the engine never idles

    def check(self, key: str) -> None:
        if not self.threshold >= 0:
            raise ConfigError(f"{key}.threshold: must be >= 0 (a variance), got {self.threshold!r}")
        if self.k < 1:
            raise ConfigError(f"{key}.k: must be >= 1, got {self.k!r}")
        if not self.splits or any(s not in SPLITS for s in self.splits):
            raise ConfigError(f"{key}.splits: must be a non-empty list of {list(SPLITS)}, "
                              f"got {self.splits!r}")
        for name in ("questions_per_call", "calls_in_flight"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: must be >= 1, got {getattr(self, name)!r}")


def filter_config(cfg: Config) -> FilterConfig:
    """The validated ``filter:`` section; K must fit a window of a full pool."""
    fcfg = build(FilterConfig, cfg.section("filter"), "filter")
    fits = min(len(c) for c in configurations(cfg.pool.max_frames))
    if fcfg.k > fits:
        raise ConfigError(f"filter.k: {fcfg.k} frames do not fit a 25% window of a full pool "
                          f"(pool.max_frames={cfg.pool.max_frames}: {fits} frames per window)")
    return fcfg


# ----------------------------------------------------------------------------- geometry


def configurations(pool_size: int) -> list[np.ndarray]:
    """The 8 windows, then their 8 complements, as pool positions in arc order.

    Window i starts at i/8 of the circular timeline; a complement starts where its window
    ends and runs around to the window's start (for the last windows it is one contiguous
    block of the pool, for the first it is two pieces joined across the end)."""
    j = np.arange(pool_size)
    windows, complements = [], []
    for i in range(N_WINDOWS):
        # N_WINDOWS * F * ((j/F - i/N_WINDOWS) mod 1): the exact offset from the window start
        offset = (N_WINDOWS * j - i * pool_size) % (N_WINDOWS * pool_size)
        order = np.argsort(offset, kind="stable")
        inside = offset[order] < WINDOW_STRIDES * pool_size
        windows.append(j[order][inside])
        complements.append(j[order][~inside])
    return windows + complements


def configuration_positions(pool_size: int, k: int) -> list[np.ndarray]:
    """K pool positions per configuration (all of it if smaller), evenly along its arc, sorted.

    Raises ValueError when a configuration is empty (pools of fewer than 4 frames)."""
    from refocus_ray.selectors import uniform

    out = []
    for members in configurations(pool_size):
        if len(members) == 0:
            raise ValueError(f"a pool of {pool_size} frame(s) leaves an empty window or "
                             "complement (the filter needs at least 4)")
        out.append(np.sort(members[uniform(len(members), min(k, len(members)))]))
    return out


# ------------------------------------------------------------------------------ scoring


def filter_dir(cfg: Config) -> Path:
    return cfg.run_path / "filter"


def kept_table_path(cfg: Config) -> Path:
    """The kept subset (dataset schema): what ``train.table: filtered`` trains on."""
    return filter_dir(cfg) / "kept.parquet"


def output_paths(cfg: Config) -> tuple[Path, ...]:
    d = filter_dir(cfg)
    return (kept_table_path(cfg), d / "filter_scores.parquet", d / "variance_hist.png",
            d / "filter_summary.json")


def scoring_key(cfg: Config, fcfg: FilterConfig) -> str:
    """What every margin depends on besides its question: stored margins are reused only
    under the same key (a new threshold or split list scores nothing again)."""
    from refocus_ray.features import cache_key
    from refocus_ray.pipeline import forge_record

    ref = cfg.section("reference")
    if Path(str(ref.get("model", ""))).exists():  # a checkpoint dir: the same however it is named
        ref["model"] = str(Path(ref["model"]).resolve())
    return stable_hash({"version": VERSION, "k": fcfg.k, "reference": ref,
                        "pool": cache_key(cfg), "forge": forge_record(cfg)})


def fingerprint(cfg: Config) -> dict[str, Any]:
    """What the stage's outputs depend on (the stage cache key)."""
    fcfg = filter_config(cfg)
    return {"scoring": scoring_key(cfg, fcfg), "filter": asdict(fcfg),
            "table": file_hash(cfg.table_path())}


@dataclass(frozen=True)
class _Question:
    row: dict[str, Any]
    requests: tuple[ScoreRequest, ...]
    key: str  # what its margins depend on: a stored margin is reused only under the same key


def _question(row: dict[str, Any], video: str, frames: np.ndarray, k: int) -> _Question:
    reqs = tuple(ScoreRequest(video, tuple(int(f) for f in frames[p]), row["question"],
                              tuple(row["options"])) for p in configuration_positions(len(frames), k))
    key = stable_hash([[list(r.frames) for r in reqs], video, row["question"], row["options"],
                       row["answer"]])
    return _Question(row, reqs, key)


def _score(scorer: Scorer, questions: list[_Question], reward: str) -> list[list[float]]:
    """One reward-pool call for all configurations of `questions` -> 16 margins each."""
    from refocus_ray.reward import get_reward

    fn = get_reward(reward)
    z = scorer.score([r for q in questions for r in q.requests])
    return [[fn(z[i * N_CONFIGS + c], q.row["answer"]) for c in range(N_CONFIGS)]
            for i, q in enumerate(questions)]


def _score_all(scorer: Scorer, todo: list[_Question], fcfg: FilterConfig, reward: str,
               store: Path, progress: bool) -> dict[str, str]:
    """Score `todo` in calls of `questions_per_call`, appending each question's margins to
    `store` as its call returns; a failed call is retried question by question, so only the
    bad question fails. Returns question_id -> error."""
    from tqdm import tqdm

    errors: dict[str, str] = {}
    batches = [todo[i : i + fcfg.questions_per_call]
               for i in range(0, len(todo), fcfg.questions_per_call)]
    with (ThreadPoolExecutor(fcfg.calls_in_flight) as pool, store.open("a") as f,
          tqdm(total=len(todo), desc="filter", unit="question", disable=not progress) as bar):
        futures = [(b, pool.submit(_score, scorer, b, reward)) for b in batches]
        try:
            for batch, fut in futures:
                try:
                    results = list(zip(batch, fut.result()))
                except Exception:  # noqa: BLE001 -- isolate the bad question below
                    results = []
                    for q in batch:
                        try:
                            results.append((q, _score(scorer, [q], reward)[0]))
                        except Exception as e:  # noqa: BLE001 -- reported by id, the run goes on
                            reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                            errors[q.row["question_id"]] = f"{q.requests[0].video}: {reason}"
                for q, margins in results:
                    f.write(json.dumps({"question_id": q.row["question_id"], "key": q.key,
                                        "margins": margins}) + "\n")
                f.flush()
                bar.update(len(batch))
        finally:  # Ctrl-C: drop the queued calls instead of waiting for them
            for _, fut in futures:
                fut.cancel()
    return errors


def _stored_margins(store: Path) -> dict[tuple[str, str], list[float]]:
    out = {}
    if store.exists():
        for line in store.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: that question is scored again
                continue
            out[(rec["question_id"], rec["key"])] = rec["margins"]
    return out


def rebase_video_paths(rows: list[dict[str, Any]], src_table: Path, dst_dir: Path) -> None:
    """Relative `video_path`s (relative to `src_table`'s folder) made relative to `dst_dir`."""
    from refocus_ray.dataset import resolve_video

    for r in rows:
        if not Path(r["video_path"]).is_absolute():
            r["video_path"] = os.path.relpath(resolve_video(src_table, r["video_path"]),
                                              dst_dir.resolve())


def run_filter(cfg: Config, scorer: Scorer, progress: bool = True) -> dict[str, Any]:
    """Score, select and write every output; returns the summary (also filter_summary.json)."""
    from refocus_ray import plots
    from refocus_ray.dataset import SCHEMA, read_table, resolve_video
    from refocus_ray.features import frame_cache_dir, load_pools
    from refocus_ray.scoring import ReferenceConfig

    fcfg = filter_config(cfg)
    reward = build(ReferenceConfig, cfg.section("reference"), "reference").reward
    table_path, out = cfg.table_path(), filter_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in read_table(table_path).to_pylist() if r["split"] in fcfg.splits]
    if not rows:
        raise ValueError(f"{table_path}: no questions in split(s) {fcfg.splits} (filter.splits)")
    pools = load_pools(cfg)
    if not pools:
        raise FileNotFoundError(f"no cached candidate pools in {frame_cache_dir(cfg)}: run "
                                "`refocus prepare` with this config first")

    skipped: dict[str, str] = {}
    questions: list[_Question] = []
    for r in rows:
        pool = pools.get(r["video_id"])
        if pool is None:
            skipped[r["question_id"]] = f"{r['video_path']}: no cached pool (see features/errors.jsonl)"
            continue
        try:
            questions.append(_question(r, str(resolve_video(table_path, r["video_path"])),
                                       pool.frames, fcfg.k))
        except ValueError as e:
            skipped[r["question_id"]] = f"{r['video_path']}: {e}"
    store = out / f"margins-{scoring_key(cfg, fcfg)}.jsonl"
    done = _stored_margins(store)
    todo = [q for q in questions if (q.row["question_id"], q.key) not in done]
    errors = _score_all(scorer, todo, fcfg, reward, store, progress) if todo else {}
    done = _stored_margins(store)

    scored = [(q, done[(q.row["question_id"], q.key)]) for q in questions
              if (q.row["question_id"], q.key) in done]
    var = np.array([np.var(m) for _, m in scored], np.float64)  # population variance (ddof=0)
    keep = var > fcfg.threshold
    pq.write_table(pa.table({
        "question_id": [q.row["question_id"] for q, _ in scored],
        "video_id": [q.row["video_id"] for q, _ in scored],
        "split": [q.row["split"] for q, _ in scored],
        "family": [q.row["family"] for q, _ in scored],
        "margins": pa.array([m for _, m in scored], pa.list_(pa.float64(), N_CONFIGS)),
        "variance": pa.array(var, pa.float64()),
        "kept": pa.array(keep, pa.bool_()),
    }), out / "filter_scores.parquet")
    kept_rows = [dict(q.row) for (q, _), k in zip(scored, keep) if k]
    rebase_video_paths(kept_rows, table_path, out)
    pq.write_table(pa.Table.from_pylist(kept_rows, schema=SCHEMA), kept_table_path(cfg))
    families = [q.row["family"] or "(none)" for q, _ in scored]
    plots.variance_histogram(var, families, fcfg.threshold, out / "variance_hist.png")

    summary = {
        "threshold": fcfg.threshold, "k": fcfg.k, "splits": fcfg.splits, "reward": reward,
        "variance": "population (ddof=0) over 8 windows + 8 complements",
        "n_questions": len(rows), "n_scored": len(scored), "n_kept": int(keep.sum()),
        "kept_fraction": float(keep.mean()) if len(scored) else None,
        "per_family": per_family(families, var, keep),
        "skipped": skipped, "errors": errors,
        "files": {p.name: str(p) for p in output_paths(cfg)},
    }
    g = summary["per_family"].get("global")
    summary["global_mostly_removed"] = None if g is None else g["kept_fraction"] < 0.5
    (out / "filter_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def brief(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary with skipped and failed questions counted, not listed (the stage record)."""
    return {**summary, "skipped": len(summary["skipped"]), "errors": len(summary["errors"])}


def per_family(families: list[str], var: np.ndarray, keep: np.ndarray) -> dict[str, Any]:
    """Per question family: questions, kept, kept fraction, mean and median variance."""
    out = {}
    fam = np.asarray(families, dtype=object)
    for name in sorted(set(families)):
        m = fam == name
        out[name] = {"n": int(m.sum()), "kept": int(keep[m].sum()),
                     "kept_fraction": float(keep[m].mean()),
                     "mean_variance": float(var[m].mean()),
                     "median_variance": float(np.median(var[m]))}
    return out
