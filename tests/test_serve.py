"""The selector service: the real Ray Serve app over HTTP (httpx and curl), every endpoint and
every bad input; plus the pieces it is built from (batched sampling, media roots, URL allow-list,
crash-isolated decoding with injected faults).

One module-scoped app: an untrained but real exported policy (plumbing, not accuracy), the
embedded encoders, real footage clips as the media root, and a random-init Idefics3 on vLLM as
the answering model (letter mode). The app requires a bearer token so auth is exercised too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from refocus_ray import service
from refocus_ray.config import ConfigError, build
from refocus_ray.policy import PolicyConfig, SelectorPolicy, collate, example_from_pool, save
from refocus_ray.service import MediaRoots, ServeConfig, ServiceError
from refocus_ray.video import VideoError

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-" + "x" * 16
QUESTION = "Which object appears in the video?"
OPTIONS = ["cat", "dog", "moon", "page"]

for _k, _v in {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}.items():
    os.environ.setdefault(_k, _v)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def media(tmp_path_factory, clip_dir) -> dict[str, Path]:
    """A media root with real clips, a symlink inside it, one escaping it, and a file outside."""
    root = tmp_path_factory.mktemp("media")
    outside = tmp_path_factory.mktemp("outside")
    for name in ("short.mp4", "mid.mp4", "long.mp4", "truncated.mp4", "notes.mp4"):
        shutil.copy(clip_dir / name, root / name)
    (root / "sub").mkdir()
    shutil.copy(clip_dir / "mid.mp4", root / "sub" / "again.mp4")
    shutil.copy(clip_dir / "mid.mp4", outside / "secret.mp4")
    (root / "escape.mp4").symlink_to(outside / "secret.mp4")
    (root / "inner.mp4").symlink_to(root / "mid.mp4")
    return {"root": root, "outside": outside, "clips": clip_dir}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save(SelectorPolicy(PolicyConfig()), tmp_path_factory.mktemp("ckpt") / "policy")


@pytest.fixture(scope="module")
def app_url(ray_local, media, policy_dir, tmp_path_factory):
    """The real application on 127.0.0.1 (free port), answering model included."""
    from ray import serve as ray_serve

    from refocus_ray.forge import build_random_model
    from serve.app import build_app

    d = tmp_path_factory.mktemp("serve")
    model = build_random_model("idefics3", d / "idefics3")
    (d / "token").write_text(TOKEN + "\n")
    port = _free_port()
    app = build_app({
        "checkpoint": str(policy_dir), "config": str(ROOT / "configs" / "embedded.yaml"),
        "media_roots": [str(media["root"])],
        "set": {"serve.max_upload_mb": 1, "serve.max_k": 32, "serve.auth": "token",
                "serve.token_file": str(d / "token"), "serve.answer_model": str(model),
                # answer_max_model_len left at its default (4096): the 2,048-position model
                # must still start (the limit is capped at the model's own)
                "serve.answer_max_frames": 8,
                "serve.decode_timeout_s": 60, "serve.threads": 1,
                "serve.batch_wait_timeout_s": 0.05},
    })
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    ray_serve.run(app, name="refocus-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    ray_serve.delete("refocus-test")
    ray_serve.shutdown()


@pytest.fixture(scope="module")
def client(app_url):
    with httpx.Client(base_url=app_url, timeout=120,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


def _error(r: httpx.Response, status: int, *needles: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert body["status"] == status and body["code"] and body["message"]
    for n in needles:
        assert n in body["message"], (n, body["message"])
    return body


def _curl(*args: str) -> tuple[int, dict]:
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    body, _, code = out.rpartition("\n")
    return int(code), json.loads(body)


# ------------------------------------------------------------------------------ endpoints


@pytest.mark.vllm  # the module's app hosts the answering VLM
def test_probes_models_and_docs(client, app_url, policy_dir):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["pid"] > 0
    r = httpx.get(app_url + "/readyz")  # probes need no token
    assert r.status_code == 200 and r.json() == {"ready": True, "selector": True,
                                                 "answer_model": True}
    data = client.get("/v1/models").json()["data"]
    sha = hashlib.sha256((policy_dir / "model.safetensors").read_bytes()).hexdigest()
    assert data[0]["checkpoint_id"] == sha and data[0]["encoders"]["frame"].endswith("@112")
    assert data[1]["kind"] == "answer-vlm" and data[1]["answer_mode"] == "letter"
    spec = client.get("/openapi.json").json()
    assert {"/v1/select", "/v1/answer", "/healthz", "/readyz", "/v1/models"} <= set(spec["paths"])
    body = spec["paths"]["/v1/select"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert "swagger" in client.get("/docs").text.lower()


@pytest.mark.vllm  # the module's app hosts the answering VLM
def test_select_by_path_then_cached(client, policy_dir):
    r = client.post("/v1/select", json={"path": "long.mp4", "question": QUESTION,
                                        "options": OPTIONS, "k": 8, "seed": 3})
    assert r.status_code == 200, r.text
    a = r.json()
    f = a["frame_indices"]
    assert len(f) == 8 and f == sorted(f) and len(set(f)) == 8
    assert set(f) <= set(a["pool_frame_indices"]) and a["pool_size"] == 128  # 200 s, 4 fps cap
    assert a["timestamps_s"] == pytest.approx([i / a["video"]["fps"] for i in f], abs=1e-3)
    assert all(0 < p <= 1 for p in a["frame_probabilities"])
    assert sorted(a["pick_order"]) == list(range(8))
    assert math.isclose(sum(a["pool_distribution"]), 1.0, abs_tol=1e-3)
    assert len(a["pool_distribution"]) == 128
    assert a["checkpoint_id"] == hashlib.sha256(
        (policy_dir / "model.safetensors").read_bytes()).hexdigest()
    assert a["cache"] == "miss" and a["timing_ms"]["decode"] > 0 and a["timing_ms"]["encode"] > 0
    assert a["fallback"] is None and a["seed"] == 3 and a["batch_size"] >= 1
    # a second question on the same video: no decoding, no frame encoding
    b = client.post("/v1/select", json={"path": "long.mp4", "question": "How many bikes?",
                                        "k": 8, "mode": "greedy"}).json()
    assert b["cache"] == "hit" and b["timing_ms"]["decode"] == 0
    assert b["open_ended"] is True and b["mode"] == "greedy" and b["seed"] is None
    # the same request with the same seed gives the same frames; greedy is deterministic
    again = client.post("/v1/select", json={"path": "long.mp4", "question": QUESTION,
                                            "options": OPTIONS, "k": 8, "seed": 3}).json()
    assert again["frame_indices"] == f
    g2 = client.post("/v1/select", json={"path": "long.mp4", "question": "How many bikes?",
                                         "k": 8, "mode": "greedy"}).json()
    assert g2["frame_indices"] == b["frame_indices"]


@pytest.mark.vllm  # the module's app hosts the answering VLM
def test_symlink_inside_root_and_subdir(client, media):
    for path in ("inner.mp4", "sub/again.mp4", str(media["root"] / "mid.mp4")):
        r = client.post("/v1/select", json={"path": path, "question": QUESTION, "k": 4})
        assert r.status_code == 200, (path, r.text)


@pytest.mark.vllm  # the module's app hosts the answering VLM
def test_uniform_fallback_for_small_pools(client):
    from refocus_ray.selectors import uniform

    a = client.post("/v1/select", json={"path": "short.mp4", "question": QUESTION, "k": 4,
                                        "max_frames": 12}).json()
    assert a["fallback"] == "uniform" and a["pool_size"] == 12 and a["batch_size"] == 0
    pool = a["pool_frame_indices"]
    assert a["frame_indices"] == [pool[i] for i in uniform(12, 4)]
    assert a["frame_probabilities"] is None and a["pool_distribution"] is None


@pytest.mark.vllm  # the module's app hosts the answering VLM
def test_upload_multipart_httpx_and_curl(client, app_url, media):
    clip = media["root"] / "mid.mp4"
    r = client.post("/v1/select", files={"file": ("clip.mp4", clip.read_bytes(), "video/mp4")},
                    data={"question": QUESTION, "options": json.dumps(OPTIONS), "k": "6",
                          "max_fps": "2"})
    assert r.status_code == 200, r.text
    a = r.json()
    assert len(a["frame_indices"]) == 6 and a["pool_size"] == 80  # 40 s at 2 fps
    code, b = _curl("-H", f"Authorization: Bearer {TOKEN}", "-F", f"file=@{clip}",
                    "-F", f"question={QUESTION}", "-F", "options=cat", "-F", "options=dog",
                    "-F", "k=6", "-F", "max_fps=2", app_url + "/v1/select")
    assert code == 200 and b["video"]["sha256"] == a["video"]["sha256"]
    assert b["cache"] == "hit"  # same bytes: content hash hit, decoded once
    code, c = _curl("-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/json",
                    "-d", json.dumps({"path": "mid.mp4", "question": QUESTION, "k": 3}),
                    app_url + "/v1/select")
    assert code == 200 and len(c["frame_indices"]) == 3


@pytest.mark.vllm  # the module's app hosts the answering VLM
def test_concurrent_requests_share_policy_batches(client, app_url):
    client.post("/v1/select", json={"path": "mid.mp4", "question": QUESTION, "k": 4})

    def one(i: int) -> dict:
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            r = c.post(app_url + "/v1/select", json={"path": "mid.mp4", "k": 2 + i % 5,
                                                     "question": f"question {i}?", "seed": i})
            assert r.status_code == 200, r.text
            return r.json()

    with ThreadPoolExecutor(8) as ex:
        out = list(ex.map(one, range(16)))
    assert max(o["batch_size"] for o in out) > 1
    assert [len(o["frame_indices"]) for o in out] == [2 + i % 5 for i in range(16)]


@pytest.mark.vllm  # the module's app hosts the answering VLM
def test_answer_endpoint(client, app_url):
    r = client.post("/v1/answer", json={"path": "long.mp4", "question": QUESTION,
                                        "options": OPTIONS, "k": 4, "seed": 1})
    assert r.status_code == 200, r.text
    a = r.json()
    assert a["answer"] in OPTIONS and a["answer"] == OPTIONS[a["answer_index"]]
    assert len(a["option_scores"]) == 4 and all(s < 0 for s in a["option_scores"])
    assert math.isclose(sum(a["option_probs"]), 1.0, abs_tol=1e-4)
    assert a["frames_used"] == a["selection"]["frame_indices"] and len(a["frames_used"]) == 4
    assert a["timing_ms"]["answer"] > 0
    code, b = _curl("-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/json",
                    "-d", json.dumps({"path": "mid.mp4", "question": QUESTION, "options": OPTIONS,
                                      "k": 3, "mode": "greedy"}), app_url + "/v1/answer")
    assert code == 200 and b["answer"] in OPTIONS and len(b["frames_used"]) == 3
    _error(client.post("/v1/answer", json={"path": "long.mp4", "question": QUESTION, "k": 4}),
           422, "options")
    _error(client.post("/v1/answer", json={"path": "long.mp4", "question": QUESTION, "k": 12,
                                           "options": OPTIONS}), 422, "answer_max_frames")


# ---------------------------------------------------------------------------- bad inputs


BAD_JSON = [
    ({"path": "../outside/secret.mp4", "question": QUESTION}, 403, "outside the media roots"),
    ({"path": "/etc/passwd", "question": QUESTION}, 403, "outside the media roots"),
    ({"path": "escape.mp4", "question": QUESTION}, 403, "outside the media roots"),
    ({"path": "sub/../../x.mp4", "question": QUESTION}, 403, "outside the media roots"),
    ({"path": "absent.mp4", "question": QUESTION}, 404, "not found"),
    ({"path": "sub", "question": QUESTION}, 422, "not a regular file"),
    ({"path": "mid.mp4", "question": QUESTION, "k": 0}, 422, "k=0"),
    ({"path": "mid.mp4", "question": QUESTION, "k": -3}, 422, "k=-3"),
    ({"path": "mid.mp4", "question": QUESTION, "k": 33}, 422, "serve.max_k=32"),
    ({"path": "mid.mp4", "question": QUESTION, "k": 2.5}, 422, "k:"),
    ({"path": "mid.mp4", "question": QUESTION, "k": 20, "max_frames": 10}, 422,
     "larger than this video's candidate pool (10 frames"),
    ({"path": "mid.mp4", "question": QUESTION, "max_frames": 4096}, 422, "max_pool_frames"),
    ({"path": "mid.mp4", "question": QUESTION, "max_fps": 0}, 422, "max_fps"),
    ({"path": "mid.mp4"}, 422, "question: Field required"),
    ({"path": "mid.mp4", "question": "   "}, 422, "question"),
    ({"path": "mid.mp4", "question": QUESTION, "options": ["a", "a"]}, 422, "distinct"),
    ({"path": "mid.mp4", "question": QUESTION, "mode": "beam"}, 422, "mode"),
    ({"path": "mid.mp4", "question": QUESTION, "weights": "x.pkl"}, 422, "weights"),
    ({"question": QUESTION}, 400, "exactly one video"),
    ({"path": "mid.mp4", "url": "https://example.org/v.mp4", "question": QUESTION}, 400,
     "exactly one video"),
    ({"url": "https://example.org/v.mp4", "question": QUESTION}, 403, "fetching URLs is disabled"),
    ({"path": "truncated.mp4", "question": QUESTION}, 422, "truncated.mp4"),
    ({"path": "notes.mp4", "question": QUESTION}, 422, "not a readable video"),
    ([1, 2], 422, "JSON object"),
]


@pytest.mark.vllm
@pytest.mark.parametrize("body,status,needle", BAD_JSON,
                         ids=[f"{i}-{s}" for i, (_, s, _) in enumerate(BAD_JSON)])
def test_bad_json_requests(client, body, status, needle, media):
    err = _error(client.post("/v1/select", json=body), status, needle)
    assert str(media["root"]) not in err["message"]  # server paths never leak


@pytest.mark.vllm  # the module's app hosts the answering VLM
def test_bad_bodies_and_auth(client, app_url, media):
    _error(client.post("/v1/select", content=b'{"path": "mid.mp4", "question": ',
                       headers={"Content-Type": "application/json"}), 400, "malformed JSON")
    _error(client.post("/v1/select", content=b"path=mid.mp4",
                       headers={"Content-Type": "text/plain"}), 415, "multipart/form-data")
    big = os.urandom(2 * 1024 * 1024)
    _error(client.post("/v1/select", files={"file": ("big.mp4", big, "video/mp4")},
                       data={"question": QUESTION}), 413, "max_upload_mb")
    notes = (media["root"] / "notes.mp4").read_bytes()
    _error(client.post("/v1/select", files={"file": ("notes.mp4", notes, "video/mp4")},
                       data={"question": QUESTION}), 422, "notes.mp4")
    _error(client.post("/v1/select", files={"file": ("a.mp4", b"", "video/mp4")},
                       data={"question": QUESTION}), 422, "empty")
    _error(client.post("/v1/select", files={"file": ("a.mp4", notes, "video/mp4")},
                       data={"question": QUESTION, "path": "mid.mp4"}), 400, "exactly one")
    _error(client.post("/v1/select", files={"file": ("a.mp4", notes, "video/mp4")},
                       data={"k": "4"}), 422, "question")
    _error(httpx.post(app_url + "/v1/select", json={"path": "mid.mp4", "question": QUESTION}),
           401, "missing bearer token")
    _error(httpx.get(app_url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401,
           "invalid bearer token")
    code, b = _curl("-X", "POST", "-H", "Content-Type: application/json", "-d", "{nope",
                    "-H", f"Authorization: Bearer {TOKEN}", app_url + "/v1/select")
    assert code == 400 and "malformed JSON" in b["error"]["message"]


@pytest.mark.vllm  # the module's app hosts the answering VLM
def test_failed_requests_leave_the_replica_up(client):
    pid = client.get("/healthz").json()["pid"]
    for name in ("truncated.mp4", "notes.mp4", "../../etc/passwd"):
        assert client.post("/v1/select", json={"path": name, "question": QUESTION}
                           ).status_code in (403, 422)
    r = client.post("/v1/select", json={"path": "mid.mp4", "question": QUESTION, "k": 4})
    assert r.status_code == 200 and client.get("/healthz").json()["pid"] == pid


# ---------------------------------------------------------------- the pieces, without HTTP


def test_batched_sampling_matches_policy_sample(clip_dir):
    """`sample_rows` is `policy.sample` per row: same picks alone, in a batch, any batch-mates."""
    from refocus_ray.features import PoolFeatures

    torch.manual_seed(0)
    pol = SelectorPolicy(PolicyConfig(frame_dim=24, text_dim=16, d_model=32, n_heads=4)).eval()
    rng = np.random.default_rng(0)
    pools = [PoolFeatures(np.arange(n) * 3, np.arange(n) * 0.5, rng.normal(size=(n, 24)), 8.0,
                          3 * n) for n in (40, 25, 33)]
    exs = [example_from_pool(p, rng.normal(size=16), rng.normal(size=(4, 16)) if i else None)
           for i, p in enumerate(pools)]
    ks, greedy, seeds = [5, 8, 3], [False, False, True], [11, 12, 0]
    batched = service.sample_rows(pol, collate(exs), ks, greedy, seeds)
    for i, ex in enumerate(exs):
        alone = service.sample_rows(pol, collate([ex]), [ks[i]], [greedy[i]], [seeds[i]])[0]
        ref = pol.sample(collate([ex]), ks[i], greedy=greedy[i],
                         generator=torch.Generator().manual_seed(seeds[i]))
        assert batched[i].chosen == alone.chosen == ref.chosen[0].tolist()
        assert np.allclose(alone.step_probs, ref.logp[0].exp().numpy(), atol=1e-5)
        assert np.allclose(batched[i].pool_probs, ref.probs[0].numpy(), atol=1e-4)
        assert math.isclose(float(batched[i].pool_probs.sum()), 1.0, abs_tol=1e-4)


def test_media_roots_resolve_then_contain(media):
    roots = MediaRoots([str(media["root"])])
    assert roots.resolve("mid.mp4") == (media["root"] / "mid.mp4").resolve()
    assert roots.resolve("inner.mp4") == (media["root"] / "mid.mp4").resolve()
    for bad in ("escape.mp4", "../" + media["outside"].name + "/secret.mp4",
                str(media["outside"] / "secret.mp4"), "/etc/passwd", "/"):
        with pytest.raises(ServiceError) as e:
            roots.resolve(bad)
        assert e.value.status == 403
    with pytest.raises(ServiceError) as e:
        MediaRoots([]).resolve("mid.mp4")
    assert e.value.status == 403 and "upload" in e.value.message


def test_url_allow_list_is_off_by_default():
    with pytest.raises(ServiceError, match="disabled"):
        service.check_url("https://media.example.org/a.mp4", [])
    assert service.check_url("https://media.example.org/a.mp4", ["media.example.org"])
    assert service.check_url("https://cdn.example.org/a.mp4", [".example.org"])
    for url, status in [("https://evil.org/a.mp4", 403), ("file:///etc/passwd", 422),
                        ("https://user:pw@media.example.org/a", 422),
                        ("https://media.example.org.evil.org/a", 403)]:
        with pytest.raises(ServiceError) as e:
            service.check_url(url, ["media.example.org"])
        assert e.value.status == status, url


def test_isolated_decoding_survives_injected_faults(media):
    """Injected faults: a child that aborts (as a crashing decoder does) and one that hangs."""
    with pytest.raises(VideoError, match="decoder crashed"):
        service.run_isolated(os.abort, (), 30, "injected-fault-abort")
    t = time.monotonic()
    with pytest.raises(VideoError, match="timed out"):
        service.run_isolated(time.sleep, (60,), 1, "injected-fault-hang")
    assert time.monotonic() - t < 10
    frames = service.run_isolated(service._decode_frames,
                                  (str(media["root"] / "mid.mp4"), [0, 5, 9], 32), 60, "mid")
    assert frames.shape[0] == 3 and frames.shape[2:] == (32, 3) and frames.dtype == np.uint8
    assert frames.shape[1] < 32  # long side 32, aspect kept


def test_config_validation_names_keys(tmp_path, policy_dir):
    with pytest.raises(ConfigError, match="serve.max_kk: unknown key"):
        build(ServeConfig, {"max_kk": 3}, "serve")
    with pytest.raises(ConfigError, match="serve.default_k"):
        build(ServeConfig, {"default_k": 80, "max_k": 64}, "serve")
    assert not ServeConfig().auth_required() and ServeConfig(host="0.0.0.0").auth_required()
    os.environ.pop("REFOCUS_SERVE_TOKEN", None)
    with pytest.raises(ConfigError, match="bearer token is required"):
        service.settings_from_args({"checkpoint": str(policy_dir), "host": "0.0.0.0",
                                    "answer_model": None})
    with pytest.raises(ConfigError, match="serve.answer_model: .*make demo"):
        service.settings_from_args({"checkpoint": str(policy_dir),
                                    "answer_model": str(tmp_path / "no-such-model")})
    with pytest.raises(ConfigError, match="model.safetensors missing|policy.json missing"):
        service.settings_from_args({"checkpoint": str(tmp_path)})
    with pytest.raises(ServiceError):
        service.check_bearer("Bearer nope", "right")
    service.check_bearer(None, None)


def test_deploy_config_and_cli_parser():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from refocus_ray.cli import build_parser

    spec = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve/config.yaml").read_text()))
    assert spec.http_options.host == "127.0.0.1"
    assert spec.applications[0].import_path == "serve.app:app"
    args = build_parser().parse_args(["serve", "--checkpoint", "ck", "--media-root", "/data"])
    assert (args.host, args.port, args.media_root) == ("127.0.0.1", 8000, ["/data"])
