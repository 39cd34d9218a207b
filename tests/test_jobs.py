"""Every stage as users run it on a cluster: `ray job submit --working-dir . -- python -m jobs.X`.

One local head (`ray start --head --block`, its own ports and temp dir, token auth disabled on
both sides as the README allows) serves the module. The jobs run in order on one tiny run: a
generated evidence benchmark of 8 videos (prepare), a forged reference VLM of 3 steps served by
vLLM (forge_reference), the reward-variance filter, 2 GRPO iterations (train), evaluation and
export. Each test asserts the job SUCCEEDED and that its outputs exist in the run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 900

RUN = {  # the smallest run that exercises every stage
    "seed": 0,
    "data": {"kind": "evidence", "videos": 8, "seed": 0},
    "pool": {"max_frames": 32},
    "encoders": {"frame_size": 64},
    "forge": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "text_layers": 1,
              "vision_layers": 1, "eval_subsets": 1},
    "reference": {"model": "forge", "answer_mode": "content", "max_model_len": 2048,
                  "pool_name": "test-jobs-reference"},
    "filter": {"k": 4, "threshold": 0.0},
    "policy": {"d_model": 32, "n_heads": 2, "n_layers": 1},
    "train": {"iterations": 2, "group_size": 4, "groups_per_batch": 1,
              "groups_per_env_runner": 1, "curriculum": [[4, 2]], "checkpoint_every": 1},
    "evaluate": {"ks": [4], "methods": ["uniform", "random", "refocus"], "seeds": 1,
                 "examples": 1, "example_k": 4},
}


def _processes_under(path: str) -> list:
    """Processes whose command line names `path` (our head's temp dir: ours alone), with all
    their descendants (job drivers, their vLLM engine processes)."""
    import psutil

    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(path in a for a in p.info["cmdline"] or []):
            try:
                for q in [p, *p.children(recursive=True)]:
                    found[q.pid] = q
            except psutil.NoSuchProcess:
                pass
    return list(found.values())


class Head:
    """A Ray head started for this module, on free ports, stopped by its own pids only."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: socket paths live in it
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled",
                    "PATH": f"{BIN}:{os.environ['PATH']}"}
        ports = {"--port": free_port(), "--dashboard-port": self.port,
                 "--ray-client-server-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(),
                 "--dashboard-agent-grpc-port": free_port(),
                 "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2",
               "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
               "--include-dashboard", "true", "--temp-dir", f"{self.tmp}/ray",
               "--disable-usage-stats", *[str(x) for kv in ports.items() for x in kv]]
        self.log = Path(self.tmp) / "head.log"
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url)

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"ray start exited: {self.log.read_text()[-3000:]}")
            try:
                self.client().list_jobs()
                return
            except Exception:  # noqa: BLE001 -- not up yet; anything else shows in the log
                if time.monotonic() > deadline:
                    pytest.fail(f"head not ready after {timeout_s} s: "
                                f"{self.log.read_text()[-3000:]}")
                time.sleep(1)

    def stop(self) -> None:
        import psutil

        left = _processes_under(self.tmp)  # before they lose their parents
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # --block: stops every process it started
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for p in left + _processes_under(self.tmp):  # anything still there: ours, by pid
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    h = Head()
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, run dir) of the tiny run all jobs share."""
    d = tmp_path_factory.mktemp("jobs")
    cfg = {**RUN, "run_dir": str(d / "run")}
    (d / "run.yaml").write_text(yaml.safe_dump(cfg))
    return d / "run.yaml", d / "run"


def _submit(head: Head, module: str, *args: str) -> float:
    """`ray job submit` the job; assert it SUCCEEDED; return its wall time."""
    from ray.job_submission import JobStatus

    sid = f"test-{module}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head.url, "--submission-id", sid,
         "--working-dir", str(PROJECT_ROOT), "--", "python", "-m", f"jobs.{module}", *args],
        env=head.env, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False,
        timeout=JOB_TIMEOUT_S)
    seconds = time.perf_counter() - t0
    status = head.client().get_job_status(sid)
    logs = head.client().get_job_logs(sid)
    assert status == JobStatus.SUCCEEDED, f"{sid}: {status}\n{logs[-4000:]}\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0
    print(f"\n[jobs] {module}: SUCCEEDED in {seconds:.1f} s")
    return seconds


def test_prepare_job(head, run):
    cfg, rd = run
    _submit(head, "prepare", "--config", str(cfg))
    assert (rd / "data" / "questions.parquet").exists()  # the benchmark, generated on the way
    summary = json.loads((rd / "features" / "summary.json").read_text())
    assert summary["decoded"] == summary["videos"] == 8 and summary["failed"] == 0
    assert len(list((rd / "features" / "frames").glob("*/*.parquet"))) == 8


def test_forge_reference_job(head, run):
    cfg, rd = run
    _submit(head, "forge_reference", "--config", str(cfg))
    assert (rd / "forge" / "checkpoint" / "config.json").exists()
    report = json.loads((rd / "forge" / "forge_report.json").read_text())
    assert report["split"] == "val" and report["prompts"] > 0  # scored through vLLM
    conditions = ("acc_with_evidence", "acc_without_evidence", "acc_dense")
    assert all(report[c] is not None for c in conditions)
    assert sum(row["n_dense"] for row in report["per_family"]) > 0


def test_filter_job(head, run):
    if not (PROJECT_ROOT / "jobs" / "filter.py").exists():
        pytest.skip("jobs/filter.py does not exist")
    cfg, rd = run
    _submit(head, "filter", "--config", str(cfg))
    assert (rd / "filter" / "kept.parquet").exists()
    assert (rd / "filter" / "filter_summary.json").exists()


def test_train_job(head, run):
    cfg, rd = run
    _submit(head, "train", "--config", str(cfg))
    rows = (rd / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in rows] == [1, 2]
    assert (rd / "train" / "checkpoints" / "iter_000002" / "DONE").exists()
    assert (rd / "train" / "policy" / "model.safetensors").exists()
    assert (rd / "train" / "heldout.json").exists()


def test_evaluate_job(head, run):
    cfg, rd = run
    _submit(head, "evaluate", "--config", str(cfg))
    assert (rd / "eval" / "eval.md").exists()
    res = json.loads((rd / "eval" / "eval.json").read_text())
    assert res


def test_export_job(head, run):
    cfg, rd = run
    _submit(head, "export", "--config", str(cfg), "--k", "4", "--rollouts", "2", "--steps", "4")
    out = rd / "export" / "test"
    assert (out / "selections.parquet").exists() and (out / "export.json").exists()
    assert list((out / "frameidx").glob("cand0_nf4/DB*"))
