"""Option scores from a vLLM engine: one prefill per request, many requests per batch.

A plain class (no Ray) so the reward actor, the forge report and tests share it. For each
request (chronological uint8 frames [k, H, W, 3], question, options) it returns z: one score per
option, the log-probability of that option's answer token at the answer position
(``logprob_token_ids``), read with ``max_tokens=1``. Log-probs differ from raw logits by one
per-request constant, so margins z_correct - max wrong z (and the reward) are the same.

Forged checkpoints carry ``forge_config.json``: frames then go through the forge's own
`preprocess_frames`, so vLLM sees the pixels the model was trained on, and its answer mode is
used. Other checkpoints get frames as they are, in the mode passed (default letter).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from refocus_ray import prompting
from refocus_ray.forge import CONFIG_FILE, ForgeConfig, preprocess_frames

# model_type -> the placeholder its processor expands into image tokens
IMAGE_PLACEHOLDER = {
    "idefics3": "<image>",
    "smolvlm": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "internvl_chat": "<image>",
    "llava": "<image>",
}

Request = tuple[np.ndarray, str, Sequence[str]]


def engine_images(frames: np.ndarray, forge_cfg: ForgeConfig | None) -> list[Image.Image]:
    """What the engine's HF processor receives: a forged model's frames go through its resize."""
    frames = np.asarray(frames)
    if forge_cfg is not None:
        frames = preprocess_frames(frames, forge_cfg)
    return [Image.fromarray(f) for f in frames]


class VLLMScorer:
    """Owns a `vllm.LLM` and scores batches of (frames, question, options).

    Construct it under an ``if __name__ == "__main__":`` guard: vLLM spawns worker processes.
    """

    def __init__(
        self,
        model_dir: str | Path,
        answer_mode: str | None = None,
        max_frames: int = 32,
        dtype: str = "float32",
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        **llm_kwargs: Any,
    ) -> None:
        from vllm import LLM

        self.model_dir = Path(model_dir)
        cfg_file = self.model_dir / CONFIG_FILE
        self.forge_cfg = ForgeConfig.load(self.model_dir) if cfg_file.exists() else None
        default_mode = self.forge_cfg.answer_mode if self.forge_cfg else "letter"
        self.mode = answer_mode or default_mode
        self.frame_labels = bool(self.forge_cfg and self.forge_cfg.frame_labels)
        if self.mode not in prompting.MODES:
            raise prompting.PromptError(f"answer mode must be one of {prompting.MODES}")
        config = json.loads((self.model_dir / "config.json").read_text())
        model_type = config["model_type"]
        max_pos = config.get("text_config", config).get("max_position_embeddings", 4096)
        if model_type not in IMAGE_PLACEHOLDER:
            raise ValueError(f"{model_dir}: no image placeholder known for {model_type!r}")
        self.image_token = IMAGE_PLACEHOLDER[model_type]
        self.max_frames = max_frames
        self.llm = LLM(
            model=str(self.model_dir),
            dtype=dtype,
            enforce_eager=enforce_eager,
            # never above the model's own position limit: vLLM refuses to start beyond it (a
            # 2,048-position forged model under a 4,096 default was the failure)
            max_model_len=min(max_model_len or 256 + 64 * max_frames, max_pos),
            limit_mm_per_prompt={"image": max_frames},
            **llm_kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self._ids: dict[tuple[str, ...], list[int]] = {}

    def token_ids(self, options: Sequence[str]) -> list[int]:
        """The scored token id of each option (validated, cached per option list)."""
        key = tuple(options)
        if key not in self._ids:
            self._ids[key] = prompting.scored_token_ids(self.tokenizer, options, self.mode)
        return self._ids[key]

    def images(self, frames: np.ndarray) -> list[Image.Image]:
        return engine_images(frames, self.forge_cfg)

    def prompt(self, n_frames: int, question: str, options: Sequence[str]) -> str:
        return prompting.build_prompt(question, options, n_frames, self.mode, self.image_token,
                                      self.frame_labels)  # fmt: skip

    def score(self, requests: Sequence[Request],
              frame_ids: Sequence[Sequence[str]] | None = None) -> list[list[float]]:
        """z per request (list of floats, one per option), all requests in one engine batch.

        `frame_ids` (optional) names each request's frames, e.g. (video, frame number): vLLM then
        keys its processor, encoder and prefix caches by these names instead of hashing every
        image's pixels (~10% of a request on 2 CPU cores, docs/benchmarks.md). A name must
        stand for the same pixels for the life of this engine.
        """
        from vllm import SamplingParams

        if not requests:
            return []
        if frame_ids is not None and len(frame_ids) != len(requests):
            raise ValueError(f"{len(frame_ids)} frame_ids lists for {len(requests)} requests")
        prompts, params, ids_per = [], [], []
        for i, (frames, question, options) in enumerate(requests):
            k = len(frames)
            if not 1 <= k <= self.max_frames:
                raise ValueError(f"request {i}: {k} frames; this scorer takes 1..{self.max_frames}")
            ids = self.token_ids(options)
            ids_per.append(ids)
            prompt: dict[str, Any] = {
                "prompt": self.prompt(k, question, options),
                "multi_modal_data": {"image": self.images(frames)},
            }
            if frame_ids is not None:
                if len(frame_ids[i]) != k:
                    raise ValueError(f"request {i}: {len(frame_ids[i])} frame ids for {k} frames")
                prompt["multi_modal_uuids"] = {"image": list(frame_ids[i])}
            prompts.append(prompt)
            params.append(
                SamplingParams(
                    max_tokens=1, temperature=0, logprobs=len(ids), logprob_token_ids=ids
                )
            )
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            [float(o.outputs[0].logprobs[0][t].logprob) for t in ids]
            for o, ids in zip(outs, ids_per)
        ]

    def close(self) -> None:
        """Stop the engine's worker processes now rather than at garbage collection."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
