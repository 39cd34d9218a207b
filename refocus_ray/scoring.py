"""`ReferenceScorer` backends: option scores z from a frozen reference VLM, chosen by config.

- ``vllm``: vLLM in-process (inside a Ray actor of the reward pool); one prefill per request
  (`max_tokens=1`, `logprob_token_ids`), never generate-and-parse.
- ``openai``: an external OpenAI-compatible vLLM server
  (`python -m vllm.entrypoints.openai.api_server --model DIR`), same prompt, same tokens.
- ``transformers``: in-process forward pass, for debugging and as a cross-check.

Every backend reads frames through one `FrameStore` (decord, squashed to the model's input
size exactly as the forge trained) and builds prompts through `prompting`, so the three agree.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from refocus_ray.config import ConfigError

BACKENDS = ("vllm", "openai", "transformers")


@dataclass
class ReferenceConfig:
    """The reference (reward) model and its pool; the `reference:` section of a run config."""

    backend: str = "vllm"
    model: str = "forge"  # "forge" = this run's forged checkpoint; else a checkpoint dir / id
    answer_mode: str = "content"  # content (forged models) | letter (pretrained VLMs, paper)
    reward: str = "tanh_margin"  # tanh_margin | prob_margin | correct
    frame_size: int = 0  # 0 = read from the checkpoint's forge.json
    dtype: str = "float32"
    max_model_len: int = 4096
    num_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    cpu_cores: list[int] = field(default_factory=list)  # pin the engine's threads (2-core boxes)
    max_batch: int = 64
    max_wait_ms: float = 2.0
    openai_url: str = "http://127.0.0.1:8000/v1"
    pool_name: str = "refocus-scorer"
    gpu_memory_utilization: float = 0.85

    def check(self, key: str) -> None:
        from refocus_ray.prompting import MODES
        from refocus_ray.reward import REWARDS

        for name, value, allowed in [("backend", self.backend, BACKENDS),
                                     ("answer_mode", self.answer_mode, MODES),
                                     ("reward", self.reward, tuple(REWARDS))]:
            if value not in allowed:
                raise ConfigError(f"{key}.{name}: must be one of {list(allowed)}, got {value!r}")
        if self.num_actors < 1 or self.max_batch < 1:
            raise ConfigError(f"{key}.num_actors and {key}.max_batch must be >= 1")


@dataclass(frozen=True)
class ScoreRequest:
    """Frames (original frame numbers; scored in chronological order), question, options."""

    video: str
    frames: tuple[int, ...]
    question: str
    options: tuple[str, ...]


class Backend(Protocol):
    model_id: str

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]: ...


class FrameStore:
    """Decoded frames at the model's input size, memoised per (video, frame number).

    Frames are decoded with decord squashed to size x size, the same call the forge uses to
    build its training frames, so the scorer sees exactly the pixels the model was trained on.
    """

    def __init__(self, size: int, capacity: int = 200_000) -> None:
        self.size, self.capacity = size, capacity
        self.frames: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def get(self, video: str, frames: tuple[int, ...]) -> np.ndarray:
        from refocus_ray.video import decode

        order = sorted(frames)
        missing = [f for f in order if (video, f) not in self.frames]
        if missing:
            for f, img in zip(missing, decode(video, missing, self.size)):
                self.frames[(video, f)] = img
            while len(self.frames) > self.capacity:
                self.frames.popitem(last=False)
        return np.stack([self.frames[(video, f)] for f in order])


def checkpoint_meta(model_dir: str | Path) -> dict[str, Any]:
    """The forge's description of a checkpoint (frame size, answer mode), if it has one."""
    f = Path(model_dir) / "forge.json"
    return json.loads(f.read_text()) if f.exists() else {}


def make_backend(cfg: ReferenceConfig) -> Backend:
    """Build the configured backend (inside the scorer actor for `vllm`)."""
    if cfg.backend == "vllm":
        from refocus_ray.vllm_scoring import VLLMBackend

        return VLLMBackend(cfg)
    if cfg.backend == "transformers":
        from refocus_ray.vllm_scoring import TransformersBackend

        return TransformersBackend(cfg)
    from refocus_ray.vllm_scoring import OpenAIBackend

    return OpenAIBackend(cfg)
