"""Run configs: one YAML file names every component of a run (torchtune-style recipes).

Each section is a dataclass; `load_config` builds them recursively and refuses unknown keys and
wrong types with an error that names the key (``pool.max_frame: unknown key; known keys: ...``).
Sections owned by later stages (forge, reference, train, ...) are validated by the same rules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


@dataclass
class DataConfig:
    """Where the QA table comes from: the generated evidence benchmark or a user's table."""

    kind: str = "evidence"  # "evidence" (generate into <run_dir>/data) or "table"
    table: str | None = None  # path to a Parquet/JSONL/CSV table when kind == "table"
    videos: int = 280  # evidence benchmark: total videos over train/val/test
    seed: int = 0
    # evidence benchmark, optional narrowing (None: the embedded benchmark's values, see
    # `evidence.EvidenceConfig`): only these question families; video length range (s);
    # each inserted segment's share of the timeline; train/val/test shares of the videos
    families: list[str] | None = None
    duration_s: list[float] | None = None
    segment_fraction: list[float] | None = None
    split_fractions: list[float] | None = None

    def check(self, key: str) -> None:
        from refocus_ray.evidence import FAMILIES

        _one_of(f"{key}.kind", self.kind, ("evidence", "table"))
        if self.kind == "table" and not self.table:
            raise ConfigError(f"{key}.table: required when {key}.kind is 'table'")
        _positive(f"{key}.videos", self.videos)
        if self.families is not None:
            if not self.families:
                raise ConfigError(f"{key}.families: empty; leave it out for every family")
            for f in self.families:
                _one_of(f"{key}.families", f, FAMILIES)
        for name, n in (("duration_s", 2), ("segment_fraction", 2), ("split_fractions", 3)):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ConfigError(f"{key}.{name}: needs {n} numbers, got {value!r}")
        try:
            self.evidence_config()
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None

    def evidence_config(self):  # -> evidence.EvidenceConfig
        """The evidence benchmark this section describes."""
        from refocus_ray.evidence import EvidenceConfig

        narrow: dict[str, Any] = {}
        if self.families is not None:
            narrow["families"] = tuple(self.families)
        if self.duration_s is not None:
            narrow["min_duration_s"], narrow["max_duration_s"] = map(float, self.duration_s)
        if self.segment_fraction is not None:
            narrow["segment_fraction"] = tuple(map(float, self.segment_fraction))
        if self.split_fractions is not None:
            narrow["split_fractions"] = tuple(map(float, self.split_fractions))
        return EvidenceConfig(videos=self.videos, seed=self.seed, **narrow)


@dataclass
class PoolConfig:
    """The candidate pool, as in the released code: at most max_frames at at most max_fps."""

    max_frames: int = 128
    max_fps: float = 4.0
    # pools with at most this many frames fall back to uniform (released code: 128 at 512/4fps)
    uniform_fallback_frames: int = 16

    def check(self, key: str) -> None:
        _positive(f"{key}.max_frames", self.max_frames)
        _positive(f"{key}.max_fps", self.max_fps)
        if self.uniform_fallback_frames < 0:
            raise ConfigError(f"{key}.uniform_fallback_frames: must be >= 0")


@dataclass
class EncoderConfig:
    """Frozen policy-side encoders. Ids are part of the feature-cache key."""

    frame: str = "efficientnet_lite0"  # or a transformers vision model id/dir (e.g. SigLIP)
    frame_size: int = 112  # frame-encoder input (squashed to frame_size x frame_size)
    query: str = "all-minilm-l6-v2"  # or a transformers text model id/dir
    # frames per frame-encoder forward pass (not part of any cache key: the features do not
    # depend on it); a whole 128-frame pool at once ran 2-3x slower on CPU (bench/prepare.py)
    batch_size: int = 16
    threads: int = 2  # torch intra-op threads of the encoder actor

    def check(self, key: str) -> None:
        _positive(f"{key}.frame_size", self.frame_size)
        _positive(f"{key}.batch_size", self.batch_size)
        _positive(f"{key}.threads", self.threads)


@dataclass
class PrepareConfig:
    """The feature-preparation job (Ray Data)."""

    decode_timeout_s: float = 120.0
    strict: bool = False  # exit non-zero when any video failed
    decode_concurrency: int = 2  # parallel decode tasks

    def check(self, key: str) -> None:
        _positive(f"{key}.decode_timeout_s", self.decode_timeout_s)
        _positive(f"{key}.decode_concurrency", self.decode_concurrency)


@dataclass
class Config:
    run_dir: str = "runs/embedded"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    # sections of later stages: validated by their own modules when those stages run
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def table_path(self) -> Path:
        """The QA table this run reads."""
        if self.data.kind == "table":
            return Path(self.data.table)  # type: ignore[arg-type]
        return self.run_path / "data" / "questions.parquet"

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.extra.get(name) or {})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(d.pop("extra"))
        return d


STAGE_SECTIONS = ("forge", "forge_answerer", "reference", "answerer", "policy", "train",
                  "evaluate", "serve", "filter", "cluster")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {list(allowed)}, got {value!r}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: must be > 0, got {value!r}")


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def build(cls: type, data: dict[str, Any] | None, key: str) -> Any:
    """Build dataclass `cls` from a mapping, naming `key.<field>` in every error."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{key + '.' if key else ''}{unknown[0]}: unknown key; known keys: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp, where = hints[name], f"{key}.{name}" if key else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, where)
        elif not _matches(value, tp):
            raise ConfigError(f"{where}: expected {tp}, got {value!r}")
        else:
            kwargs[name] = float(value) if tp is float else value
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check(key)
    return obj


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate a YAML run config; `overrides` are dotted keys (``pool.max_frames``)."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} not found")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    extra = {k: raw.pop(k) for k in list(raw) if k in STAGE_SECTIONS}
    cfg = build(Config, raw, "")
    cfg.extra = extra
    return cfg


def stable_hash(obj: Any) -> str:
    """A short content hash of JSON-able data: stage cache keys and artifact ids."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes: the video content key of the feature cache."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
