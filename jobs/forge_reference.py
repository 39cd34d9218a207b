"""Forge the embedded reference VLM, then report how well it reads frames (through vLLM).

Run (CPU venv, after generating the evidence benchmark):

    HF_HUB_OFFLINE=1 VLLM_HOST_IP=127.0.0.1 VLLM_CPU_KVCACHE_SPACE=1 \
    VLLM_CPU_NUM_OF_RESERVED_CPU=0 python -m jobs.forge_reference \
        --table DATA/questions.parquet --out RUN/forge [--steps N] [--seed S] [--eval-only]

What to expect on 2 cores with the defaults: decoding + caching the train pools ~1 min, training
~6-8 min (1,000 steps of 32 subsets), vLLM engine start ~20 s, scoring the val report ~1 min.
Output: RUN/forge/checkpoint/ (an Idefics3 HF directory: vLLM and transformers load it as is),
RUN/forge/forge_report.json (per family, K = 4 and 8: accuracy and mean margin with and
without the evidence frames), RUN/forge/train_log.json. A healthy model reads >= 90% with
evidence and about chance without.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}.items():  # fmt: skip
    os.environ.setdefault(_k, _v)


def main(argv: list[str] | None = None) -> int:
    from refocus_ray.forge import ForgeConfig, evaluate_forge, forge

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", required=True, help="the benchmark's questions.parquet")
    ap.add_argument("--out", required=True, help="output dir (checkpoint/, forge_report.json)")
    ap.add_argument("--config", help="JSON file of ForgeConfig fields (overrides defaults)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--eval-only", action="store_true", help="report on OUT/checkpoint")
    args = ap.parse_args(argv)

    fields = json.loads(Path(args.config).read_text()) if args.config else {}
    fields |= {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    cfg = ForgeConfig(**fields)
    out = Path(args.out)
    ckpt = out / "checkpoint" if args.eval_only else forge(args.table, out, cfg)
    report = evaluate_forge(ckpt, args.table, ForgeConfig.load(ckpt))
    print(json.dumps({k: v for k, v in report.items() if k != "per_family"}, indent=1))
    for row in report["per_family"]:
        print({k: row[k] for k in ("family", "k", "acc_with_evidence", "acc_without_evidence",
                                   "chance", "margin_with_evidence", "n_with")})  # fmt: skip
    print("config:", dataclasses.asdict(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
