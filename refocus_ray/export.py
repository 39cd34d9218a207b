"""`refocus export`: the policy's selections in the formats eval harnesses read.

1. The released ReFoCUS evaluation's two ``shelve`` databases (paper notes 7.3-7.4), so its
   lmms-eval wrappers run unchanged on our selections:

   * selection DB ``selection/DB``: key -> ``{"frame_idx": list[int] (F pool original frame
     numbers), "candidates": int32 [rollouts, steps] indices into frame_idx, or None when the
     pool is shorter than a rollout, "distribution": float16 [F] log mean selection probability
     (over rollouts and steps), or None}``;
   * frame-index DB ``frameidx/cand<c>_nf<K>/DB``: key -> sorted numpy int array [K] of original
     frame numbers: rollout c's first K picks, or ``linspace(frame_idx[0], frame_idx[-1], K,
     dtype=int)`` when F <= ``pool.uniform_fallback_frames`` or candidates is None, exactly as
     the released ``_database_to_frameidx.py``.

   Keys are ``json.dumps((context, doc))``. For the released wrappers to find a request, the
   key must be lmms-eval's own: its prompt (``context``) and its task document without the
   ``"image"`` key. The key builder is injectable; `lmms_docs_key_fn` reads those pairs from a
   JSONL file dumped from an lmms-eval task, and the default builds them from our table row
   (question + lettered options; the row without its video path).
2. Parquet and JSONL: ``video_id, question_id, k, frame_indices, timestamps_s``.

Which dbm backend ``shelve`` uses is the interpreter's (``dbm.gnu``/``ndbm`` where built,
``dbm.dumb`` otherwise: ``DB.dat``/``DB.dir``/``DB.bak``); readers open it with
``shelve.open(path, "r")`` on the same kind of interpreter.
"""

from __future__ import annotations

import json
import shelve
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refocus_ray.config import Config, file_hash
from refocus_ray.prompting import LETTERS

KeyFn = Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]
# table columns that are not part of the task document: where the video lies on this machine
INTERNAL_FIELDS = ("video_path",)
# fields heldout_questions attaches to a row (features, resolved paths): never exported
COMPUTED_FIELDS = ("pool", "q_emb", "opt_emb", "video")


def default_context(row: dict[str, Any]) -> str:
    """Question, then one lettered option per line (the multiple-choice prompt's content)."""
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(row["options"]))
    return f"{row['question']}\n{opts}"


def default_key_fn(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(context, doc) from a dataset row: doc is the row without video-path internals."""
    doc = {k: v for k, v in row.items() if k not in INTERNAL_FIELDS + COMPUTED_FIELDS}
    return default_context(row), doc


def shelve_key(context: str, doc: dict[str, Any]) -> str:
    """The released DBs' key: ``json.dumps((context, doc))``, doc without its "image" key."""
    return json.dumps((context, {k: v for k, v in doc.items() if k != "image"}))


def lmms_docs_key_fn(path: str | Path) -> KeyFn:
    """Keys from an lmms-eval task: a JSONL file of ``{"question_id", "context", "doc"}`` lines
    (the prompt lmms-eval builds and its task document), matched to rows by question_id."""
    pairs: dict[str, tuple[str, dict[str, Any]]] = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        rec = json.loads(line)
        missing = [k for k in ("question_id", "context", "doc") if k not in rec]
        if missing:
            raise ValueError(f"{path} line {i}: missing {missing}")
        pairs[str(rec["question_id"])] = (rec["context"], rec["doc"])

    def key_fn(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if row["question_id"] not in pairs:
            raise KeyError(f"{path}: no lmms-eval doc for question_id {row['question_id']!r}")
        return pairs[row["question_id"]]

    return key_fn


def rollouts(policy: Any, rows: Sequence[dict[str, Any]], n_rollouts: int, steps: int,
             seed: int = 0, batch_rollouts: int = 256
             ) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
    """(candidates int32 [rollouts, steps], distribution float16 [F]) per row, as the released
    selector writes them: temperature-1 rollouts; distribution = log of the selection
    probability averaged over rollouts and steps. (None, None) where F < steps."""
    import torch

    from refocus_ray.policy import collate, example_from_pool

    gen = torch.Generator().manual_seed(seed)
    out: list[tuple[np.ndarray | None, np.ndarray | None]] = [(None, None)] * len(rows)
    todo = [i for i, r in enumerate(rows) if len(r["pool"].frames) >= steps]
    per_batch = max(1, batch_rollouts // n_rollouts)
    for b in range(0, len(todo), per_batch):
        idx = todo[b : b + per_batch]
        batch = collate([example_from_pool(rows[i]["pool"], rows[i]["q_emb"], rows[i]["opt_emb"])
                         for i in idx])
        s = policy.sample(batch, steps, generator=gen, group=n_rollouts)
        chosen = s.chosen.view(len(idx), n_rollouts, steps).numpy().astype(np.int32)
        probs = s.probs.view(len(idx), n_rollouts, -1).mean(1).numpy()
        for j, i in enumerate(idx):
            f = len(rows[i]["pool"].frames)
            with np.errstate(divide="ignore"):
                dist = np.log(probs[j, :f].astype(np.float64)).astype(np.float16)
            out[i] = (chosen[j], dist)
    return out


def frame_indices(frame_idx: Sequence[int], candidates: np.ndarray | None, k: int,
                  fallback_frames: int, candidate: int = 0) -> np.ndarray:
    """The released ``_database_to_frameidx.py``: candidate row's first K, as original frame
    numbers, sorted; uniform over [first, last] pool frame for short pools or no candidates."""
    if candidates is None or len(frame_idx) <= fallback_frames:
        return np.linspace(frame_idx[0], frame_idx[-1], k, dtype=int)
    if k > candidates.shape[1]:
        raise ValueError(f"k={k} is longer than the rollouts ({candidates.shape[1]} steps): "
                         "export with --steps >= k")
    return np.sort(np.asarray(frame_idx)[candidates[candidate, :k]])


def _fresh_db(path: Path) -> Path:
    """An empty shelve location (old files of any dbm backend removed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(path.name + "*"):
        old.unlink()
    return path


def export(cfg: Config, checkpoint: str | Path | None = None, split: str = "test",
           ks: Sequence[int] = (32,), n_rollouts: int = 4, steps: int = 32, seed: int = 0,
           candidate: int = 0, key_fn: KeyFn | None = None, out_dir: str | Path | None = None,
           policy: Any = None) -> dict[str, Any]:
    """Sample rollouts for every question of `split` and write the DBs, Parquet and JSONL.

    ``policy`` (an in-memory `SelectorPolicy`) replaces loading ``checkpoint``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from refocus_ray.evaluate import checkpoint_dir
    from refocus_ray.heldout import heldout_questions
    from refocus_ray.policy import load

    t0 = time.time()
    if not 0 <= candidate < n_rollouts:
        raise ValueError(f"candidate={candidate} must be below rollouts={n_rollouts}")
    sha = None
    if policy is None:
        ckpt = checkpoint_dir(cfg, checkpoint)
        policy, sha = load(ckpt).eval(), file_hash(ckpt / "model.safetensors")
    key_fn = key_fn or default_key_fn
    rows = heldout_questions(cfg, split)
    if not rows:
        raise ValueError(f"no {split} questions with cached features: run `refocus prepare`")
    out = Path(out_dir) if out_dir else cfg.run_path / "export" / split
    fallback = cfg.pool.uniform_fallback_frames
    sel = rollouts(policy, rows, n_rollouts, steps, seed)
    keys = [shelve_key(*key_fn(r)) for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError("two questions map to the same (context, doc) key")

    with shelve.open(str(_fresh_db(out / "selection" / "DB")), "n") as db:
        for key, r, (cand, dist) in zip(keys, rows, sel):
            db[key] = {"frame_idx": [int(f) for f in r["pool"].frames],
                       "candidates": cand, "distribution": dist}
    table, fallbacks = [], {}
    for k in ks:
        fallbacks[k] = 0
        path = _fresh_db(out / "frameidx" / f"cand{candidate}_nf{k}" / "DB")
        with shelve.open(str(path), "n") as db:
            for key, r, (cand, _) in zip(keys, rows, sel):
                frames = frame_indices(r["pool"].frames, cand, k, fallback, candidate)
                fallbacks[k] += int(cand is None or len(r["pool"].frames) <= fallback)
                db[key] = frames
                table.append({"video_id": r["video_id"], "question_id": r["question_id"],
                              "k": int(k), "frame_indices": [int(f) for f in frames],
                              "timestamps_s": [float(f) / r["pool"].fps for f in frames]})
    pq.write_table(pa.Table.from_pylist(table), out / "selections.parquet")
    (out / "selections.jsonl").write_text("".join(json.dumps(t) + "\n" for t in table))
    summary = {"out": str(out), "split": split, "n_questions": len(rows), "ks": list(ks),
               "rollouts": n_rollouts, "steps": steps, "seed": seed, "candidate": candidate,
               "no_candidates": sum(c is None for c, _ in sel), "uniform_fallback": fallbacks,
               "uniform_fallback_frames": fallback, "checkpoint_sha256": sha,
               "seconds": round(time.time() - t0, 2)}
    (out / "export.json").write_text(json.dumps(summary, indent=2))
    return summary
