"""Stage caching: a stage re-runs only when its config or inputs changed.

Each stage keeps ``<run_dir>/<stage>/stage.json`` with the fingerprint it ran with (a hash of
its config section and its inputs' hashes) and its result summary. `make demo` twice re-runs
nothing that is already done; change one config key and only the stages downstream re-run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refocus_ray.config import stable_hash


def stage_file(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / name / "stage.json"


def cached_result(run_dir: Path, name: str, fingerprint: Any) -> dict[str, Any] | None:
    """The stored result if the stage already ran with this fingerprint, else None."""
    f = stage_file(run_dir, name)
    if not f.exists():
        return None
    rec = json.loads(f.read_text())
    return rec["result"] if rec.get("fingerprint") == stable_hash(fingerprint) else None


def run_stage(
    run_dir: Path, name: str, fingerprint: Any, fn: Callable[[], dict[str, Any]],
    log: Callable[[str], None] = print, outputs: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """Run `fn` unless a finished run with the same fingerprint is recorded and every path in
    `outputs` still exists (a deleted artifact re-runs its stage)."""
    res = cached_result(run_dir, name, fingerprint)
    if res is not None and all(Path(p).exists() for p in outputs):
        log(f"[{name}] cached (fingerprint {stable_hash(fingerprint)}), skipping")
        return res
    log(f"[{name}] running")
    t0 = time.time()
    res = fn()
    f = stage_file(run_dir, name)
    f.parent.mkdir(parents=True, exist_ok=True)
    rec = {"fingerprint": stable_hash(fingerprint), "seconds": round(time.time() - t0, 2),
           "result": res}
    f.write_text(json.dumps(rec, indent=2, default=str))
    log(f"[{name}] done in {rec['seconds']:.1f} s")
    return res
