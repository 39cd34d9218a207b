"""The `openai` backend against a real OpenAI-compatible vLLM server that the test starts.

The server (`python -m vllm.entrypoints.openai.api_server`, CPU, fp32) serves the random
plumbing Idefics3 (letter mode, SmolVLM-style tiling, frames at native size); the same requests
on real clips go through it and through the in-process `vllm` backend. Both run vLLM in fp32 on
the same prompt, pixels (PNG is lossless) and token ids, so option log-probs agree to `TOL`.
A second server serves a tiny forged checkpoint that numbers its frames, as the embedded
reference does, checked against the `transformers` backend.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOL = 1e-4  # fp32 server vs fp32 in-process engine, log-prob units (README: reference model)
START_TIMEOUT_S = 900.0  # ~40 s on an idle 2-core machine; 6.5 min seen on a shared one
MAX_FRAMES = 8


def server_command(model: str, port: int) -> list[str]:
    """How README says to start the server for the `openai` backend (CPU, fp32)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", "2048", "--enforce-eager",
            "--limit-mm-per-prompt", json.dumps({"image": MAX_FRAMES}),
            "--disable-uvicorn-access-log"]  # fmt: skip


def wait_healthy(url: str, proc: subprocess.Popen, log, timeout_s: float) -> None:
    """Poll /health until 200; fail with the server's log if it exits or the time runs out."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(2)
    log.flush()
    tail = Path(log.name).read_text(errors="replace")[-3000:]
    pytest.fail(f"vLLM server at {url} not healthy (exit code {proc.poll()}) after "
                f"{timeout_s:.0f} s; log tail:\n{tail}")


@contextmanager
def _serve(model: str, tmp_path_factory):
    """A real OpenAI-compatible vLLM server for `model` on a free port; killed with its engine
    process (its own process group) however the tests end."""
    pytest.importorskip("vllm")
    port = free_port()
    log = open(tmp_path_factory.mktemp("openai") / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(server_command(model, port), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, log, START_TIMEOUT_S)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(plumbing_model, tmp_path_factory):
    """The server on the random plumbing model (letter mode, tiled frames)."""
    with _serve(str(plumbing_model), tmp_path_factory) as url:
        yield url


def _requests(clip_dir):
    from refocus_ray.scoring import ScoreRequest

    q = "Which object appears in the video?"
    return [
        ScoreRequest(str(clip_dir / "short.mp4"), (3,), q, ("cat", "dog")),
        ScoreRequest(str(clip_dir / "mid.mp4"), (40, 5, 700, 333), q, ("cat", "dog", "moon")),
        ScoreRequest(str(clip_dir / "mid.mp4"), (1, 2, 3, 4), q, ("cat", "dog", "moon")),
        ScoreRequest(str(clip_dir / "long.mp4"), tuple(range(0, 800, 100)),
                     "How many objects appear?", ("cat", "dog", "moon", "page", "one")),
    ]  # fmt: skip


def test_openai_backend_scores_equal_vllm_backend(server, plumbing_model, clip_dir):
    from refocus_ray.scoring import OpenAIBackend, ReferenceConfig, VLLMBackend

    cfg = ReferenceConfig(backend="openai", model=str(plumbing_model), answer_mode="letter",
                          max_model_len=2048, openai_url=server)  # fmt: skip
    reqs = _requests(clip_dir)
    z_openai = OpenAIBackend(cfg).score(reqs)
    local = VLLMBackend(cfg)
    try:
        z_vllm = local.score(reqs)
    finally:
        local.scorer.close()
    assert [len(z) for z in z_openai] == [len(r.options) for r in reqs]
    for r, zo, zv in zip(reqs, z_openai, z_vllm):
        assert np.abs(np.array(zo) - np.array(zv)).max() < TOL, (r.frames, zo, zv)
    # not vacuous: the frames move the scores by far more than the tolerance
    assert np.abs(np.array(z_vllm[1]) - np.array(z_vllm[2])).max() > 100 * TOL


def test_openai_backend_errors_name_the_server(server, plumbing_model, clip_dir):
    from refocus_ray.scoring import OpenAIBackend, ReferenceConfig

    cfg = ReferenceConfig(backend="openai", model=str(plumbing_model), answer_mode="letter",
                          openai_url=server)  # fmt: skip
    backend = OpenAIBackend(cfg)
    req = _requests(clip_dir)[3]
    too_many = type(req)(req.video, tuple(range(0, 900, 100)), req.question, req.options)
    with pytest.raises(RuntimeError, match=r"chat/completions: HTTP 400"):
        backend.score([too_many])  # 9 frames; the server takes MAX_FRAMES
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(RuntimeError, match=rf"{dead}/models: no answer"):
        OpenAIBackend(ReferenceConfig(backend="openai", model=str(plumbing_model),
                                      answer_mode="letter", openai_url=dead))  # fmt: skip


def test_openai_backend_numbers_frames_like_the_checkpoint(forged_tiny, clip_dir, tmp_path_factory):
    """A forged checkpoint that numbers its frames (like the embedded reference) served as README
    says: the backend sends each number as a text part before its image, and scores what the
    in-process backends score (without the numbers it would score another prompt)."""
    from conftest import FORGED_OPTIONS, FORGED_QUESTION

    from refocus_ray.scoring import (
        OpenAIBackend,
        ReferenceConfig,
        ScoreRequest,
        TransformersBackend,
    )

    ckpt = str(forged_tiny[0])
    reqs = [ScoreRequest(str(clip_dir / "mid.mp4"), f, FORGED_QUESTION, tuple(FORGED_OPTIONS))
            for f in [(3,), (10, 200, 700), (1, 2, 3, 4)]]  # fmt: skip
    local = TransformersBackend(ReferenceConfig(backend="transformers", model=ckpt,
                                                answer_mode="content"))  # fmt: skip
    z_local = np.array(local.score(reqs))
    with _serve(ckpt, tmp_path_factory) as url:
        backend = OpenAIBackend(ReferenceConfig(backend="openai", model=ckpt,
                                                answer_mode="content", openai_url=url))  # fmt: skip
        assert backend.frame_labels
        z_openai = np.array(backend.score(reqs))
    assert np.abs(z_openai - z_local).max() < TOL, (z_openai, z_local)
