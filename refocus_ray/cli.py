"""`refocus`: one command line for every stage of a ReFoCUS run.

    refocus data evidence --out DIR --seed S --videos N [--stats]   generate the benchmark
    refocus data stats TABLE                                         benchmark statistics
    refocus data import SRC.jsonl|csv --out TABLE.parquet            validate users' QA data
    refocus prepare --config C                                       pools + feature cache
    refocus forge-reference --config C                               train the reference VLM
    refocus train --config C [--resume] [--dry-run]                  GRPO on RLlib + vLLM
    refocus demo --config C                                          every stage, cached

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


def _config(args: argparse.Namespace):
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


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/embedded.yaml", help="YAML run config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set pool.max_frames=64 (repeatable)")


def cmd_data_evidence(args: argparse.Namespace) -> int:
    from refocus_ray import evidence

    cfg = evidence.EvidenceConfig(videos=args.videos, seed=args.seed)
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

    cfg = _config(args)
    if cfg.data.kind == "evidence" and not cfg.table_path().exists():
        pipeline.evidence_stage(cfg)
    res = pipeline.prepare_stage(cfg, strict=args.strict or None, retry_failed=args.retry_failed)
    print(json.dumps({k: v for k, v in res.items() if k != "errors"}))
    return 0


def cmd_forge(args: argparse.Namespace) -> int:
    from refocus_ray import pipeline

    cfg = _config(args)
    if cfg.data.kind == "evidence" and not cfg.table_path().exists():
        pipeline.evidence_stage(cfg)
    res = pipeline.forge_stage(cfg)
    print(json.dumps(res, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from refocus_ray import pipeline

    cfg = _config(args)
    if args.dry_run:
        from refocus_ray.train import describe_resources

        print(json.dumps(describe_resources(cfg), indent=2))
        return 0
    res = pipeline.train_stage(cfg, resume=args.resume)
    print(json.dumps(res, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from refocus_ray import pipeline

    pipeline.demo(_config(args))
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
    _add_config(pr)
    pr.add_argument("--strict", action="store_true", help="exit non-zero if any video failed")
    pr.add_argument("--retry-failed", action="store_true", help="decode known-bad files again")
    pr.set_defaults(fn=cmd_prepare)

    fo = sub.add_parser(
        "forge-reference", help="train the embedded reference VLM (Idefics3) that vLLM serves",
        description="Train a small Idefics3 VLM from scratch on the benchmark's train split "
        "(chronological frame subsets of 4..32 frames, with and without the evidence), save a "
        "standard Hugging Face checkpoint that vLLM loads unchanged, and write "
        "forge_report.json: accuracy and margin on val at K = 4 and 8 with and without "
        "evidence, per family, scored through vLLM. Cached: a second run reuses it.",
    )
    _add_config(fo)
    fo.set_defaults(fn=cmd_forge)

    tr = sub.add_parser(
        "train", help="GRPO-train the selector on RLlib against the reference VLM (vLLM)",
        description="RLlib env runners roll out the selector in the frame-selection env; the "
        "reward pool (vLLM scorer actors) scores each group of G episodes in one batched call; "
        "a GRPO learner (group-normalised advantages, clipped ratio, entropy bonus, no KL) "
        "updates the policy; K follows the curriculum. Writes <run_dir>/train/: checkpoints/, "
        "metrics.jsonl, training_curve.png, policy/ (safetensors + JSON) and heldout.json "
        "(refocus vs uniform vs random at K=4 on the test split).",
    )
    _add_config(tr)
    tr.add_argument("--resume", action="store_true",
                    help="continue from this run's last checkpoint (iteration, optimizer, "
                    "curriculum stage, seeds)")
    tr.add_argument("--dry-run", action="store_true",
                    help="validate the config and print the resources it would request")
    tr.set_defaults(fn=cmd_train)

    de = sub.add_parser("demo", help="run every stage on a config, each cached (make demo)")
    _add_config(de)
    de.set_defaults(fn=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
