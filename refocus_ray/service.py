"""Serving the selector: request validation, media-root checks, the feature cache, batched picks.

Everything here is plain Python (asyncio, pydantic, numpy; torch only inside the functions that
run the models), so `serve/app.py` stays a thin Ray Serve + FastAPI layer and the logic can be
exercised without HTTP. What a request may do is deliberately small:

* read a video only from inside the configured media roots (the path is resolved, symlinks
  included, *then* checked for containment), from an upload (bounded while it streams), or from
  a URL whose host is on an explicit allow-list (off by default);
* never load a pickle (the policy is safetensors + JSON), never name a model or a file outside
  the roots, never make the replica decode in its own process: decoding runs in a crash-isolated
  child with a timeout (`video.decode_isolated`), so a hostile file costs one child process.

Features of a pool are cached by the video's content sha256 + frame encoder + pool parameters,
so a second question about the same video skips decoding and encoding; question texts are cached
too. Policy forward passes of concurrent requests run as one padded batch (`sample_rows`).

This module is also imported by the crash-isolated frame decoder (`_decode_frames` runs in a
forkserver child), so its top level imports nothing heavy: torch, the policy, the encoders and
Starlette are imported where they are used.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from refocus_ray.config import Config, ConfigError, _one_of, _positive, build, load_config
from refocus_ray.video import run_isolated

if TYPE_CHECKING:
    from refocus_ray.features import PoolFeatures
    from refocus_ray.policy import PolicyBatch, SelectorPolicy
    from refocus_ray.video import VideoInfo

DEFAULT_CHECKPOINT = "runs/embedded/train/policy"
DEFAULT_CONFIG = "configs/embedded.yaml"
LOOPBACK_NAMES = ("localhost",)
JSON_BODY_LIMIT = 64 * 1024  # a select request is a few hundred bytes; options included
FORM_FIELD_LIMIT = 16 * 1024
MAX_OPTIONS = 26  # letter mode names options A..Z
MAX_TEXT = 2000


# ----------------------------------------------------------------------------------- config


@dataclass
class ServeConfig:
    """The `serve:` section of a run config. Every key is validated; errors name `serve.<key>`."""

    host: str = "127.0.0.1"  # what `refocus serve` binds; anything else needs a token (auth)
    port: int = 8000
    media_roots: list[str] = field(default_factory=list)  # `path` requests must resolve in here
    max_upload_mb: float = 256.0
    default_k: int = 8
    max_k: int = 64
    max_pool_frames: int = 512  # per-request `max_frames` cap (the paper's pool)
    max_pool_fps: float = 8.0  # per-request `max_fps` cap
    decode_timeout_s: float = 60.0
    decode_concurrency: int = 2  # decoding children at once per replica
    feature_cache_mb: float = 512.0  # per replica; float16 features (512 x 1280 = 1.3 MB/video)
    text_cache_items: int = 4096
    max_batch_size: int = 16  # @serve.batch of policy forward passes
    batch_wait_timeout_s: float = 0.005
    num_replicas: int = 1
    autoscaling: dict[str, Any] = field(default_factory=dict)  # Serve autoscaling_config
    max_ongoing_requests: int = 32
    num_cpus: float = 1.0
    # torch intra-op threads of a replica (encoders and policy). Keep it at num_cpus: on a
    # shared 2-core box, 2 OpenMP threads made a 512-frame policy pass ~40x slower (each
    # barrier waits for a descheduled thread); 1 thread ran it in ~55 ms
    threads: int = 1
    auth: str = "auto"  # auto: token required unless host is loopback | token | off
    token_env: str = "REFOCUS_SERVE_TOKEN"  # env var holding the bearer token
    token_file: str | None = None  # or a file holding it (read at start, never logged)
    allow_url_hosts: list[str] = field(default_factory=list)  # empty: URL fetching is off
    url_timeout_s: float = 30.0
    answer_model: str | None = None  # HF checkpoint dir of the answering VLM (vLLM)
    answer_mode: str | None = None  # content | letter; default: forged -> content, else letter
    answer_max_frames: int = 32
    answer_dtype: str = "float32"
    answer_max_model_len: int = 4096
    answer_num_cpus: float = 1.0
    answer_max_side: int = 512  # frames sent to the VLM are downscaled to this long side
    answer_max_batch_size: int = 8

    def check(self, key: str = "serve") -> None:
        for name in ("port", "max_upload_mb", "default_k", "max_k", "max_pool_frames",
                     "max_pool_fps", "decode_timeout_s", "decode_concurrency", "feature_cache_mb",
                     "text_cache_items", "max_batch_size", "batch_wait_timeout_s", "num_replicas",
                     "max_ongoing_requests", "threads", "url_timeout_s", "answer_max_frames",
                     "answer_max_model_len", "answer_max_side", "answer_max_batch_size"):
            _positive(f"{key}.{name}", getattr(self, name))
        if self.num_cpus < 0 or self.answer_num_cpus < 0:
            raise ConfigError(f"{key}.num_cpus / {key}.answer_num_cpus: must be >= 0")
        _one_of(f"{key}.auth", self.auth, ("auto", "token", "off"))
        if self.answer_mode is not None:
            _one_of(f"{key}.answer_mode", self.answer_mode, ("content", "letter"))
        if self.default_k > self.max_k:
            raise ConfigError(f"{key}.default_k: {self.default_k} exceeds {key}.max_k={self.max_k}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(f"{key}.max_ongoing_requests ({self.max_ongoing_requests}) must be "
                              f">= {key}.max_batch_size ({self.max_batch_size}) or batches "
                              "never fill")
        for i, host in enumerate(self.allow_url_hosts):
            if not host or "/" in host or ":" in host:
                raise ConfigError(f"{key}.allow_url_hosts[{i}]: a bare host name is expected "
                                  f"(e.g. media.example.org), got {host!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def auth_required(self) -> bool:
        """`auto` requires a token unless the service only listens on loopback."""
        return self.auth == "token" or (self.auth == "auto" and not is_loopback(self.host))

    def deployment_options(self) -> dict[str, Any]:
        """Ray Serve options of the selector deployment (a deploy config can override them)."""
        opts: dict[str, Any] = {"max_ongoing_requests": self.max_ongoing_requests,
                                "ray_actor_options": {"num_cpus": self.num_cpus}}
        if self.autoscaling:
            opts["autoscaling_config"] = dict(self.autoscaling)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Settings:
    """Everything a replica needs, as plain data (it crosses processes in `.bind()`)."""

    checkpoint: str
    config: str | None
    overrides: dict[str, Any]

    def load(self) -> tuple[Config, ServeConfig]:
        cfg = load_config(self.config, self.overrides)
        return cfg, build(ServeConfig, cfg.section("serve"), "serve")


def settings_from_args(args: dict[str, Any] | None) -> Settings:
    """Application-builder args (`serve run serve.app:app checkpoint=DIR media_roots=A:B ...`,
    a deploy config's `args:`, or `refocus serve`) -> Settings with absolute paths.

    Paths are made absolute here, in the process that reads the command line, because replicas
    may run with another working directory. Validates early so a typo fails before Ray starts.
    Keys: checkpoint, config, media_roots (list, or a string split on os.pathsep), host, any
    `serve.<key>` or other dotted config key, and `set` (a mapping of dotted keys).
    """
    import yaml

    args = dict(args or {})
    ckpt = Path(str(args.pop("checkpoint", DEFAULT_CHECKPOINT))).resolve()
    config = args.pop("config", DEFAULT_CONFIG)
    if config == DEFAULT_CONFIG and not Path(config).exists():  # run outside the checkout root
        config = str(Path(__file__).resolve().parent.parent / DEFAULT_CONFIG)
    config = None if config in (None, "", "none") else str(Path(str(config)).resolve())
    overrides: dict[str, Any] = {}
    for key, value in dict(args.pop("set", None) or {}).items():
        overrides[key] = value
    roots = args.pop("media_roots", args.pop("media_root", None))
    if roots is not None:
        if isinstance(roots, str):
            roots = [r for r in roots.split(os.pathsep) if r]
        overrides["serve.media_roots"] = [str(Path(r).resolve()) for r in roots]
    if "host" in args:
        overrides["serve.host"] = str(args.pop("host"))
    for key, value in args.items():  # remaining builder args: dotted config keys
        dotted = key if "." in key else f"serve.{key}"
        overrides[dotted] = yaml.safe_load(value) if isinstance(value, str) else value
    for key in ("serve.answer_model", "serve.token_file"):
        if overrides.get(key):
            overrides[key] = str(Path(str(overrides[key])).resolve())
    _, scfg = Settings(str(ckpt), config, overrides).load()
    # roots and the answer model named in the config file are relative to this process's cwd
    overrides["serve.media_roots"] = [str(Path(r).resolve()) for r in scfg.media_roots]
    if scfg.answer_model:
        overrides["serve.answer_model"] = str(Path(scfg.answer_model).resolve())
    settings = Settings(str(ckpt), config, overrides)
    check_settings(settings)
    return settings


def check_settings(settings: Settings) -> None:
    """Fail fast, naming the key: checkpoint files, media roots, answer model, token."""
    from refocus_ray.policy import CONFIG_FILE, WEIGHTS_FILE

    _, scfg = settings.load()
    ck = Path(settings.checkpoint)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (ck / name).is_file():
            raise ConfigError(f"checkpoint {ck}: {name} missing; export a policy with "
                              "`refocus train` (train/policy/) or refocus_ray.policy.save")
    for i, root in enumerate(scfg.media_roots):
        if not Path(root).is_dir():
            raise ConfigError(f"serve.media_roots[{i}]: {root} is not a directory")
    if scfg.answer_model and not (Path(scfg.answer_model) / "config.json").is_file():
        raise ConfigError(f"serve.answer_model: {scfg.answer_model} is not a Hugging Face "
                          "checkpoint directory (no config.json); `make demo` forges the "
                          "embedded one, or set serve.answer_model=null to serve without "
                          "POST /v1/answer")
    if scfg.auth_required() and not read_token(scfg):
        raise ConfigError(f"serve.auth: host {scfg.host} is not loopback, so a bearer token is "
                          f"required: set ${scfg.token_env} or serve.token_file (or serve.auth="
                          "off if something in front of the service authenticates)")


def read_token(scfg: ServeConfig) -> str | None:
    if scfg.token_file:
        token = Path(scfg.token_file).read_text().strip()
        return token or None
    return os.environ.get(scfg.token_env) or None


# ----------------------------------------------------------------------------------- errors


class ServiceError(Exception):
    """A request failed for a reason the client should hear: HTTP status, code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "code": self.code, "message": self.message}}


def validation_message(err: ValidationError | Sequence[dict[str, Any]]) -> str:
    """pydantic's error list as one line: `k: Input should be a valid integer; question: ...`."""
    errors = err.errors() if isinstance(err, ValidationError) else err
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


class AuthError(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(401, "unauthorized", message)


# The bearer token of this process's replica. Module state here (an installed module, always
# imported by reference) rather than in serve/app.py, whose functions Ray may pickle by value.
_PROCESS_TOKEN: dict[str, str | None] = {"token": None}


def set_process_token(token: str | None) -> None:
    _PROCESS_TOKEN["token"] = token


def authorize(header: str | None) -> None:
    """Check a request's Authorization header against this replica's token (if any)."""
    check_bearer(header, _PROCESS_TOKEN["token"])


def check_bearer(header: str | None, token: str | None) -> None:
    """Constant-time bearer check; `token=None` means auth is off."""
    if token is None:
        return
    if not header or not header.lower().startswith("bearer "):
        raise AuthError("missing bearer token: send `Authorization: Bearer <token>`")
    if not hmac.compare_digest(header[7:].strip().encode(), token.encode()):
        raise AuthError("invalid bearer token")


# --------------------------------------------------------------------------------- requests


class SelectRequest(BaseModel):
    """A selection request. Exactly one video source: `path` (under a media root), an uploaded
    `file` (multipart), or `url` (only when `serve.allow_url_hosts` lists its host)."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="video path, relative to a media root or absolute "
                             "inside one", max_length=4096)
    url: str | None = Field(None, description="http(s) URL; only hosts in serve.allow_url_hosts",
                            max_length=4096)
    question: str = Field(..., min_length=1, max_length=MAX_TEXT)
    options: list[str] | None = Field(None, max_length=MAX_OPTIONS,
                                      description="answer options; omit for open-ended questions")
    k: int | None = Field(None, description="frames to select (default serve.default_k)")
    max_frames: int | None = Field(None, description="candidate pool cap (default pool.max_frames)")
    max_fps: float | None = Field(None, description="candidate pool fps (default pool.max_fps)")
    mode: Literal["sample", "greedy"] = Field("sample", description="sample: one temperature-1 "
                                              "rollout (the released default); greedy: argmax")
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="sampling seed; drawn and returned when omitted")

    @field_validator("question")
    @classmethod
    def _question(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v.strip()

    @field_validator("options")
    @classmethod
    def _options(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        out = [o.strip() for o in v]
        for i, o in enumerate(out):
            if not o or len(o) > MAX_TEXT:
                raise ValueError(f"option {i} must be 1..{MAX_TEXT} non-blank characters")
        if len(set(out)) != len(out):
            raise ValueError("options must be distinct")
        return out or None


class AnswerRequest(SelectRequest):
    """Select, then ask the answering VLM: options are required (its scores are per option)."""

    options: list[str] = Field(..., min_length=2, max_length=MAX_OPTIONS)  # type: ignore[assignment]


class Timing(BaseModel):
    decode: float = 0.0
    encode: float = 0.0
    select: float = 0.0
    answer: float | None = None
    total: float = 0.0


class VideoMeta(BaseModel):
    sha256: str
    n_frames: int
    fps: float
    duration_s: float
    width: int
    height: int


class SelectResponse(BaseModel):
    frame_indices: list[int] = Field(description="original frame numbers, sorted")
    timestamps_s: list[float]
    frame_probabilities: list[float] | None = Field(
        description="per chosen frame: the policy's probability of that frame at the step it was "
        "picked (null on the uniform fallback)")
    pick_order: list[int] | None = Field(description="per chosen frame: the step it was picked")
    pool_size: int
    pool_frame_indices: list[int] = Field(description="the candidate pool (original frames)")
    pool_distribution: list[float] | None = Field(
        description="mean selection probability of each pool frame over the k steps (sums to 1)")
    k: int
    mode: str
    seed: int | None
    fallback: str | None = Field(description='"uniform" when the pool is at or below '
                                 "pool.uniform_fallback_frames")
    open_ended: bool
    checkpoint_id: str = Field(description="sha256 of the policy's model.safetensors")
    video: VideoMeta
    cache: Literal["hit", "miss"]
    batch_size: int = Field(description="requests in the policy forward pass (0: no pass)")
    timing_ms: Timing


class AnswerResponse(BaseModel):
    answer: str
    answer_index: int
    option_scores: list[float] = Field(description="log-probability of each option's answer "
                                       "token (one prefill)")
    option_probs: list[float] = Field(description="softmax of option_scores")
    frames_used: list[int]
    timestamps_s: list[float]
    answer_model: str
    selection: SelectResponse
    timing_ms: Timing


def request_from_form(fields: dict[str, list[str]], model: type[SelectRequest]) -> SelectRequest:
    """Multipart form fields -> the same validated request as JSON. `options` may be repeated
    fields or one JSON list."""
    data: dict[str, Any] = {}
    for name, vals in fields.items():
        if name == "options":
            if len(vals) == 1 and vals[0].lstrip().startswith("["):
                try:
                    data["options"] = json.loads(vals[0])
                except json.JSONDecodeError as e:
                    raise ServiceError(400, "malformed_json", f"options: not a JSON list ({e})")
            else:
                data["options"] = vals
        elif len(vals) > 1:
            raise ServiceError(422, "invalid_request", f"{name}: given {len(vals)} times")
        else:
            data[name] = vals[0]
    return parse_request(data, model)


def parse_request(data: Any, model: type[SelectRequest]) -> SelectRequest:
    if not isinstance(data, dict):
        raise ServiceError(422, "invalid_request", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ServiceError(422, "invalid_request", validation_message(e)) from None


def parse_json_body(body: bytes, model: type[SelectRequest]) -> SelectRequest:
    if len(body) > JSON_BODY_LIMIT:
        raise ServiceError(413, "payload_too_large", f"JSON body of {len(body)} bytes exceeds "
                           f"{JSON_BODY_LIMIT}; upload videos as multipart, not in JSON")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServiceError(400, "malformed_json", f"malformed JSON body: {e}") from None
    return parse_request(data, model)


# ------------------------------------------------------------------------------ media roots


class MediaRoots:
    """Where `path` requests may read. A path is resolved first (`..`, symlinks, absolute
    paths), then must lie inside one root; outside is 403 whether or not the file exists, so a
    request cannot even probe the rest of the file system."""

    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = [Path(os.path.realpath(r)) for r in roots]

    def resolve(self, user_path: str) -> Path:
        if not self.roots:
            raise ServiceError(403, "path_forbidden", "reading paths is disabled: no media roots "
                               "are configured (serve.media_roots); upload the file instead")
        if not user_path.strip() or "\x00" in user_path:
            raise ServiceError(400, "invalid_path", "path must be a non-empty file path")
        p = Path(user_path)
        candidates = [p] if p.is_absolute() else [root / p for root in self.roots]
        inside = []
        for c in candidates:
            real = Path(os.path.realpath(c))
            if any(real == r or real.is_relative_to(r) for r in self.roots):
                inside.append(real)
        if not inside:
            raise ServiceError(403, "path_forbidden", f"path {user_path!r} resolves outside the "
                               "media roots")
        for real in inside:
            if real.is_file():
                return real
        if any(real.exists() for real in inside):
            raise ServiceError(422, "not_a_file", f"path {user_path!r} is not a regular file")
        raise ServiceError(404, "not_found", f"path {user_path!r} not found under the media "
                           "roots")


# ------------------------------------------------------------------------------------ URLs


def check_url(url: str, allow_hosts: Sequence[str]) -> str:
    """Allow http(s) URLs whose host is listed (or a subdomain of a listed `.suffix`).

    Returns the host. Raises 403 when fetching is off or the host is not allowed."""
    if not allow_hosts:
        raise ServiceError(403, "url_forbidden", "fetching URLs is disabled on this service "
                           "(serve.allow_url_hosts is empty); send a path or upload the file")
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise ServiceError(422, "invalid_url", f"url must be http(s)://host/..., got {url!r}")
    if parts.username or parts.password:
        raise ServiceError(422, "invalid_url", "url must not carry credentials")
    for allowed in allow_hosts:
        a = allowed.lower()
        if host == a or (a.startswith(".") and host.endswith(a)):
            return host
    raise ServiceError(403, "url_forbidden", f"host {host!r} is not in serve.allow_url_hosts")


async def fetch_url(url: str, allow_hosts: Sequence[str], dest: Path, limit: int,
                    timeout_s: float) -> str:
    """Download an allowed URL to `dest` (no redirects, size-bounded); returns its sha256."""
    import httpx

    check_url(url, allow_hosts)
    h = hashlib.sha256()
    n = 0
    try:
        async with (httpx.AsyncClient(follow_redirects=False, timeout=timeout_s) as client,
                    client.stream("GET", url) as r):
            if r.status_code != 200:
                raise ServiceError(422, "url_failed", f"GET {url}: HTTP {r.status_code}")
            f = await asyncio.to_thread(open, dest, "wb")
            try:
                async for chunk in r.aiter_bytes(1 << 20):
                    n += len(chunk)
                    if n > limit:
                        raise ServiceError(413, "payload_too_large", f"{url}: larger than "
                                           f"{limit // (1024 * 1024)} MB")
                    h.update(chunk)
                    await asyncio.to_thread(f.write, chunk)
            finally:
                f.close()
    except httpx.HTTPError as e:
        raise ServiceError(422, "url_failed", f"GET {url}: {type(e).__name__}") from None
    return h.hexdigest()


# ---------------------------------------------------------------------------------- uploads


@dataclass
class Upload:
    """An uploaded video written to the replica's private temp dir, hashed while copied."""

    path: Path
    sha256: str
    filename: str
    size: int


async def read_multipart(request: Any, limit: int, tmp_dir: Path
                         ) -> tuple[dict[str, list[str]], Upload | None]:
    """Parse a multipart body without ever holding more than `limit` bytes of it.

    The byte count is enforced on the raw stream (a lying or absent Content-Length does not
    help), so an oversized upload is cut off with 413 as soon as it crosses the limit."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    slack = 64 * 1024  # multipart headers and the small fields
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + slack:
        raise ServiceError(413, "payload_too_large", f"upload of {int(declared)} bytes exceeds "
                           f"serve.max_upload_mb ({limit // (1024 * 1024)} MB)")

    async def bounded() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit + slack:
                raise ServiceError(413, "payload_too_large", "upload exceeds serve.max_upload_mb "
                                   f"({limit // (1024 * 1024)} MB)")
            yield chunk

    parser = MultiPartParser(request.headers, bounded(), max_files=1, max_fields=16,
                             max_part_size=FORM_FIELD_LIMIT)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise ServiceError(400, "malformed_multipart", f"malformed multipart body: {e}") from None
    fields: dict[str, list[str]] = {}
    upload = None
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name != "file":
                    raise ServiceError(422, "invalid_request", f"{name}: unexpected file part; "
                                       "send the video as the `file` part")
                upload = await _store_upload(value, limit, tmp_dir)
            else:
                fields.setdefault(name, []).append(value)
    finally:
        await form.close()
    return fields, upload


async def _store_upload(value: Any, limit: int, tmp_dir: Path) -> Upload:
    suffix = Path(value.filename or "").suffix.lower()
    suffix = suffix if suffix[1:].isalnum() and len(suffix) <= 6 else ".bin"
    dest = tmp_dir / f"upload-{secrets.token_hex(8)}{suffix}"
    h, n = hashlib.sha256(), 0
    f = await asyncio.to_thread(open, dest, "wb")
    try:
        while chunk := await value.read(1 << 20):
            n += len(chunk)
            if n > limit:
                raise ServiceError(413, "payload_too_large", "upload exceeds serve.max_upload_mb "
                                   f"({limit // (1024 * 1024)} MB)")
            h.update(chunk)
            await asyncio.to_thread(f.write, chunk)
    except BaseException:
        f.close()
        dest.unlink(missing_ok=True)
        raise
    f.close()
    if n == 0:
        dest.unlink(missing_ok=True)
        raise ServiceError(422, "unreadable_video", "the uploaded file is empty")
    return Upload(dest, h.hexdigest(), Path(value.filename or "upload").name, n)


# ------------------------------------------------------------------------------------ caches


class LRU:
    """A small thread-safe LRU bounded by total `cost` (bytes, or 1 per item)."""

    def __init__(self, capacity: float) -> None:
        self.capacity, self.used = capacity, 0.0
        self.items: OrderedDict[Any, tuple[Any, float]] = OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Any) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                self.hits += 1
                return self.items[key][0]
            self.misses += 1
            return None

    def put(self, key: Any, value: Any, cost: float = 1.0) -> None:
        with self.lock:
            if key in self.items:
                self.used -= self.items.pop(key)[1]
            if cost > self.capacity:
                return
            self.items[key] = (value, cost)
            self.used += cost
            while self.used > self.capacity:
                self.used -= self.items.popitem(last=False)[1][1]

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class PoolEntry:
    """A video's candidate pool and its frozen features (float16; empty on the fallback)."""

    pool: PoolFeatures
    info: VideoInfo
    sha256: str

    @property
    def nbytes(self) -> int:
        return int(self.pool.features.nbytes + self.pool.frames.nbytes + self.pool.t_s.nbytes)


def file_sha256(path: Path) -> str:
    from refocus_ray.config import file_hash

    return file_hash(path)


# ------------------------------------------------------------------------ isolated decoding
# (run_isolated lives in refocus_ray.video, shared with the prepare pipeline)


def _decode_frames(path: str, indices: list[int], max_side: int) -> np.ndarray:
    """Runs in the isolated child: decode frames, downscale (aspect kept) to max_side."""
    from PIL import Image

    from refocus_ray.video import decode

    frames = decode(path, indices)
    h, w = frames.shape[1:3]
    scale = max_side / max(h, w)
    if scale >= 1:
        return frames
    size = (max(2, round(w * scale)), max(2, round(h * scale)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BILINEAR))
                     for f in frames])


# ------------------------------------------------------------------------ batched sampling


@dataclass
class RowSample:
    chosen: list[int]  # pool positions in pick order
    step_probs: list[float]  # probability of each pick at its step
    pool_probs: np.ndarray  # [F] mean selection probability over the k steps


def sample_rows(policy: SelectorPolicy, batch: PolicyBatch, ks: Sequence[int],
                greedy: Sequence[bool], seeds: Sequence[int]) -> list[RowSample]:
    """`policy.sample` for a batch whose rows differ in k, mode and seed.

    Why not `policy.sample`: it takes one k, one mode and one generator for the whole batch, so
    a row's Gumbel noise would depend on which other requests happened to share its batch. Here
    each row draws its noise from its own generator, exactly as `policy.sample` draws it for a
    batch of one (`rand([1, F_row])` per step), so a seeded request returns the same frames
    alone or batched. The math (prompt pass, pointer scores, masking, Gumbel-max) is the
    policy's own methods; rows that reached their k keep stepping with a finite placeholder logit and
    their later steps are discarded.
    """
    import torch

    B, Fp = batch.frame_mask.shape
    sizes = [int(s) for s in batch.frame_mask.sum(1)]
    for i, k in enumerate(ks):
        if not 1 <= k <= sizes[i]:
            raise ValueError(f"row {i}: k={k} must be between 1 and its pool size {sizes[i]}")
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    kt = torch.as_tensor(list(ks))
    with torch.inference_mode():
        pr = policy._prompt(batch)
        keys, values = policy.key_head(pr.h_frames), policy.value_head(pr.h_frames)
        rows = torch.arange(B)
        blocked = ~batch.frame_mask
        x = policy.sof.expand(B, 1, -1)
        state = pr.state
        chosen = torch.zeros(B, int(kt.max()), dtype=torch.long)
        step_p = torch.zeros(B, int(kt.max()))
        psum = torch.zeros(B, Fp)
        for t in range(int(kt.max())):
            h, state = policy.backbone.extend(x, state)
            active = kt > t
            logit = policy._scores(h[:, -1:], keys)[:, 0].masked_fill(blocked, float("-inf"))
            logit = torch.where(active[:, None], logit, torch.zeros_like(logit))
            logp = torch.log_softmax(logit, -1)
            noise = torch.zeros(B, Fp)
            for i in range(B):
                if active[i] and not greedy[i]:
                    u = torch.rand((1, sizes[i]), generator=gens[i])
                    noise[i, : sizes[i]] = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))[0]
            c = (logp + noise).argmax(-1)
            chosen[:, t] = c
            step_p[:, t] = logp[rows, c].exp()
            psum += torch.where(active[:, None], logp.exp(), torch.zeros_like(logp))
            blocked[rows[active], c[active]] = True
            x = values[rows, c][:, None]
    return [RowSample(chosen[i, : ks[i]].tolist(), step_p[i, : ks[i]].tolist(),
                      (psum[i, : sizes[i]] / ks[i]).numpy()) for i in range(B)]


# ----------------------------------------------------------------------------------- service


@dataclass
class Prepared:
    """A validated request with its pool ready: what a policy batch row needs."""

    req: SelectRequest
    entry: PoolEntry
    k: int
    seed: int | None
    q_emb: np.ndarray | None = None
    opt_emb: np.ndarray | None = None
    cache: str = "miss"
    timing: Timing = field(default_factory=Timing)
    fallback: str | None = None


class SelectorService:
    """One replica's state: the policy, the frozen encoders, the caches and the media roots."""

    def __init__(self, settings: Settings) -> None:
        import torch

        from refocus_ray.encoders import FrameEncoder, QueryEncoder
        from refocus_ray.policy import WEIGHTS_FILE, load

        self.cfg, self.scfg = settings.load()
        torch.set_num_threads(self.scfg.threads)
        ck = Path(settings.checkpoint)
        self.policy = load(ck).eval()
        self.checkpoint_id = file_sha256(ck / WEIGHTS_FILE)
        e = self.cfg.encoders
        self.frame_encoder = FrameEncoder(e.frame, e.frame_size, self.scfg.threads, e.batch_size)
        self.query_encoder = QueryEncoder(e.query, self.scfg.threads)
        pc = self.policy.cfg
        if (pc.frame_dim, pc.text_dim) != (self.frame_encoder.dim, self.query_encoder.dim):
            raise ConfigError(f"checkpoint {ck}: policy expects frame/text features of "
                              f"{pc.frame_dim}/{pc.text_dim} dims but encoders.frame={e.frame} "
                              f"and encoders.query={e.query} give {self.frame_encoder.dim}/"
                              f"{self.query_encoder.dim}; serve with the run config it was "
                              "trained with (--config)")
        self.roots = MediaRoots(self.scfg.media_roots)
        self.token = read_token(self.scfg) if self.scfg.auth_required() else None
        self.pools = LRU(self.scfg.feature_cache_mb * 1024 * 1024)
        self.bad = LRU(4096)  # sha256 -> why it could not be decoded
        self.texts = LRU(self.scfg.text_cache_items)
        self.hashes = LRU(16384)  # (realpath, stat) -> sha256
        self.inflight: dict[str, asyncio.Future] = {}
        self.decode_slots = asyncio.Semaphore(self.scfg.decode_concurrency)
        self.model_lock = threading.Lock()  # one torch job at a time: threads are the cores
        self.tmp_dir = Path(tempfile.mkdtemp(prefix="refocus-serve-"))
        self.batches = 0
        self.batched_rows = 0
        self.started = time.time()
        self._warm_decoder()

    def _warm_decoder(self) -> None:
        """Start the decoder forkserver now (it pre-imports decord), not on the first request."""
        run_isolated(math.sqrt, (4.0,), 60, "warm-up")

    def close(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    # -- describing -----------------------------------------------------------------------

    def model_card(self) -> dict[str, Any]:
        p = self.cfg.pool
        return {
            "id": "refocus-selector", "object": "model", "kind": "frame-selector",
            "checkpoint_id": self.checkpoint_id,
            "policy": {"backbone": self.policy.cfg.backbone, "d_model": self.policy.cfg.d_model,
                       "n_layers": self.policy.cfg.n_layers},
            "encoders": {"frame": self.frame_encoder.id, "query": self.query_encoder.id},
            "pool": {"max_frames": p.max_frames, "max_fps": p.max_fps,
                     "uniform_fallback_frames": p.uniform_fallback_frames,
                     "max_frames_limit": self.scfg.max_pool_frames,
                     "max_fps_limit": self.scfg.max_pool_fps},
            "k": {"default": self.scfg.default_k, "max": self.scfg.max_k},
            "modes": ["sample", "greedy"],
            "cache": {"videos": len(self.pools), "mb": round(self.pools.used / 2**20, 1),
                      "hits": self.pools.hits, "misses": self.pools.misses},
            "mean_batch_size": self.batched_rows / max(self.batches, 1),
        }

    # -- sources --------------------------------------------------------------------------

    @staticmethod
    def check_one_source(req: SelectRequest, upload: Upload | None) -> None:
        given = [n for n, v in (("path", req.path), ("url", req.url), ("file", upload)) if v]
        if len(given) != 1:
            raise ServiceError(400, "missing_video" if not given else "ambiguous_video",
                               "send exactly one video: `path` (under a media root), an uploaded "
                               f"`file` (multipart) or `url`; got {given or 'none'}")

    def source_path(self, req: SelectRequest, upload: Upload | None) -> tuple[Path, str, str]:
        """(file to decode, name to show in errors, sha256) for a path or an upload."""
        self.check_one_source(req, upload)
        if upload is not None:
            return upload.path, upload.filename, upload.sha256
        assert req.path is not None
        real = self.roots.resolve(req.path)
        st = real.stat()
        key = (str(real), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        sha = self.hashes.get(key)
        if sha is None:
            sha = file_sha256(real)
            self.hashes.put(key, sha)
        return real, req.path, sha

    async def fetch(self, req: SelectRequest) -> Upload:
        assert req.url is not None
        dest = self.tmp_dir / f"url-{secrets.token_hex(8)}.bin"
        try:
            sha = await fetch_url(req.url, self.scfg.allow_url_hosts, dest,
                                  self.scfg.max_upload_bytes, self.scfg.url_timeout_s)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return Upload(dest, sha, req.url, dest.stat().st_size)

    # -- preparing ------------------------------------------------------------------------

    def _pool_params(self, req: SelectRequest) -> tuple[int, float]:
        p, s = self.cfg.pool, self.scfg
        mf = p.max_frames if req.max_frames is None else req.max_frames
        fps = p.max_fps if req.max_fps is None else req.max_fps
        if not 1 <= mf <= s.max_pool_frames:
            raise ServiceError(422, "invalid_request", f"max_frames={mf}: must be between 1 and "
                               f"serve.max_pool_frames={s.max_pool_frames}")
        if not (math.isfinite(fps) and 0 < fps <= s.max_pool_fps):
            raise ServiceError(422, "invalid_request", f"max_fps={fps}: must be > 0 and <= "
                               f"serve.max_pool_fps={s.max_pool_fps}")
        return mf, fps

    def check_k(self, req: SelectRequest) -> int:
        k = self.scfg.default_k if req.k is None else req.k
        if k < 1:
            raise ServiceError(422, "invalid_request", f"k={k}: must be >= 1")
        if k > self.scfg.max_k:
            raise ServiceError(422, "invalid_request", f"k={k}: exceeds serve.max_k="
                               f"{self.scfg.max_k}")
        return k

    async def prepare(self, req: SelectRequest, path: Path, shown: str, sha: str,
                      embed: Callable[[tuple[str, list[str] | None]], Any] | None = None
                      ) -> Prepared:
        """Validate k and the pool, get the pool's features (cache, else decode + encode),
        embed the question (through `embed`, e.g. a batching wrapper of `embed_many`, when
        given); everything but the policy pass."""
        t0 = time.perf_counter()
        k = self.check_k(req)
        mf, fps = self._pool_params(req)
        seed = None
        if req.mode == "sample":
            seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        e = self.cfg.encoders
        key = f"{sha}:{self.frame_encoder.id}:{mf}:{fps}"
        prep_timing = Timing()
        entry = self.pools.get(key)
        cache = "hit"
        if entry is None:
            cache = "miss"
            fut = self.inflight.get(key)
            if fut is not None:  # the same video is being decoded for another request
                entry = await asyncio.shield(fut)
            else:
                fut = asyncio.get_running_loop().create_future()
                self.inflight[key] = fut
                try:
                    entry = await self._build_entry(path, shown, sha, mf, fps, e.frame_size,
                                                    prep_timing)
                    self.pools.put(key, entry, entry.nbytes)
                    fut.set_result(entry)
                except BaseException as exc:
                    fut.set_exception(exc)
                    fut.exception()  # retrieved: no "never retrieved" warning without waiters
                    raise
                finally:
                    self.inflight.pop(key, None)
        F = len(entry.pool.frames)
        if k > F:
            raise ServiceError(422, "k_too_large", f"k={k} is larger than this video's candidate "
                               f"pool ({F} frames: {entry.info.duration_s:.1f} s at max_fps="
                               f"{fps}, max_frames={mf}); ask for at most {F}")
        prep = Prepared(req, entry, k, seed, cache=cache, timing=prep_timing)
        if F <= self.cfg.pool.uniform_fallback_frames:
            prep.fallback = "uniform"
        else:
            t = time.perf_counter()
            query = (req.question, req.options)
            prep.q_emb, prep.opt_emb = await (embed(query) if embed else
                                              self.embed_texts(*query))
            prep.timing.encode += (time.perf_counter() - t) * 1e3
        prep.timing.total = (time.perf_counter() - t0) * 1e3
        return prep

    async def _build_entry(self, path: Path, shown: str, sha: str, mf: int, fps: float,
                           size: int, timing: Timing) -> PoolEntry:
        from refocus_ray.features import PoolFeatures
        from refocus_ray.video import VideoError, decode_isolated

        known = self.bad.get(sha)
        if known is not None:
            raise ServiceError(422, "unreadable_video", known)
        t = time.perf_counter()
        async with self.decode_slots:
            try:
                info, idx, frames = await asyncio.to_thread(
                    decode_isolated, path, mf, fps, size, self.scfg.decode_timeout_s)
            except VideoError as err:
                msg = str(err).replace(str(path), shown)
                if "timed out" not in msg:  # a timeout may be load, not the file
                    self.bad.put(sha, msg)
                raise ServiceError(422, "unreadable_video", msg) from None
        timing.decode = (time.perf_counter() - t) * 1e3
        idx = np.asarray(idx, np.int64)
        feats = np.zeros((len(idx), 0), np.float16)
        if len(idx) > self.cfg.pool.uniform_fallback_frames:
            t = time.perf_counter()
            feats = (await asyncio.to_thread(self._encode_frames, frames)).astype(np.float16)
            timing.encode = (time.perf_counter() - t) * 1e3
        pool = PoolFeatures(idx, idx / info.fps, feats, info.fps, info.n_frames)
        return PoolEntry(pool, info, sha)

    def _encode_frames(self, frames: np.ndarray) -> np.ndarray:
        bs = self.cfg.encoders.batch_size
        with self.model_lock:
            return np.concatenate([self.frame_encoder(frames[i : i + bs])
                                   for i in range(0, len(frames), bs)])

    def embed_many(self, queries: Sequence[tuple[str, list[str] | None]]
                   ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(q_emb, opt_emb or None) per (question, options); every text not cached yet is
        encoded in one query-encoder call, so concurrent requests share it."""
        from refocus_ray.features import question_texts

        texts = [question_texts(q, list(o or [])) for q, o in queries]
        have: dict[str, np.ndarray] = {}
        missing = []
        for t in dict.fromkeys(x for ts in texts for x in ts):
            v = self.texts.get(t)
            if v is None:
                missing.append(t)
            else:
                have[t] = v
        if missing:
            with self.model_lock:
                vecs = self.query_encoder(missing)
            for t, v in zip(missing, vecs):
                self.texts.put(t, v)
                have[t] = v
        return [(have[ts[0]], np.stack([have[t] for t in ts[1:]]) if o else None)
                for ts, (_, o) in zip(texts, queries)]

    def cached_embedding(self, question: str, options: list[str] | None
                         ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The embeddings if every text is cached (then no encoder call, no batch wait)."""
        from refocus_ray.features import question_texts

        vecs = [self.texts.get(t) for t in question_texts(question, list(options or []))]
        if any(v is None for v in vecs):
            return None
        return vecs[0], (np.stack(vecs[1:]) if options else None)

    async def embed_texts(self, question: str, options: list[str] | None
                          ) -> tuple[np.ndarray, np.ndarray | None]:
        return (await asyncio.to_thread(self.embed_many, [(question, options)]))[0]

    # -- selecting ------------------------------------------------------------------------

    def select_batch(self, items: Sequence[Prepared]) -> tuple[list[RowSample], float]:
        """One padded policy pass for every request in `items` (all non-fallback)."""
        from refocus_ray.policy import collate, example_from_pool

        t = time.perf_counter()
        examples = [example_from_pool(p.entry.pool, p.q_emb, p.opt_emb) for p in items]
        with self.model_lock:
            rows = sample_rows(self.policy, collate(examples), [p.k for p in items],
                               [p.req.mode == "greedy" for p in items],
                               [p.seed or 0 for p in items])
        self.batches += 1
        self.batched_rows += len(items)
        return rows, (time.perf_counter() - t) * 1e3

    def respond(self, prep: Prepared, row: RowSample | None, batch_size: int,
                select_ms: float, t_start: float) -> SelectResponse:
        from refocus_ray.selectors import uniform

        pool, info = prep.entry.pool, prep.entry.info
        F = len(pool.frames)
        if row is None:
            pos = [int(i) for i in uniform(F, prep.k)]
            order, probs, dist = None, None, None
        else:
            ranked = sorted(range(prep.k), key=lambda s: row.chosen[s])
            pos = [row.chosen[s] for s in ranked]
            order = ranked
            probs = [round(float(row.step_probs[s]), 6) for s in ranked]
            dist = [round(float(v), 6) for v in row.pool_probs]
        frames = [int(pool.frames[i]) for i in pos]
        timing = prep.timing.model_copy()
        timing.select = round(select_ms, 3)
        timing.decode, timing.encode = round(timing.decode, 3), round(timing.encode, 3)
        timing.total = round((time.perf_counter() - t_start) * 1e3, 3)
        return SelectResponse(
            frame_indices=frames,
            timestamps_s=[round(f / pool.fps, 4) for f in frames],
            frame_probabilities=probs, pick_order=order, pool_size=F,
            pool_frame_indices=[int(f) for f in pool.frames], pool_distribution=dist,
            k=prep.k, mode=prep.req.mode, seed=prep.seed if row is not None else None,
            fallback=prep.fallback, open_ended=not prep.req.options,
            checkpoint_id=self.checkpoint_id,
            video=VideoMeta(sha256=prep.entry.sha256, n_frames=info.n_frames, fps=info.fps,
                            duration_s=round(info.duration_s, 3), width=info.width,
                            height=info.height),
            cache=prep.cache, batch_size=batch_size, timing_ms=timing,
        )

    # -- answering ------------------------------------------------------------------------

    async def answer_frames(self, path: Path, shown: str, frames: list[int]) -> np.ndarray:
        """The chosen frames' pixels for the answering VLM, decoded in an isolated child."""
        from refocus_ray.video import VideoError

        if len(frames) > self.scfg.answer_max_frames:
            raise ServiceError(422, "k_too_large", f"k={len(frames)}: the answering model takes "
                               f"at most serve.answer_max_frames={self.scfg.answer_max_frames}")
        async with self.decode_slots:
            try:
                return await asyncio.to_thread(
                    run_isolated, _decode_frames, (str(path), frames, self.scfg.answer_max_side),
                    self.scfg.decode_timeout_s, shown)
            except VideoError as err:
                raise ServiceError(422, "unreadable_video",
                                   str(err).replace(str(path), shown)) from None


def answer_payload(scores: list[float], options: list[str]) -> dict[str, Any]:
    z = np.asarray(scores, np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    i = int(z.argmax())
    return {"answer": options[i], "answer_index": i,
            "option_scores": [round(float(v), 6) for v in z],
            "option_probs": [round(float(v), 6) for v in p]}


def answer_env() -> dict[str, str]:
    """Env of the answering vLLM replica: the engine in the replica's own process, offline."""
    from refocus_ray.reward_pool import actor_options
    from refocus_ray.scoring import ReferenceConfig

    return dict(actor_options(ReferenceConfig())["runtime_env"]["env_vars"])
