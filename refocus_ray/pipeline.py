"""The controller: which stage runs, in what order, on which run directory.

dataset -> pools + features -> (forge reference) -> (reward-variance filter) -> rollouts/rewards
-> learner -> checkpoint -> evaluate / export / serve. Every stage reads the previous stage's
artifacts from the run directory and is cached by a fingerprint of its config and inputs (see
`stages`). The workers (decoders, encoders, scorers, learners) live in their own modules; this
file only orders them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from refocus_ray.config import Config, file_hash
from refocus_ray.stages import run_stage

# the repository root: env runners import the top-level `envs` package from here
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def evidence_stage(cfg: Config) -> dict[str, Any]:
    """Generate the embedded evidence benchmark into <run_dir>/data (kind: evidence only)."""
    from refocus_ray import evidence

    if cfg.data.kind != "evidence":
        return {"table": str(cfg.table_path())}
    ecfg = cfg.data.evidence_config()
    out = cfg.run_path / "data"

    def run() -> dict[str, Any]:
        table = evidence.generate(out, ecfg)
        stats = evidence.compute_stats(table, cfg.pool.max_frames, cfg.pool.max_fps)
        return {"table": str(table), "n_questions": stats["n_questions"],
                "n_videos": stats["n_videos"]}

    # the default families are left out, so runs made before the option stay cached
    narrowed = {k: v for k, v in ecfg.__dict__.items()
                if k != "families" or v != evidence.FAMILIES}
    fp = {"evidence": narrowed, "version": evidence.__dict__.get("VERSION", 1)}
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


FORGES = ("forge", "forge_answerer")  # the reference model, the second answering model


def forge_config(cfg: Config, name: str = "forge"):
    """The `forge:` section (with `forge_answerer:` on top for the answering model) as a
    validated ForgeConfig; errors name `<section>.<key>`."""
    from refocus_ray.config import ConfigError, build
    from refocus_ray.forge import ForgeConfig

    section = {"max_frames": cfg.pool.max_frames, "max_fps": cfg.pool.max_fps,
               "seed": cfg.seed, **cfg.section("forge")}
    if name != "forge":
        section |= cfg.section(name)
    try:
        return build(ForgeConfig, section, name)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None


def forge_checkpoint(cfg: Config, name: str = "forge") -> Path:
    return cfg.run_path / name / "checkpoint"


def forge_stage(cfg: Config, name: str = "forge") -> dict[str, Any]:
    """Forge a VLM on the train split, then report on val through vLLM (`forge_report.json`)."""
    import dataclasses

    from refocus_ray import forge

    fcfg = forge_config(cfg, name)

    def run() -> dict[str, Any]:
        ckpt = forge.forge(cfg.table_path(), cfg.run_path / name, fcfg)
        report = forge.evaluate_forge(ckpt, cfg.table_path(), fcfg, split="val")
        return {"checkpoint": str(ckpt),
                **{k: v for k, v in report.items() if k != "per_family"}}

    layout = cfg.table_path().parent / "layout.json"  # the forge's training questions
    fp = {"forge": dataclasses.asdict(fcfg), "table": file_hash(cfg.table_path()),
          "layout": file_hash(layout) if layout.is_file() else None}
    return run_stage(cfg.run_path, name, fp, run, outputs=(forge_checkpoint(cfg, name),))


def forge_record(cfg: Config, name: str = "forge") -> str | None:
    """A forge stage's record (fingerprint and report): later stages that score with the forged
    model re-run when it is re-forged."""
    f = cfg.run_path / name / "stage.json"
    return f.read_text() if f.exists() else None


def train_stage(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """GRPO training, then the held-out check (refocus vs uniform vs random at K=4 on test)."""
    import ray

    from refocus_ray import heldout, plots, policy
    from refocus_ray.reward_pool import RewardPool
    from refocus_ray.train import reference_config, train, train_dir, training_config

    def run() -> dict[str, Any]:
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}})
        pool = RewardPool.start(reference_config(cfg))  # shared by training and the check
        try:
            t0 = time.time()
            train(cfg, resume=resume)
            seconds = time.time() - t0
            out = train_dir(cfg)
            plots.training_curve(out / "metrics.jsonl", out / "training_curve.png")
            chosen = out / "selection.json"
            it = json.loads(chosen.read_text())["chosen"]["iteration"] if chosen.exists() else None
            res = heldout.heldout(cfg, policy.load(out / "policy"), pool, k=4, seeds=3,
                                  train_seconds=round(seconds, 1), policy_iteration=it)
        finally:
            pool.shutdown()
        return res

    fp = {"train": cfg.section("train"), "policy": cfg.section("policy"),
          "reference": cfg.section("reference"), "table": file_hash(cfg.table_path()),
          "forge": forge_record(cfg)}
    trained_on = training_config(cfg).table_path()  # train.table: filtered -> the kept subset
    if trained_on != cfg.table_path():
        fp["train_table"] = file_hash(trained_on)
    if resume:
        return run()
    return run_stage(cfg.run_path, "train", fp, run)


def filter_stage(cfg: Config, scorer: Any = None, progress: bool = True) -> dict[str, Any]:
    """The paper's reward-variance data filter (`filtering.run_filter`) on the run's table,
    scored by the reward pool (started here unless `scorer` is given). Re-runs when the filter
    config, reference, pools or table change; stored margins make a new threshold cheap."""
    from refocus_ray import filtering

    fp = filtering.fingerprint(cfg)  # config errors name their key before anything starts

    def run() -> dict[str, Any]:
        if scorer is not None:
            return filtering.brief(filtering.run_filter(cfg, scorer, progress))
        import ray

        from refocus_ray.reward_pool import RewardPool
        from refocus_ray.train import reference_config

        ref = reference_config(cfg)  # a missing checkpoint is reported before any work

        def start() -> RewardPool:
            if not ray.is_initialized():
                ray.init(include_dashboard=False, log_to_driver=False)
            return RewardPool.start(ref)

        pool = filtering.LazyScorer(start)  # stored margins need no engine
        try:
            return filtering.brief(filtering.run_filter(cfg, pool, progress))
        finally:
            if pool.started is not None:
                pool.started.shutdown()

    return run_stage(cfg.run_path, "filter", fp, run, outputs=filtering.output_paths(cfg))


def evaluate_stage(cfg: Config, checkpoint: str | Path | None = None,
                   split: str | None = None) -> dict[str, Any]:
    """The trained selector against the baselines on a split (`evaluate.evaluate`); re-runs
    when the config, checkpoint, reference/answerer or data change. Inside a run, finished
    (method, K, model) results are kept, so an interrupted evaluation resumes."""
    from refocus_ray import evaluate

    ckpt = evaluate.checkpoint_dir(cfg, checkpoint)
    fp = evaluate.fingerprint(cfg, ckpt, split)
    return run_stage(cfg.run_path, "eval", fp, lambda: evaluate.evaluate(cfg, ckpt, split))


def demo(cfg: Config) -> dict[str, Any]:
    """Every stage the project has, in order, each cached."""
    out = {"data": evidence_stage(cfg), "features": prepare_stage(cfg), "forge": forge_stage(cfg)}
    if cfg.section("forge_answerer"):
        out["forge_answerer"] = forge_stage(cfg, "forge_answerer")
    if cfg.section("train").get("table") == "filtered":  # training reads the filter's output
        out["filter"] = filter_stage(cfg)
    if cfg.section("train"):
        out["train"] = train_stage(cfg)
        out["eval"] = evaluate_stage(cfg)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("errors", "table")}
                      for k, v in out.items()}, indent=2))
    if "refocus_minus_uniform_k4" in out.get("train", {}):
        from refocus_ray.heldout import verdict

        print(verdict(out["train"]))
    if "eval" in out:  # the demo ends with the comparison table and where the report is
        print(out["eval"]["table"])
        print(f"report: {out['eval']['report']}")
    return out
