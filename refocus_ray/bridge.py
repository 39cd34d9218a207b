"""The text-image bridge: how far a frame relates to a text, with no text-image model.

The paper's policy reads SigLIP frame features, which live in a space aligned with language, so
it can match "the cat" in a question to frames of a cat. The embedded frame encoder
(EfficientNet-Lite0) is not language-aligned. Its ImageNet head is: it gives each frame a
distribution over 1000 named classes, and the query encoder embeds each class name in the same
space as the questions and options. relevance(f, text) = sum_c p(c | f) (cos(e_c, text) - mean_c
cos(e_c, text)) (centring removes what every class shares with any text). The training-free
`relevance-diverse` baseline ranks frames by it; the policy can take it as an input
(``policy.bridge_classes``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refocus_ray.config import Config, ConfigError, stable_hash

# ImageNet-1k class names, one per line in class-index order (Debian's opencv-doc ships them)
IMAGENET_CLASS_FILES = (
    str(Path(__file__).parent / "data" / "imagenet_classes.txt"),  # shipped with the package
    "/usr/share/doc/opencv-doc/examples/data/dnn/classification_classes_ILSVRC2012.txt",
)


def imagenet_class_names(path: str | None = None) -> list[str]:
    """The 1000 ImageNet class names in index order (first synonym of each line)."""
    candidates = [path] if path else list(IMAGENET_CLASS_FILES)
    for p in candidates:
        if p and Path(p).is_file():
            names = [ln.split(",")[0].strip() for ln in Path(p).read_text().splitlines()
                     if ln.strip()]
            if len(names) != 1000:
                raise ValueError(f"{p}: expected 1000 ImageNet class names, got {len(names)}")
            return names
    raise FileNotFoundError(
        f"no ImageNet class-name file (looked in {candidates}); install Debian's opencv-doc or "
        "set evaluate.imagenet_classes to a file with one class name per line")


def bridge_unavailable(cfg: Config, class_file: str | None = None) -> str | None:
    """Why the bridge cannot be built for this run (None if it can), loading no model."""
    from refocus_ray.encoders import EFFICIENTNET

    if cfg.encoders.frame != EFFICIENTNET:
        return (f"needs the {EFFICIENTNET} frame encoder's ImageNet head; this run's frame "
                f"encoder is {cfg.encoders.frame}")
    try:
        imagenet_class_names(class_file)
    except (FileNotFoundError, ValueError) as err:
        return str(err)
    return None


class TextImageBridge:
    """The frame encoder's ImageNet head and the class names embedded by the query encoder
    (embedded once, cached on disk under `cache_dir`)."""

    def __init__(self, cfg: Config, class_file: str | None, cache_dir: Path) -> None:
        from refocus_ray.encoders import FrameEncoder

        names = imagenet_class_names(class_file)
        self.frame = FrameEncoder(cfg.encoders.frame, cfg.encoders.frame_size,
                                  cfg.encoders.threads)
        self.frame.class_logits(np.zeros((1, self.frame.dim), np.float32))  # EfficientNet only
        cache = Path(cache_dir) / f"class-names-{stable_hash([names, cfg.encoders.query])}.npy"
        if cache.exists():
            self.class_emb = np.load(cache)
        else:
            from refocus_ray.encoders import QueryEncoder

            self.class_emb = QueryEncoder(cfg.encoders.query, cfg.encoders.threads)(names)
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, self.class_emb)

    def relevance(self, features: np.ndarray, q_emb: np.ndarray, opt_emb: np.ndarray
                  ) -> np.ndarray:
        """[F]: each frame's relevance to the question or its most related option."""
        from refocus_ray import selectors

        logits = self.frame.class_logits(np.asarray(features, np.float32)).astype(np.float64)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        texts = np.concatenate([np.atleast_2d(q_emb), np.atleast_2d(opt_emb)])
        return selectors.relevance(p, self.class_emb, texts)

    def tensors(self) -> dict[str, np.ndarray]:
        """What the policy needs to compute relevance itself (``SelectorPolicy.set_bridge``):
        the ImageNet head (weight [C, Df], bias [C]) and the class-name embeddings [C, Dt]."""
        fc = self.frame.model._fc
        return {"weight": fc.weight.detach().numpy().astype(np.float32),
                "bias": fc.bias.detach().numpy().astype(np.float32),
                "class_emb": np.asarray(self.class_emb, np.float32)}


def bridge_tensors(cfg: Config) -> dict[str, np.ndarray]:
    """The run's bridge tensors, class-name embeddings cached in the run's features dir."""
    _require_bridge(cfg)
    return TextImageBridge(cfg, None, cfg.run_path / "features").tensors()


def _require_bridge(cfg: Config) -> None:
    if why := bridge_unavailable(cfg):
        raise ConfigError(f"policy.bridge_classes: {why}")


def check_policy_bridge(cfg: Config, n_classes: int) -> None:
    """Config-time check of ``policy.bridge_classes`` (0 = off): the run's encoders can build a
    bridge and it has that many classes. Raises ConfigError naming the key."""
    if not n_classes:
        return
    _require_bridge(cfg)
    n = len(imagenet_class_names())  # bridge_unavailable checked the file reads
    if n_classes != n:
        raise ConfigError(f"policy.bridge_classes: the ImageNet bridge has {n} classes, "
                          f"got {n_classes}")
