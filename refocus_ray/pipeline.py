"""The controller: which stage runs, in what order, on which run directory.

dataset -> pools + features -> (forge reference) -> rollouts/rewards -> learner -> checkpoint
-> evaluate / export / serve. Every stage reads the previous stage's artifacts from the run
directory and is cached by a fingerprint of its config and inputs (see `stages`). The workers
(decoders, encoders, scorers, learners) live in their own modules; this file only orders them.
"""

from __future__ import annotations

import json
from typing import Any

from refocus_ray.config import Config, file_hash
from refocus_ray.stages import run_stage


def evidence_stage(cfg: Config) -> dict[str, Any]:
    """Generate the embedded evidence benchmark into <run_dir>/data (kind: evidence only)."""
    from refocus_ray import evidence

    if cfg.data.kind != "evidence":
        return {"table": str(cfg.table_path())}
    ecfg = evidence.EvidenceConfig(videos=cfg.data.videos, seed=cfg.data.seed)
    out = cfg.run_path / "data"

    def run() -> dict[str, Any]:
        table = evidence.generate(out, ecfg)
        stats = evidence.compute_stats(table, cfg.pool.max_frames, cfg.pool.max_fps)
        return {"table": str(table), "n_questions": stats["n_questions"],
                "n_videos": stats["n_videos"]}

    fp = {"evidence": ecfg.__dict__, "version": evidence.__dict__.get("VERSION", 1)}
    return run_stage(cfg.run_path, "data", fp, run)


def prepare_stage(cfg: Config, strict: bool | None = None, retry_failed: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Candidate pools and frozen features for every video and question of the run's table."""
    from refocus_ray import features

    def run() -> dict[str, Any]:
        summary = features.prepare_frames(cfg, progress=progress, retry_failed=retry_failed)
        summary.questions_encoded = features.prepare_questions(cfg)
        res = summary.to_dict()
        (features.features_dir(cfg) / "summary.json").write_text(json.dumps(res, indent=2))
        return res

    fp = {"key": features.cache_key(cfg), "query": cfg.encoders.query,
          "table": file_hash(cfg.table_path())}
    res = run_stage(cfg.run_path, "features", fp, run) if not retry_failed else run()
    strict = cfg.prepare.strict if strict is None else strict
    if res["failed"]:
        print(f"[features] {res['failed']} video(s) could not be read "
              f"(see {features.features_dir(cfg) / 'errors.jsonl'}):")
        for e in res["errors"][:10]:
            print(f"  {e['path']}: {e['error']}")
    if strict and res["failed"]:
        raise SystemExit(f"prepare --strict: {res['failed']} video(s) failed")
    return res


def demo(cfg: Config) -> dict[str, Any]:
    """Every stage the project has, in order, each cached."""
    out = {"data": evidence_stage(cfg), "features": prepare_stage(cfg)}
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "errors"}
                      for k, v in out.items()}, indent=2))
    return out
