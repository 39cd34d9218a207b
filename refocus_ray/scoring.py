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

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
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
    dtype: str = "float32"
    max_model_len: int = 4096
    num_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor
    label_selector: dict[str, str] = field(default_factory=dict)  # node labels (Ray's syntax)
    placement_strategy: str = ""  # one placement group for all actors: PACK, SPREAD, ...
    cpu_cores: list[int] = field(default_factory=list)  # pin the engine's threads (2-core boxes)
    max_batch: int = 64
    max_wait_ms: float = 20.0  # wait this long for other callers' requests to join a batch
    # a video's requests go to its home actor (cache, decoded frames) unless that one has a
    # group more queued than the least-loaded actor (RewardPool.route)
    route_by_load: bool = True
    # a call unanswered this long is an error, not a hang (a restart after losing a node took
    # up to ~145 s here; docs/reliability.md)
    request_timeout_s: float = 600.0
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
        if not self.request_timeout_s > 0:
            raise ConfigError(f"{key}.request_timeout_s: must be > 0, got {self.request_timeout_s!r}")
        from refocus_ray import placement

        placement.check_amounts(key, num_cpus_per_actor=self.num_cpus_per_actor,
                                num_gpus_per_actor=self.num_gpus_per_actor)
        placement.check_custom(f"{key}.resources", self.resources)
        placement.check_label_selector(f"{key}.label_selector", self.label_selector)
        placement.check_strategy(f"{key}.placement_strategy", self.placement_strategy)


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
    """Frames of (video, frame number), decoded once with decord and kept after `transform`.

    The transform is the model's own frame preprocessing (the forge's squash-resize), so the
    store keeps exactly the pixels the model sees, in its small input size.
    """

    def __init__(self, transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 capacity_bytes: int = 4 << 30) -> None:
        # bounded in bytes: a 720p frame is 2.7 MB, a forged model's input 10 KB
        self.transform, self.capacity_bytes, self.nbytes = transform, capacity_bytes, 0
        self.frames: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.seconds, self.decoded = 0.0, 0  # time in `get` and frames decoded (cost reports)

    def get(self, video: str, frames: tuple[int, ...]) -> np.ndarray:
        """uint8 [k, H, W, 3] in chronological order."""
        self.warm([(video, frames)])
        return np.stack([self.frames[(video, f)] for f in sorted(frames)])

    def warm(self, requests: Iterable[tuple[str, tuple[int, ...]]]) -> None:
        """Decode the missing frames of many (video, frames) requests with one reader and one
        sorted pass per video: the G requests of a GRPO group share their video, so a batch
        opens it once instead of G times."""
        from refocus_ray.video import decode

        t0 = time.perf_counter()
        try:
            want: dict[str, set[int]] = {}
            for video, frames in requests:
                want.setdefault(video, set()).update(frames)
            need: dict[str, list[int]] = {}
            for video, frames in want.items():  # mark as recently used; list what is missing
                for f in frames:
                    if (video, f) in self.frames:
                        self.frames.move_to_end((video, f))
                    else:
                        need.setdefault(video, []).append(f)
            for video, missing in need.items():
                order = sorted(missing)
                imgs = decode(video, order)
                if self.transform is not None:
                    imgs = self.transform(imgs)
                self.decoded += len(order)
                for f, img in zip(order, imgs):
                    self.frames[(video, f)] = img
                    self.nbytes += img.nbytes
            # evict the least recently used, never this call's frames (they are the newest)
            wanted = sum(map(len, want.values()))
            while self.nbytes > self.capacity_bytes and len(self.frames) > wanted:
                self.nbytes -= self.frames.popitem(last=False)[1].nbytes
        finally:
            self.seconds += time.perf_counter() - t0


def _forged_input(model_dir: str) -> tuple[Callable[[np.ndarray], np.ndarray] | None, bool]:
    """How a checkpoint reads frames: the forge's preprocessing (None for other checkpoints:
    their processor resizes) and whether its prompt numbers the frames (`prompting.frame_label`)."""
    from refocus_ray.forge import CONFIG_FILE, ForgeConfig, preprocess_frames

    if not (Path(model_dir) / CONFIG_FILE).exists():
        return None, False
    fcfg = ForgeConfig.load(model_dir)
    return (lambda frames: preprocess_frames(frames, fcfg)), fcfg.frame_labels


class VLLMBackend:
    """vLLM in this process: one prefill per request, all queued requests in one engine call."""

    def __init__(self, cfg: ReferenceConfig) -> None:
        from refocus_ray.vllm_scoring import VLLMScorer

        kw: dict[str, Any] = {}
        if cfg.num_gpus_per_actor:
            kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        self.scorer = VLLMScorer(cfg.model, answer_mode=cfg.answer_mode, dtype=cfg.dtype,
                                 max_model_len=cfg.max_model_len, **kw)
        self.store = FrameStore(_forged_input(cfg.model)[0])
        self.model_id = f"vllm:{Path(cfg.model).resolve()}"

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        self.store.warm((r.video, r.frames) for r in requests)
        return self.scorer.score(
            [(self.store.get(r.video, r.frames), r.question, r.options) for r in requests],
            # a frame is named as the store keys it (its pixels are the store's for the life
            # of this engine), so vLLM need not hash the pixels
            frame_ids=[[f"{r.video}#{f}" for f in sorted(r.frames)] for r in requests],
        )


class TransformersBackend:
    """The same prompt and frames through the HF processor and model, in-process (fp32)."""

    def __init__(self, cfg: ReferenceConfig) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from refocus_ray.vllm_scoring import IMAGE_PLACEHOLDER

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(cfg.model)
        self.model = AutoModelForImageTextToText.from_pretrained(
            cfg.model, dtype=torch.float32).eval()
        self.image_token = IMAGE_PLACEHOLDER[self.model.config.model_type]
        self.mode = cfg.answer_mode
        transform, self.frame_labels = _forged_input(cfg.model)
        self.store = FrameStore(transform)
        self.model_id = f"transformers:{Path(cfg.model).resolve()}"

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        from PIL import Image

        from refocus_ray.prompting import build_prompt, scored_token_ids

        out = []
        for r in requests:
            frames = self.store.get(r.video, r.frames)
            prompt = build_prompt(r.question, r.options, len(frames), self.mode, self.image_token,
                                  self.frame_labels)  # fmt: skip
            inputs = self.processor(text=prompt, images=[[Image.fromarray(f) for f in frames]],
                                    return_tensors="pt")
            ids = scored_token_ids(self.processor.tokenizer, r.options, self.mode)
            with self.torch.inference_mode():
                logits = self.model(**inputs).logits[0, -1].float()
            logp = self.torch.log_softmax(logits, -1)
            out.append([float(logp[i]) for i in ids])
        return out


class OpenAIBackend:
    """An external OpenAI-compatible vLLM server (`python -m vllm.entrypoints.openai.api_server`).

    Each request is the `vllm` backend's prompt as one chat message (frames as lossless PNG
    data URLs, then the text), scored in one prefill (`max_tokens=1`, `logprob_token_ids`);
    a batch is sent concurrently so the server batches it. Scores equal the `vllm` backend's
    only if the server renders that message to the same text, so start-up checks it through
    the server's `/tokenize`: a forged checkpoint's chat template does; other models need the
    server started with `--chat-template` (README, "The reference model and the reward").
    """

    def __init__(self, cfg: ReferenceConfig, timeout_s: float = 120.0) -> None:
        from transformers import AutoTokenizer

        self.url = cfg.openai_url.rstrip("/")
        self.mode = cfg.answer_mode
        self.timeout_s = timeout_s
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)  # scored ids, prompt check
        transform, self.frame_labels = _forged_input(cfg.model)
        self.store = FrameStore(transform)
        served = [m["id"] for m in self._call("GET", self.url + "/models")["data"]]
        if cfg.model not in served and len(served) != 1:
            raise ConfigError(f"reference.model: {cfg.model!r} is not served at {self.url} "
                              f"(it serves {served})")
        self.model = cfg.model if cfg.model in served else served[0]
        self._check_prompt_rendering()
        self.model_id = f"openai:{self.url}:{Path(cfg.model).resolve()}"

    def _call(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        """One HTTP call; errors name the URL and what the server said, never hang."""
        import requests as http

        try:
            resp = http.request(method, url, json=body, timeout=self.timeout_s)
        except http.RequestException as e:
            raise RuntimeError(f"{url}: no answer from the OpenAI-compatible server ({e})") from e
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    def _check_prompt_rendering(self) -> None:
        """A chat template that wraps messages (role tags, a system prompt) would score another
        prompt than the other backends, silently: compare the server's tokens with ours."""
        from refocus_ray.prompting import build_prompt

        text = build_prompt("Which one?", ["first", "second"], 0, self.mode, "")
        url = self.url.removesuffix("/v1") + "/tokenize"
        got = self._call("POST", url, {
            "model": self.model, "messages": [{"role": "user", "content": [
                {"type": "text", "text": text}]}],
            "add_generation_prompt": False, "add_special_tokens": True})["tokens"]  # fmt: skip
        want = self.tokenizer.encode(text)
        if got != want:
            raise ConfigError(
                f"reference.openai_url: the server at {self.url} renders a chat message as "
                f"{len(got)} tokens {got[:12]}..., not as the prompt the vllm backend scores "
                f"({len(want)} tokens {want[:12]}...); its chat template wraps messages: start "
                f"it with --chat-template set to one that emits the message parts as they are "
                f"(refocus_ray.forge.CHAT_TEMPLATE for Idefics3/SmolVLM)")

    def _message(self, r: ScoreRequest, frames: np.ndarray) -> list[dict[str, Any]]:
        import base64
        import io

        from PIL import Image

        from refocus_ray.prompting import build_prompt, frame_label

        parts: list[dict[str, Any]] = []
        for i, f in enumerate(frames):
            if self.frame_labels:  # the text before each image, as in the vllm backend's prompt
                parts.append({"type": "text", "text": frame_label(i)})
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, format="PNG")  # lossless: the same pixels arrive
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            parts.append({"type": "image_url", "image_url": {"url": url}})
        parts.append({"type": "text", "text": build_prompt(r.question, r.options, 0, self.mode, "")})
        return [{"role": "user", "content": parts}]

    def _score_one(self, r: ScoreRequest, frames: np.ndarray) -> list[float]:
        from refocus_ray.prompting import scored_token_ids

        ids = scored_token_ids(self.tokenizer, r.options, self.mode)
        # add_special_tokens: tokenize the rendered text as vLLM tokenizes a plain prompt;
        # return_tokens_as_token_ids: read scores by id ("token_id:17"), not by decoded text
        body = {"model": self.model, "messages": self._message(r, frames), "max_tokens": 1,
                "temperature": 0, "logprobs": True, "logprob_token_ids": ids,
                "return_tokens_as_token_ids": True, "add_generation_prompt": False,
                "add_special_tokens": True}  # fmt: skip
        out = self._call("POST", self.url + "/chat/completions", body)
        top = out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        got = {int(t["token"].removeprefix("token_id:")): t["logprob"] for t in top}
        missing = [i for i in ids if i not in got]
        if missing:
            raise RuntimeError(f"{self.url}: no log-prob for scored token ids {missing} "
                               f"(options {list(r.options)})")
        return [float(got[i]) for i in ids]

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        from concurrent.futures import ThreadPoolExecutor

        frames = [self.store.get(r.video, r.frames) for r in requests]  # the store: one thread
        with ThreadPoolExecutor(max_workers=max(1, min(len(requests), 16))) as pool:
            return list(pool.map(self._score_one, requests, frames))


def make_backend(cfg: ReferenceConfig) -> Backend:
    """Build the configured backend (inside a scorer actor of the reward pool)."""
    return {"vllm": VLLMBackend, "transformers": TransformersBackend,
            "openai": OpenAIBackend}[cfg.backend](cfg)
