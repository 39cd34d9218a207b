"""`refocus`: one command line for every stage of a ReFoCUS run.

    refocus data evidence --out DIR --seed S --videos N [--stats]   generate the benchmark
    refocus data stats TABLE                                         benchmark statistics
    refocus data import SRC.jsonl|csv --out TABLE.parquet            validate users' QA data
    refocus prepare --config C                                       pools + feature cache
    refocus forge-reference --config C                               train the reference VLM
    refocus filter --config C                                        reward-variance data filter
    refocus train --config C [--resume] [--dry-run]                  GRPO on RLlib + vLLM
    refocus evaluate --config C [--checkpoint DIR]                   selector vs baselines
    refocus export --config C [--checkpoint DIR] [--k K ...]         DBs/Parquet for harnesses
    refocus demo --config C                                          every stage, cached
    refocus serve --checkpoint DIR [--media-root PATH ...]           the selector over HTTP

Each subcommand's --help says what it reads, what it writes and what to expect.
The same stages run on a cluster with `ray job submit --working-dir . -- python -m jobs.<stage>`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# `envs`, `jobs` and `serve` are run from the project checkout, not installed (see README)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
if (PROJECT_ROOT / "envs" / "__init__.py").exists() and str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def config_from_args(args: argparse.Namespace):
    """The run config from `--config` and `--set` (see `add_config_args`); exits with the bad
    key named on a config error. Shared with the bench scripts."""
    from refocus_ray.config import ConfigError, load_config

    overrides = {}
    for item in getattr(args, "set", None) or []:
        key, _, value = item.partition("=")
        import yaml

        overrides[key] = yaml.safe_load(value)
    try:
        return load_config(args.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/embedded.yaml", help="YAML run config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set pool.max_frames=64 (repeatable)")


def cmd_data_evidence(args: argparse.Namespace) -> int:
    from refocus_ray import evidence

    try:
        shares = {"split_fractions": tuple(args.split_fractions)} if args.split_fractions else {}
        cfg = evidence.EvidenceConfig(videos=args.videos, seed=args.seed, **shares)
    except ValueError as e:
        raise SystemExit(f"refocus data evidence: {e}") from None
    table = evidence.generate(args.out, cfg)
    print(f"wrote {table}")
    if args.stats:
        evidence.compute_stats(table, args.max_frames, args.max_fps)
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from refocus_ray import evidence

    evidence.compute_stats(args.table, args.max_frames, args.max_fps)
    return 0


def cmd_data_import(args: argparse.Namespace) -> int:
    from refocus_ray.dataset import DatasetError, import_table

    try:
        table = import_table(args.src, args.out)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {table.num_rows} questions")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from refocus_ray import pipeline

    cfg = config_from_args(args)
    if cfg.data.kind == "evidence" and not cfg.table_path().exists():
        pipeline.evidence_stage(cfg)
    res = pipeline.prepare_stage(cfg, strict=args.strict or None, retry_failed=args.retry_failed)
    print(json.dumps({k: v for k, v in res.items() if k != "errors"}))
    return 0


def cmd_forge(args: argparse.Namespace) -> int:
    from refocus_ray import pipeline

    cfg = config_from_args(args)
    name = "forge_answerer" if args.answerer else "forge"
    if args.answerer and not cfg.section(name):  # before any work: nothing to forge
        raise SystemExit(f"{args.config}: no forge_answerer: section to forge")
    if cfg.data.kind == "evidence" and not cfg.table_path().exists():
        pipeline.evidence_stage(cfg)
    res = pipeline.forge_stage(cfg, name)
    print(json.dumps(res, indent=2))
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    from refocus_ray import pipeline
    from refocus_ray.config import ConfigError

    cfg = config_from_args(args)
    try:
        res = pipeline.filter_stage(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    except FileNotFoundError as e:
        raise SystemExit(f"filter: {e}") from None
    print(json.dumps({k: v for k, v in res.items() if k != "files"}, indent=2))
    print(f"kept table: {res['files']['kept.parquet']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from refocus_ray import pipeline

    cfg = config_from_args(args)
    if args.dry_run:
        from refocus_ray.train import describe_resources

        plan = describe_resources(cfg)
        print(json.dumps(plan, indent=2))
        if not plan.get("cluster", {}).get("fits", True):
            print(f"error: the plan does not fit cluster.nodes: {plan['cluster']['error']}",
                  file=sys.stderr)
            return 2
        return 0
    res = pipeline.train_stage(cfg, resume=args.resume)
    print(json.dumps(res, indent=2))
    if "refocus_minus_uniform_k4" in res:
        from refocus_ray.heldout import verdict

        print(verdict(res))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from refocus_ray import pipeline

    cfg = config_from_args(args)
    res = pipeline.evaluate_stage(cfg, checkpoint=args.checkpoint, split=args.split)
    print(res["table"])
    for method, why in res.get("skipped_methods", {}).items():
        print(f"{method} not run: {why}")
    print(f"report: {res['report']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from refocus_ray.export import export, lmms_docs_key_fn

    cfg = config_from_args(args)
    res = export(cfg, args.checkpoint, args.split, ks=args.k, n_rollouts=args.rollouts,
                 steps=args.steps, seed=args.seed, candidate=args.candidate,
                 key_fn=lmms_docs_key_fn(args.lmms_docs) if args.lmms_docs else None,
                 out_dir=args.out)
    print(json.dumps(res, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from refocus_ray import pipeline

    pipeline.demo(config_from_args(args))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback
    import signal

    import ray
    import yaml
    from ray import serve as ray_serve

    from refocus_ray.config import ConfigError
    from serve.app import build_app

    app_args = {"checkpoint": args.checkpoint, "config": args.config, "host": args.host,
                "set": {k: yaml.safe_load(v) for k, _, v in
                        (item.partition("=") for item in args.set or [])}}
    if args.media_root:
        app_args["media_roots"] = args.media_root
    try:
        application = build_app(app_args)
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"config error: {e}") from None
    if not ray.is_initialized():
        ray.init(address=args.address, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}})

    def stop(signum: int, frame: object) -> None:  # `docker stop`/systemd: like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    ray_serve.start(http_options={"host": args.host, "port": args.port})
    print(f"serving on http://{args.host}:{args.port} (docs: /docs); Ctrl-C stops", flush=True)
    try:
        ray_serve.run(application, name="refocus", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        ray_serve.shutdown()
        ray.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="refocus", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate, inspect or import video-QA datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    ev = dsub.add_parser(
        "evidence", help="generate the evidence-video benchmark (real footage, inserted objects)",
        description="Write real mp4 files and a Parquet QA table (train/val/test) whose "
        "questions need short inserted evidence segments; deterministic by seed.",
    )
    ev.add_argument("--out", required=True, help="output folder (videos/ + questions.parquet)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--videos", type=int, default=280, help="total videos over all splits")
    ev.add_argument("--split-fractions", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                    help="shares of the videos per split (default 0.6 0.15 0.25). Each split "
                    "draws its videos from its own seed, so runs that keep the val and test "
                    "counts share those videos; the embedded config: --videos 560 "
                    "--split-fractions 0.8 0.075 0.125 (448 / 42 / 70)")
    ev.add_argument("--stats", action="store_true", help="also write and print stats.json")
    for p in (ev,):
        p.add_argument("--max-frames", type=int, default=128, help="pool size for --stats")
        p.add_argument("--max-fps", type=float, default=4.0, help="pool fps for --stats")
    ev.set_defaults(fn=cmd_data_evidence)
    st = dsub.add_parser("stats", help="counts, durations and uniform-sampling hit rates")
    st.add_argument("table", help="questions.parquet of an evidence benchmark")
    st.add_argument("--max-frames", type=int, default=128)
    st.add_argument("--max-fps", type=float, default=4.0)
    st.set_defaults(fn=cmd_data_stats)
    im = dsub.add_parser(
        "import", help="validate your own QA data (JSONL/CSV) and write it as Parquet",
        description="Rows need question_id, video_id, video_path, question, options (JSON list "
        "or 'a|b|c'), answer (option index), split (train/val/test); optional duration_s, "
        "family, evidence. Errors name the row and the field.",
    )
    im.add_argument("src")
    im.add_argument("--out", required=True)
    im.set_defaults(fn=cmd_data_import)

    pr = sub.add_parser(
        "prepare", help="build candidate pools and cache frozen frame/question features",
        description="Ray Data pipeline: decode each video's pool (<= max_frames at <= max_fps, "
        "linspace indices as the paper) in isolated workers with a timeout, encode frames in "
        "batches, cache features by video content hash + encoder + pool. Re-runs decode "
        "nothing cached; unreadable videos are listed in features/errors.jsonl.",
    )
    add_config_args(pr)
    pr.add_argument("--strict", action="store_true", help="exit non-zero if any video failed")
    pr.add_argument("--retry-failed", action="store_true", help="decode known-bad files again")
    pr.set_defaults(fn=cmd_prepare)

    fo = sub.add_parser(
        "forge-reference", help="train the embedded reference VLM (Idefics3) that vLLM serves",
        description="Train a small Idefics3 VLM from scratch on the benchmark's train split "
        "(questions synthesized from layout.json about chronological subsets of 1..16 frames "
        "(forge.min_k..max_k), with and without the evidence), save a "
        "standard Hugging Face checkpoint that vLLM loads unchanged, and write "
        "forge_report.json: accuracy and margin on val at K = 4 and 8 with and without "
        "evidence, and with the evidence among as many other objects as fit (dense: what "
        "a selector shows), per family, scored through vLLM. Cached: a second run reuses it.",
    )
    add_config_args(fo)
    fo.add_argument("--answerer", action="store_true",
                    help="forge the second answering model instead (the forge: section with "
                    "forge_answerer: on top, into <run_dir>/forge_answerer)")
    fo.set_defaults(fn=cmd_forge)

    fi = sub.add_parser(
        "filter", help="the paper's reward-variance data filter: keep temporally sensitive "
        "questions",
        description="For each question of filter.splits (default train), the reference model's "
        "reward margin under 16 frame configurations: 8 circular windows of 25%% of the pool "
        "at 12.5%% stride and their 8 complements, filter.k frames each (default 8). Keeps "
        "the questions whose margin variance (population) exceeds filter.threshold (default "
        "0.2). Needs `prepare` (pools) and the reference model. Writes <run_dir>/filter/: "
        "kept.parquet (dataset schema; `train.table: filtered` trains on it), "
        "filter_scores.parquet, variance_hist.png, filter_summary.json (kept fraction per "
        "family). Cached; a new threshold re-uses the stored margins.",
    )
    add_config_args(fi)
    fi.set_defaults(fn=cmd_filter)

    tr = sub.add_parser(
        "train", help="GRPO-train the selector on RLlib against the reference VLM (vLLM)",
        description="RLlib env runners roll out the selector in the frame-selection env; the "
        "reward pool (vLLM scorer actors) scores each group of G episodes in one batched call; "
        "a GRPO learner (group-normalised advantages, clipped ratio, entropy bonus, no KL) "
        "updates the policy; K follows the curriculum. Writes <run_dir>/train/: checkpoints/, "
        "metrics.jsonl, training_curve.png, policy/ (safetensors + JSON) and heldout.json "
        "(refocus vs uniform vs random at K=4 on the test split). With policy.bridge: "
        "reference it first distils the forged reference's frame readings into the policy's "
        "text-image bridge (~30 s on 2 cores, cached in <run_dir>/features/).",
    )
    add_config_args(tr)
    tr.add_argument("--resume", action="store_true",
                    help="continue from this run's last checkpoint (iteration, optimizer, "
                    "curriculum stage, question stream) with its settings; only "
                    "train.iterations may differ, to train longer")
    tr.add_argument("--dry-run", action="store_true",
                    help="validate the config and print the placement it would request "
                    "(bundles per role, totals per resource; with cluster.nodes: whether and "
                    "where it fits, exit 2 if not) without starting Ray")
    tr.set_defaults(fn=cmd_train)

    ev_ = sub.add_parser(
        "evaluate", help="compare the trained selector with uniform, random, diverse, "
        "relevance-diverse and framewise baselines",
        description="On a split (default test) at K = 4, 8, 16, 32 (those that fit the pools): "
        "uniform, random, diverse (k-center), relevance-diverse (training-free, query-aware), "
        "framewise (every frame scored alone by the reference model, label-free), refocus "
        "(sample, greedy, best-of-N, shuffled questions). Answered by the reference model and "
        "the `answerer:` model if configured. Writes <run_dir>/eval/: eval.json, eval.md, "
        "accuracy_vs_k.png, recall plots, examples/*.png. Resumes an interrupted run; cached "
        "as a stage. Prints the comparison table and the report path.",
    )
    add_config_args(ev_)
    ev_.add_argument("--checkpoint", help="policy dir (model.safetensors + policy.json); "
                     "default evaluate.checkpoint or <run_dir>/train/policy")
    ev_.add_argument("--split", choices=("train", "val", "test"),
                     help="default evaluate.split (test)")
    ev_.set_defaults(fn=cmd_evaluate)

    ex = sub.add_parser(
        "export", help="write the selector's frames for eval harnesses (shelve DBs, Parquet)",
        description="Sample --rollouts rollouts of --steps picks per question and write "
        "the released ReFoCUS evaluation's shelve DBs (selection/DB, frameidx/cand<c>_nf<K>/DB; "
        "keys json.dumps((context, doc))), selections.parquet and selections.jsonl "
        "(video_id, question_id, k, frame_indices, timestamps_s). Pools with at most "
        "pool.uniform_fallback_frames frames, or shorter than --steps, fall back to uniform.",
    )
    add_config_args(ex)
    ex.add_argument("--checkpoint", help="policy dir; default <run_dir>/train/policy")
    ex.add_argument("--split", default="test", choices=("train", "val", "test"))
    ex.add_argument("--k", type=int, nargs="+", default=[32], help="frames per question "
                    "(one frame-index DB per K; each <= --steps)")
    ex.add_argument("--rollouts", type=int, default=4, help="rollouts per question (paper: 64)")
    ex.add_argument("--steps", type=int, default=32, help="picks per rollout (paper: 64)")
    ex.add_argument("--candidate", type=int, default=0, help="rollout exported as frames")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--lmms-docs", help="JSONL of {question_id, context, doc} from an "
                    "lmms-eval task: key the DBs as lmms-eval does")
    ex.add_argument("--out", help="output dir; default <run_dir>/export/<split>")
    ex.set_defaults(fn=cmd_export)

    de = sub.add_parser("demo", help="run every stage on a config, each cached (make demo)")
    add_config_args(de)
    de.set_defaults(fn=cmd_demo)

    sv = sub.add_parser(
        "serve", help="serve a trained selector over HTTP (Ray Serve; docs/serving.md)",
        description="Start a Ray Serve application: POST /v1/select (video path under a media "
        "root, or an upload, + question -> K frame indices, timestamps, probabilities), "
        "POST /v1/answer (when serve.answer_model is set), GET /healthz, /readyz, /v1/models, "
        "/docs. Binds 127.0.0.1 unless --host says otherwise; a non-loopback host needs a "
        "bearer token ($REFOCUS_SERVE_TOKEN or serve.token_file). Other settings: the config's "
        "serve: section (see refocus_ray/service.py ServeConfig) or --set serve.KEY=VALUE.",
    )
    sv.add_argument("--checkpoint", default="runs/embedded/train/policy",
                    help="exported policy directory (model.safetensors + policy.json)")
    add_config_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--media-root", action="append", metavar="PATH",
                    help="directory `path` requests may read (repeatable); none: uploads only")
    sv.add_argument("--address", default=None,
                    help="Ray cluster to join (default: start a local Ray instance)")
    sv.set_defaults(fn=cmd_serve)
    return ap


def main(argv: list[str] | None = None) -> int:
    from refocus_ray.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:  # sections validated by their stage: the bad key, no traceback
        raise SystemExit(f"config error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
